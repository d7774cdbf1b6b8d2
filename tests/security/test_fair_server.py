"""One tenant's flood against a real `treelm serve`-shaped server (gRPC and HTTP): the other tenant
is never refused and is served turn about with it; the flooding tenant is refused first, with a
retry hint; tokens per minute are enforced per tenant."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import grpc
import pytest

import treelm
from cluster.service.quota import QuotaPolicy, TenantQuota
from nodes.runtime.engine import EngineConfig
from tests.cluster import http_harness
from tests.cluster.grpc_harness import make_world, serve

pytestmark = pytest.mark.timeout(300)

FLOODER, TRICKLE = "globex", "acme"
NODE = "rt/en/medical"
FLOOD = 200  # concurrent streams of the flooding tenant
NO_RETRY = treelm.RetryPolicy(retries=0)


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    # Deficit round robin alone: the contended share (on by default) lines the flooder's refills up
    # behind the trickle's requests, which this test's count of completions per call does not
    # model; tests/security/test_fair_queue.py and tests/nodes/test_step_fairness.py test it.
    config = EngineConfig(max_batch_size=4, max_queue=32, tenant_contended_running=None)
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("fair"), config)
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def server(world):
    quotas = QuotaPolicy(TenantQuota(max_queued=8), {TRICKLE: TenantQuota(max_queued=8, tokens_per_minute=10**6)})
    s = serve(world, http_port=0, quotas=quotas)
    yield s
    s.stop()


def _no_eos(world) -> dict[int, float]:
    """A logit bias that keeps the tiny model from ending early: every flood stream runs its length."""
    return {int(world.engine.tokenizer.eos_token_id): -100.0}


async def _flood_and_trickle(world, server) -> dict:
    stop = asyncio.Event()
    completed: list[int] = []  # flood streams that ran to the end, in order
    refusals: list[treelm.TreeLMError] = []
    seen: list[tuple[set[int], list[int]]] = []  # per trickle call: flood streams completed before and after it
    trickle_errors: list[treelm.TreeLMError] = []
    bias = _no_eos(world)

    async with (
        treelm.AsyncClient(server.target, token=world.tokens[FLOODER], retries=NO_RETRY, timeout=120) as a,
        treelm.AsyncClient(server.target, token=world.tokens[TRICKLE], retries=NO_RETRY, timeout=120) as b,
    ):

        async def flood_stream(worker: int) -> None:
            attempt = 0
            while not stop.is_set():
                key = worker * 1000 + attempt
                attempt += 1
                try:
                    async for _ in a.stream(NODE, f"flood {worker}", max_new_tokens=48, logit_bias=bias):
                        pass
                    completed.append(key)
                except treelm.Overloaded as exc:
                    refusals.append(exc)
                    await asyncio.sleep(0.2)  # a flooder that barely backs off

        workers = [asyncio.create_task(flood_stream(w)) for w in range(FLOOD)]
        while len(refusals) < FLOOD // 2:  # the flood is on: the engine is full of the flooder's work
            await asyncio.sleep(0.01)
        for i in range(5):
            before = set(completed)
            try:
                await b.generate(NODE, f"trickle {i}", max_new_tokens=4)
            except treelm.TreeLMError as exc:  # recorded and asserted below
                trickle_errors.append(exc)
            seen.append((before, list(completed)))
            await asyncio.sleep(0.05)
        stop.set()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return {"completed": completed, "refusals": refusals, "trickle_errors": trickle_errors, "seen": seen}


def test_a_flood_of_200_streams_never_refuses_or_starves_another_tenant(world, server):
    out = asyncio.run(_flood_and_trickle(world, server))
    assert out["trickle_errors"] == []  # the second tenant was never refused
    refusals = out["refusals"]
    assert len(refusals) >= FLOOD // 2  # the flooder was, at its own bound ...
    assert all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refusals)
    assert {r.kind for r in refusals} == {"tenant-over-limit"}  # ... never the engine's shared one
    assert all(r.retry_after is not None and r.retry_after >= 1 for r in refusals)  # with a retry hint
    # Turn about: a trickle call waits for one batch slot (one flood stream finishing) and at most
    # one more flood request's turn, and a few streams of the batch may end while it runs. In one
    # FIFO queue it would wait for the 8 flood requests queued ahead of it: at least 9 completions.
    for before, after in out["seen"]:
        assert len(set(after) - before) <= 5
    assert out["completed"]  # the flooder is served too, not shut out


async def _sample_batch(world, stop: threading.Event, samples: list[tuple[int, int]]) -> None:
    """(the trickle tenant's rows, the flooder's rows) in the engine's batch, every millisecond."""
    scheduler = world.engine._scheduler
    while not stop.is_set():
        tenants = [row.job.request.tenant for row in list(scheduler.running)]
        samples.append((tenants.count(TRICKLE), tenants.count(FLOODER)))
        await asyncio.sleep(0.001)


def test_with_the_default_share_a_flooder_gains_no_row_past_4_while_another_tenant_is_present(
    tiny_base_dir, tmp_path_factory
):
    # The engine's defaults but a batch of 8: the contended share (4) leaves room the flood would fill.
    world = make_world(tiny_base_dir, tmp_path_factory.mktemp("share"), EngineConfig(max_batch_size=8, max_queue=32))
    quotas = QuotaPolicy(TenantQuota(max_queued=8), {TRICKLE: TenantQuota(max_queued=8)})
    server = serve(world, quotas=quotas)
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    async def run() -> dict:
        sampler = asyncio.ensure_future(_sample_batch(world, stop, samples))
        try:
            return await _flood_and_trickle(world, server)
        finally:
            stop.set()
            await sampler

    try:
        out = asyncio.run(run())
    finally:
        server.stop()
        world.engine.close()
        world.registry.close()
    assert out["trickle_errors"] == [] and len(out["seen"]) == 5  # the other tenant: served, never refused
    assert out["refusals"] and {r.kind for r in out["refusals"]} == {"tenant-over-limit"}
    assert all(r.retry_after is not None and r.retry_after >= 1 for r in out["refusals"])
    assert any(b and a for b, a in samples)  # both tenants were in the batch together
    # Rows already running are never taken back, but while the other tenant is in the batch the
    # flooder at its share (4) or above admits nothing more: its count never rises from there.
    gains = [(prev, cur) for prev, cur in itertools.pairwise(samples) if cur[0] and prev[1] >= 4 and cur[1] > prev[1]]
    assert gains == []
    assert out["completed"]


def test_http_flood_gets_429_with_retry_after_and_the_other_tenant_is_served(world, server):
    base = server.server.http_url
    assert base is not None
    body = {
        "model": NODE,
        "prompt": "flood",
        "max_tokens": 48,
        "logit_bias": {str(k): v for k, v in _no_eos(world).items()},
    }
    answers: list[http_harness.Answer] = []
    lock = threading.Lock()

    def flood() -> None:
        answer = http_harness.call(base, "POST", "/completions", body, token=world.tokens[FLOODER])
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=flood) for _ in range(40)]
    for t in threads:
        t.start()
    client = http_harness.openai_client(base, world.tokens[TRICKLE])
    for i in range(3):  # the other tenant, through the real openai client, while the flood runs
        done = client.completions.create(model=NODE, prompt=f"trickle {i}", max_tokens=4)
        assert done.choices and done.usage.completion_tokens >= 1
    for t in threads:
        t.join(120)
    refused = [a for a in answers if a.status == 429]
    assert refused, "the flooding tenant was never refused"
    assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
    assert {a.error["code"] for a in refused} == {"tenant_over_limit"}
    assert all(a.status in (200, 429) for a in answers)


def test_tokens_per_minute_refuse_only_the_tenant_that_spent_them(world, tmp_path):
    limits = tmp_path / "limits.yaml"
    limits.write_text(f"tenants:\n  {FLOODER}:\n    tokens_per_minute: 12\n", encoding="utf-8")
    policy = QuotaPolicy.load(limits, TenantQuota())
    s = serve(world, http_port=0, quotas=policy)
    try:
        with (
            treelm.Client(s.target, token=world.tokens[FLOODER], retries=NO_RETRY) as a,
            treelm.Client(s.target, token=world.tokens[TRICKLE], retries=NO_RETRY) as b,
        ):
            bias = _no_eos(world)
            assert a.generate(NODE, "spend", max_new_tokens=8, logit_bias=bias).usage.completion_tokens == 8
            a.generate(NODE, "overspend", max_new_tokens=8, logit_bias=bias)  # 4 left: allowed, goes into debt
            with pytest.raises(treelm.Overloaded) as refused:
                a.generate(NODE, "one more", max_new_tokens=1)
            assert refused.value.kind == "rate-limited"
            # 4 tokens of debt + 1 at 12 per minute: 25 s; the hint says so (whole seconds, rounded up).
            assert 20 <= (refused.value.retry_after or 0) <= 26
            for _ in range(3):  # the other tenant has no such bound
                b.generate(NODE, "free", max_new_tokens=8)
        answer = http_harness.call(
            s.server.http_url or "",
            "POST",
            "/completions",
            {"model": NODE, "prompt": "x", "max_tokens": 1},
            token=world.tokens[FLOODER],
        )
        assert answer.status == 429 and 20 <= int(answer.headers["retry-after"]) <= 26
        assert answer.error["code"] == "rate_limited"
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants: [acme]\n", "expected a mapping"),
        ("tenants:\n  acme: {max_runing: 3}\n", "tenant 'acme' needs a mapping"),
        ("tenants:\n  acme: {max_queued: 0}\n", "max_queued must be an integer >= 1"),
        ("tenants:\n  acme: {tokens_per_minute: true}\n", "tokens_per_minute must be an integer >= 1"),
        ("defaults: {}\ntenants: {}\n", "one key, 'tenants'"),
        ("tenants: {acme: {max_queued: 1}\n", "cannot read"),
    ],
)
def test_a_bad_tenant_limits_file_is_refused_naming_the_problem(tmp_path, text, message):
    from cluster.errors import ServeError

    path = tmp_path / "limits.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ServeError, match=message) as refused:
        QuotaPolicy.load(path)
    assert str(path) in str(refused.value)


def test_limits_file_overrides_keep_the_other_defaults(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("tenants:\n  trial: {tokens_per_minute: 5000}\n", encoding="utf-8")
    policy = QuotaPolicy.load(path, TenantQuota(max_running=8, max_queued=32))
    assert policy.for_tenant("trial") == TenantQuota(max_running=8, max_queued=32, tokens_per_minute=5000)
    assert policy.for_tenant("other") == policy.for_tenant(None) == TenantQuota(max_running=8, max_queued=32)


def test_registry_limits_lie_over_the_servers_field_by_field():
    from cluster.service.quota import Quotas

    configured = QuotaPolicy(TenantQuota(max_running=8), {"trial": TenantQuota(max_running=8, tokens_per_minute=100)})
    rows = {"trial": {"max_queued": 4}, "acme": {"tokens_per_minute": 50}}
    quotas = Quotas(configured, overrides=lambda: rows)
    # trial keeps its file's tokens per minute and takes the registry's queue bound; acme the defaults plus its own.
    assert quotas.for_tenant("trial") == TenantQuota(max_running=8, max_queued=4, tokens_per_minute=100)
    assert quotas.for_tenant("acme") == TenantQuota(max_running=8, tokens_per_minute=50)
    assert quotas.for_tenant("other") == TenantQuota(max_running=8)

    def broken() -> dict:
        raise OSError("the database is away")

    failing = Quotas(configured, overrides=broken)  # a failed read keeps the server's own limits
    assert failing.for_tenant("trial") == configured.for_tenant("trial")


def test_a_limit_set_in_the_registry_reaches_a_running_server_within_seconds(world):
    from registry.limits import set_tenant_limits

    s = serve(world, http_port=0)
    try:
        with treelm.Client(s.target, token=world.tokens[FLOODER], retries=NO_RETRY) as a:
            a.generate(NODE, "before", max_new_tokens=2)
            set_tenant_limits(world.registry, FLOODER, {"tokens_per_minute": 1})
            deadline = time.monotonic() + 10
            kind = None
            while kind is None and time.monotonic() < deadline:  # no restart: the server reads the registry
                try:
                    a.generate(NODE, "spend", max_new_tokens=2)
                except treelm.Overloaded as exc:
                    kind = exc.kind
                time.sleep(0.2)
            assert kind == "rate-limited"
            with treelm.Client(s.target, token=world.tokens[TRICKLE], retries=NO_RETRY) as b:
                b.generate(NODE, "other tenant", max_new_tokens=2)  # its limits are the server's
            set_tenant_limits(world.registry, FLOODER, {}, clear=["tokens_per_minute"])
            deadline = time.monotonic() + 10
            served = False
            while not served and time.monotonic() < deadline:
                try:
                    served = a.generate(NODE, "after", max_new_tokens=1).usage.completion_tokens == 1
                except treelm.Overloaded:
                    time.sleep(0.2)
            assert served
    finally:
        set_tenant_limits(world.registry, FLOODER, {}, clear=["tokens_per_minute"])
        s.stop()
