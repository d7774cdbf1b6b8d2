"""Per-tenant limits on the Ray cluster: the ingress stamps each request with the caller's tenant
and limits, the trunk replica's engine applies them, and its refusal comes back through Ray as
RESOURCE_EXHAUSTED with a retry hint, to that tenant only (limits of tenant "flood": conftest.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import treelm
from registry.access import issue_token

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

NODE = "rt/en/medical"
NO_RETRY = treelm.RetryPolicy(retries=0)


async def _flood_and_call(ray_world) -> tuple[list[treelm.TreeLMError], int, list[int]]:
    world = ray_world.world
    flood_token = issue_token(world.registry, "flood").token
    no_eos = {int(world.engine.tokenizer.eos_token_id): -100.0}
    refusals: list[treelm.TreeLMError] = []
    completed = 0
    async with (
        treelm.AsyncClient(ray_world.target, token=flood_token, retries=NO_RETRY, timeout=120) as a,
        treelm.AsyncClient(ray_world.target, token=world.tokens["acme"], retries=NO_RETRY, timeout=120) as b,
    ):

        async def stream(i: int) -> None:
            nonlocal completed
            try:
                async for _ in a.stream(NODE, f"flood {i}", max_new_tokens=64, logit_bias=no_eos):
                    pass
                completed += 1
            except treelm.Overloaded as exc:
                refusals.append(exc)

        flood = [asyncio.create_task(stream(i)) for i in range(8)]
        answered = [len((await b.generate(NODE, f"other tenant {i}", max_new_tokens=4)).text) for i in range(3)]
        await asyncio.gather(*flood)
    return refusals, completed, answered


def test_the_replica_refuses_the_tenant_over_its_limit_and_serves_the_other(ray_world):
    refusals, completed, answered = asyncio.run(_flood_and_call(ray_world))
    assert len(answered) == 3  # the other tenant was served every time, never refused
    assert refusals, "tenant flood (max_running 1, max_queued 1) was never refused"
    assert all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED and r.kind == "tenant-over-limit" for r in refusals)
    assert all(r.retry_after is not None and r.retry_after >= 1 for r in refusals)
    assert completed >= 2 and completed + len(refusals) == 8  # one running and one queued at a time were served
