"""Step-level fairness (nodes.runtime.parking): while two tenants have rows in the batch, each
decodes at most ``tenant_step_rows`` rows per step; the others wait aside with their KV cache and
come back. Every greedy continuation stays exactly what the node's merged model generates alone,
whether its rows waited, were cancelled while waiting, or forked into several choices."""

from __future__ import annotations

import asyncio

import pytest

from nodes.base.model import TinyBaseConfig, make_tiny_base
from nodes.errors import EngineConfigError
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, SamplingParams
from tests.nodes.treefactory import MergedReference, make_random_tree

PROMPTS = (
    "The contract was signed by both parties",
    "Patients with chronic pain often",
    "La radiologie montre",
    "In the morning the clinic",
)
NODES = ("en/medical/radiology", "en/legal", "fr/medical", "en", "en/medical/cardiology", "fr")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    config = TinyBaseConfig(hidden=64, layers=2, vocab=400, heads=4, kv_heads=2, max_position=1024)
    return make_tiny_base(tmp_path_factory.mktemp("bases") / "steps", config)


@pytest.fixture(scope="module")
def tree(base, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("steps") / "tree", base)


@pytest.fixture(scope="module")
def reference(base, tree):
    return MergedReference(base, tree, horizon=32)


def _request(tree, i: int, tenant: str, max_new: int, **params) -> GenerationRequest:
    return GenerationRequest(
        node=f"{tree.name}/{NODES[i % len(NODES)]}",
        prompt=PROMPTS[i % len(PROMPTS)],
        params=SamplingParams(max_new_tokens=max_new, **params),
        tenant=tenant,
        request_id=f"{tenant}-{i}",
    )


async def test_a_heavy_tenant_decodes_its_share_per_step_and_every_output_is_unchanged(base, tree, reference):
    config = EngineConfig(max_batch_size=16, tenant_step_rows=2)
    async with Engine(base, tree.root, config) as engine:
        flood = [_request(tree, i, "a", 24) for i in range(9)]
        a_tasks = [asyncio.ensure_future(engine.generate(r)) for r in flood]
        while engine.stats().active_requests < 9:  # A fills the batch alone: no share applies yet
            await asyncio.sleep(0.005)
        assert engine._scheduler.parking.parked_total == 0
        trickle = [_request(tree, i, "b", 12) for i in range(3)]
        b_results = [await engine.generate(r) for r in trickle]  # B arrives: A's rows over 2 wait aside
        a_results = await asyncio.gather(*a_tasks)
        parking = engine._scheduler.parking
        assert parking.parked_total > 0 and len(parking) == 0  # rows waited, and all came back
        stats = engine.stats()
        assert stats.active_requests == 0 and stats.cache.pinned == 0 and stats.tokens_in_flight == 0
    for request, result in zip([*flood, *trickle], [*a_results, *b_results], strict=True):
        prompt = engine.encode(request)
        expected = reference.tokens(request.node, prompt, request.params.max_new_tokens)
        assert list(result.token_ids) == expected, request.request_id


async def test_rows_cancelled_or_forked_while_parked_end_cleanly(base, tree, reference):
    config = EngineConfig(max_batch_size=16, tenant_step_rows=1)
    async with Engine(base, tree.root, config) as engine:
        long = _request(tree, 0, "a", 400, ignore_eos=True)
        stream = engine.stream(long)
        await stream.__anext__()
        forked = _request(tree, 1, "a", 10, n=3)  # three rows of one job: two of them wait aside
        fork_task = asyncio.ensure_future(engine.generate(forked))
        other = _request(tree, 2, "b", 10)
        b_result = await engine.generate(other)
        await stream.aclose()  # cancel A's long request, parked or running
        fork_result = await fork_task
        await asyncio.sleep(0.05)
        stats = engine.stats()
        assert stats.active_requests == 0 and stats.cache.pinned == 0 and stats.tokens_in_flight == 0
        assert len(engine._scheduler.parking) == 0
    assert list(b_result.token_ids) == reference.tokens(other.node, engine.encode(other), 10)
    expected = reference.tokens(forked.node, engine.encode(forked), 10)
    assert [list(c.token_ids) for c in fork_result.choices] == [expected] * 3  # greedy: every choice alike


async def test_under_contention_a_tenant_admits_its_contended_share_and_outputs_are_unchanged(base, tree, reference):
    config = EngineConfig(max_batch_size=16, tenant_contended_running=2)
    async with Engine(base, tree.root, config) as engine:
        scheduler = engine._scheduler
        long = _request(tree, 0, "b", 60, ignore_eos=True)
        b_task = asyncio.ensure_future(engine.generate(long))
        while engine.stats().active_requests < 1:  # B is in the batch
            await asyncio.sleep(0.005)
        flood = [_request(tree, i, "a", 12) for i in range(1, 7)]
        a_tasks = [asyncio.ensure_future(engine.generate(r)) for r in flood]
        peak = 0
        while not b_task.done():  # A's rows in the batch while B's request runs
            tenants = [row.job.request.tenant for row in list(scheduler.running)]
            if "b" in tenants:
                peak = max(peak, tenants.count("a"))
            await asyncio.sleep(0.001)
        b_result = await b_task
        a_results = await asyncio.gather(*a_tasks)
        assert scheduler.parking.parked_total == 0  # no row was moved aside: A admitted fewer instead
    assert peak == 2  # six of A's requests waited their turn two at a time
    for request, result in zip([*flood, long], [*a_results, b_result], strict=True):
        expected = reference.tokens(request.node, engine.encode(request), request.params.max_new_tokens)
        assert list(result.token_ids) == expected, request.request_id


def test_the_share_is_checked():
    with pytest.raises(EngineConfigError, match="tenant_step_rows"):
        EngineConfig(tenant_step_rows=0)
    with pytest.raises(EngineConfigError, match="tenant_contended_running"):
        EngineConfig(tenant_contended_running=0)
