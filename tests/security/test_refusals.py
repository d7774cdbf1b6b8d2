"""A caller the server keeps refusing: its later refusals wait, other tenants' do not, and the log
counts refusals instead of writing a line for each (cluster/service/refusals.py), on gRPC and HTTP."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from cluster.errors import ServeError
from cluster.service.refusals import RefusalLog, RefusalPenalty
from cluster.service.server import ServerConfig
from protos.treelm.v1 import registry_pb2, registry_pb2_grpc
from tests.cluster.grpc_harness import serve
from tests.cluster.http_harness import call

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20


def test_a_callers_refusals_past_its_budget_wait_and_other_callers_and_windows_do_not():
    penalty = RefusalPenalty(per_second=3, delay_s=0.25, window_s=60.0)
    assert [penalty.delay("globex") for _ in range(5)] == [0.0, 0.0, 0.0, 0.25, 0.25]
    assert penalty.delay("acme") == 0.0  # a budget of its own
    penalty._callers["globex"] = (time.monotonic() - 61.0, 99)  # its window ended: a new budget
    assert penalty.delay("globex") == 0.0
    assert RefusalPenalty(per_second=0).delay("globex") == 0.0  # off


async def test_at_most_max_held_answers_wait_at_once():
    penalty = RefusalPenalty(per_second=1, delay_s=0.3, max_held=2, window_s=60.0)
    penalty.delay("globex")  # its budget spent
    started = time.perf_counter()
    await asyncio.gather(*(penalty.hold("globex") for _ in range(6)))
    # Two waited (together); the other four were answered at once rather than held.
    assert 0.25 < time.perf_counter() - started < 3.0
    assert penalty.delayed_total == 2 and penalty.held == 0


def test_the_callers_tracked_are_bounded():
    penalty = RefusalPenalty(per_second=1)
    for i in range(10_000):
        penalty.delay(f"peer 10.0.{i // 256}.{i % 256}")
    assert len(penalty._callers) <= 4096


def test_the_refusal_log_writes_at_most_its_lines_a_second_and_counts_the_rest(caplog):
    logger = logging.getLogger("treelm.test-refusals")
    log = RefusalLog(logger, per_second=5)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for i in range(50):
            log.info("call failed: %s", i)
        assert len(caplog.records) == 5 and log.dropped == 45
        log._window -= 1.0  # the next second
        log.info("call failed: %s", "late")
    assert caplog.records[-1].getMessage() == "call failed: late (and 45 more refusals not logged)"
    assert log.dropped == 0


def test_refusal_settings_are_checked():
    with pytest.raises(ServeError, match="refusals_per_s"):
        ServerConfig(refusals_per_s=-1)
    with pytest.raises(ValueError):
        RefusalPenalty(per_second=-1)


def _slow_penalty(server) -> None:
    """A minute-long window and a 2 s wait: the test's timing does not depend on the machine's load."""
    server.server.refusal_penalty.window_s = 60.0
    server.server.refusal_penalty.delay_s = 2.0


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def test_over_http_a_tenant_refused_past_its_budget_waits_while_another_tenant_is_answered_at_once(world):
    server = serve(world, http_port=0, refusals_per_s=5, max_request_body_bytes=64 * 1024)
    _slow_penalty(server)
    url = server.server.http_url
    big = b"{" + b" " * (100 * 1024) + b"}"  # over the 64 KiB body bound: 413 from Content-Length

    def refuse(tenant: str):
        return call(url, "POST", "/completions", big, token=world.tokens[tenant], headers={"Content-Type": "x"})

    try:
        fast = [_timed(lambda: refuse("globex")) for _ in range(5)]
        slow = [_timed(lambda: refuse("globex")) for _ in range(2)]
        other, other_s = _timed(lambda: refuse("acme"))
        answer = call(
            url,
            "POST",
            "/completions",
            {"model": "rt/en", "prompt": "hi", "max_tokens": 1},
            token=world.tokens["globex"],
        )
    finally:
        server.stop()
    for result, _ in fast + slow + [(other, 0)]:
        assert result.status == 413 and result.error["code"] == "request_too_large"
    assert max(s for _, s in fast) < 1.0 and min(s for _, s in slow) >= 1.95
    assert other_s < 1.0
    assert answer.status == 200  # a call that is not refused is never held
    exported = server.server.metrics.registry.get_sample_value
    assert exported("treelm_refusals_delayed") == 2 and exported("treelm_refusals_held") == 0


def test_over_grpc_refusals_past_the_budget_wait_and_are_answered_with_the_same_status(world):
    server = serve(world, refusals_per_s=4)
    _slow_penalty(server)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)

            def refuse(tenant: str) -> tuple[grpc.StatusCode, float]:
                started = time.perf_counter()
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetNode(
                        registry_pb2.GetNodeRequest(node="rt/no-such-node"),
                        metadata=[("authorization", f"Bearer {world.tokens[tenant]}")],
                        timeout=30,
                    )
                return info.value.code(), time.perf_counter() - started

            first = [refuse("globex") for _ in range(4)]
            later = [refuse("globex") for _ in range(2)]
            other = refuse("acme")
    finally:
        server.stop()
    assert {code for code, _ in first + later + [other]} == {grpc.StatusCode.NOT_FOUND}
    assert max(s for _, s in first) < 1.0 and min(s for _, s in later) >= 1.95 and other[1] < 1.0
