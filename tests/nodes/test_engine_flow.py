"""Request life cycle: cancellation frees the slot, deadlines, tokens in flight, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest
from transformers import AutoTokenizer

from nodes.base.model import TinyBaseConfig, make_tiny_base
from nodes.errors import DeadlineExceeded, EngineClosed, EngineError, InvalidRequest, RequestCancelled
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import FinishReason, GenerationRequest, SamplingParams
from tests.nodes.treefactory import MergedReference, make_random_tree

PROMPT = "The contract was signed by both parties"
LONG = 2000  # tokens: thousands of decode steps (seconds), far longer than any wait below; requests are cut short


@pytest.fixture(scope="module")
def long_base(tmp_path_factory):
    """A tiny base with a long context, so a request can outlast every wait in these tests."""
    config = TinyBaseConfig(hidden=64, layers=2, vocab=400, heads=4, kv_heads=2, max_position=4096)
    return make_tiny_base(tmp_path_factory.mktemp("bases") / "long", config)


@pytest.fixture(scope="module")
def tree(long_base, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("flow") / "tree", long_base)


@pytest.fixture(scope="module")
def reference(long_base, tree):
    return MergedReference(long_base, tree)


@pytest.fixture
def one_slot(long_base, tree):
    engine = Engine(long_base, tree.root, EngineConfig(max_batch_size=1))
    yield engine
    engine.close()


def request(node, n, deadline=None, **params):
    return GenerationRequest(
        node=node, prompt=PROMPT, params=SamplingParams(max_new_tokens=n, **params), deadline=deadline
    )


async def test_closing_a_stream_cancels_and_frees_the_slot(one_slot, reference, tree):
    stream = one_slot.stream(request(f"{tree.name}/en/medical/radiology", LONG, ignore_eos=True))
    got = [await stream.__anext__() for _ in range(3)]
    await stream.aclose()  # the client went away
    nxt = request(f"{tree.name}/fr/medical", 6)
    result = await one_slot.generate(nxt)  # would wait for LONG tokens if the slot were not freed
    assert list(result.token_ids) == reference.tokens(nxt.node, one_slot.encode(nxt), 6)
    stats = one_slot.stats()
    assert stats.cancelled == 1 and stats.active_requests == 0 and stats.cache.pinned == 0
    assert stats.tokens_generated < LONG and len(got) == 3


async def test_cancel_by_id_returns_a_partial_result_or_raises_when_queued(one_slot, tree):
    running = request(f"{tree.name}/en", LONG, ignore_eos=True)
    queued = request(f"{tree.name}/fr", 5)
    stream = one_slot.stream(running)
    await stream.__anext__()
    task_running = asyncio.ensure_future(_collect(stream))
    task_queued = asyncio.ensure_future(one_slot.generate(queued))
    for _ in range(1000):  # the prompt is tokenized in a thread, then queued
        if one_slot.stats().queue_depth:
            break
        await asyncio.sleep(0.005)
    assert one_slot.cancel(queued.request_id) and one_slot.cancel(running.request_id)
    with pytest.raises(RequestCancelled):
        await task_queued
    chunks = await task_running
    assert chunks[-1].finish_reason == FinishReason.CANCELLED
    assert chunks[-1].usage.completion_tokens < LONG
    assert not one_slot.cancel("no-such-request")


async def _collect(stream):
    return [c async for c in stream]


async def test_a_cancelled_generate_task_frees_its_slot(one_slot, tree):
    task = asyncio.ensure_future(one_slot.generate(request(f"{tree.name}/en", LONG, ignore_eos=True)))
    while one_slot.stats().active_requests == 0:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    result = await one_slot.generate(request(f"{tree.name}/fr", 3))
    assert result.usage.completion_tokens <= 3 and one_slot.stats().cancelled == 1


async def test_a_deadline_ends_a_running_request_with_what_it_has(one_slot, tree):
    stream = one_slot.stream(request(f"{tree.name}/en", LONG, ignore_eos=True, deadline=time.time() + 0.3))
    chunks = [c async for c in stream]
    assert chunks[-1].finish_reason == FinishReason.DEADLINE
    assert 0 < chunks[-1].usage.completion_tokens < LONG
    stats = one_slot.stats()
    assert stats.deadline == 1 and stats.active_requests == 0 and stats.cache.pinned == 0


async def test_a_deadline_that_passes_in_the_queue_raises(one_slot, tree):
    busy = request(f"{tree.name}/en", LONG, ignore_eos=True)
    stream = one_slot.stream(busy)
    await stream.__anext__()
    with pytest.raises(DeadlineExceeded, match="queued"):
        await one_slot.generate(request(f"{tree.name}/fr", 5, deadline=time.time() + 0.1))
    assert one_slot.stats().failed == 1 and one_slot.stats().active_requests == 1
    await stream.aclose()


async def test_tokens_in_flight_bound_admission(long_base, tree, reference):
    prompt_len = len(AutoTokenizer.from_pretrained(long_base)(PROMPT).input_ids)
    config = EngineConfig(max_batch_size=8, max_tokens_in_flight=prompt_len + LONG + 10)
    async with Engine(long_base, tree.root, config) as engine:
        assert len(engine.encode(request("x", 1))) == prompt_len
        with pytest.raises(InvalidRequest) as info:
            await engine.generate(request(f"{tree.name}/en", LONG + 20))
        assert info.value.field == "max_new_tokens"
        stream = engine.stream(request(f"{tree.name}/en", LONG, ignore_eos=True))
        await stream.__anext__()
        small = request(f"{tree.name}/fr", 20)  # its prompt + 20 tokens do not fit next to the long request
        task = asyncio.ensure_future(engine.generate(small))
        await asyncio.sleep(0.05)
        stats = engine.stats()
        assert (stats.active_requests, stats.queue_depth) == (1, 1)
        assert stats.tokens_in_flight == prompt_len + LONG
        await stream.aclose()  # the long request leaves: the small one is admitted
        result = await task
        assert list(result.token_ids) == reference.tokens(small.node, engine.encode(small), 20)


async def test_close_fails_waiting_and_running_requests_and_refuses_new_ones(long_base, tree):
    engine = Engine(long_base, tree.root, EngineConfig(max_batch_size=1))
    stream = engine.stream(request(f"{tree.name}/en", LONG, ignore_eos=True))
    await stream.__anext__()
    waiting = asyncio.ensure_future(engine.generate(request(f"{tree.name}/fr", 5)))
    await asyncio.sleep(0)
    await engine.aclose()
    with pytest.raises(EngineClosed):
        await waiting
    with pytest.raises(EngineClosed):
        async for _ in stream:
            pass
    with pytest.raises(EngineClosed):
        await engine.generate(request(f"{tree.name}/fr", 5))
    assert engine.stats().closed
    # The base model is plain again: no wrapped layers are left behind.
    assert not any(type(m).__name__ == "BankLinear" for m in engine.base.model.modules())


class FailingForward:
    """Wraps the model: the forward number ``fail_at`` raises (as an out-of-memory would)."""

    def __init__(self, model, fail_at: int):
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated failure in the forward")
        return self.model(**kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("fail_at, where", [(1, "prefill"), (3, "generation")])
async def test_a_failed_forward_fails_its_rows_and_the_engine_goes_on(one_slot, reference, tree, fail_at, where):
    scheduler = one_slot._scheduler
    scheduler.model = FailingForward(scheduler.model, fail_at)
    with pytest.raises(EngineError, match=f"{where} failed"):
        await one_slot.generate(request(f"{tree.name}/en/medical", 10))
    stats = one_slot.stats()
    assert (stats.failed, stats.active_requests, stats.tokens_in_flight, stats.cache.pinned) == (1, 0, 0, 0)
    ok = request(f"{tree.name}/en/medical", 10)
    result = await one_slot.generate(ok)
    assert list(result.token_ids) == reference.tokens(ok.node, one_slot.encode(ok), 10)
