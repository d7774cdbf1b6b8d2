"""Chunked prefill: a long prompt is prefilled a chunk per step, between the running rows' decode
steps; every row's greedy tokens stay the merged model's, and a cancelled long prompt frees its slot."""

from __future__ import annotations

import asyncio

import pytest

from nodes.errors import RequestCancelled
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import FinishReason, GenerationRequest, SamplingParams
from tests.nodes.treefactory import MergedReference, make_random_tree

LONG_PROMPT = "The radiology report describes a small nodule in the upper lobe of the left lung. " * 6


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("chunked") / "tree", tiny_base_dir)


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tree):
    return MergedReference(tiny_base_dir, tree)


def _request(node: str, prompt: str, n: int = 8, **params) -> GenerationRequest:
    return GenerationRequest(node=node, prompt=prompt, params=SamplingParams(max_new_tokens=n, **params))


async def test_long_prompts_join_in_chunks_and_every_row_stays_exact(tiny_base_dir, tree, reference):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=8, prefill_chunk=16, prefix_cache_bytes=0))
    try:
        # Rows that decode all along: chunks only split a prompt while other rows are decoding.
        short = [
            _request(f"{tree.name}/en", "The contract was signed", 80, ignore_eos=True),
            _request(f"{tree.name}/fr", "Le patient", 80, ignore_eos=True),
        ]
        long = [
            _request(f"{tree.name}/en/medical/radiology", LONG_PROMPT),
            _request(f"{tree.name}/en/medical", LONG_PROMPT + "Next,"),
        ]
        assert len(engine.encode(long[0])) > 4 * 16
        results = await asyncio.gather(*(engine.generate(r) for r in [*short, *long]))
        stats = engine.stats()
    finally:
        engine.close()
    for r, result in zip([*short, *long], results, strict=True):
        want = reference.tokens(r.node, engine.encode(r), r.params.max_new_tokens)
        assert list(result.token_ids)[: len(want)] == want  # (eos ignored: the rows may go on past it)
    # Each long prompt took several forwards: one per chunk, not one for all of it.
    assert stats.prefill_batches >= 2 * (len(engine.encode(long[0])) // 16)


async def test_chunks_and_the_prefix_cache_compose_exactly(tiny_base_dir, tree, reference):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4, prefill_chunk=16))
    node = f"{tree.name}/en/medical"
    try:
        first = await engine.generate(_request(node, LONG_PROMPT + "First,"))
        second = await engine.generate(_request(node, LONG_PROMPT + "Second, and then a longer question follows"))
        assert engine.stats().prefix_hits == 1
    finally:
        engine.close()
    for prompt, result in (
        (LONG_PROMPT + "First,", first),
        (LONG_PROMPT + "Second, and then a longer question follows", second),
    ):
        r = _request(node, prompt)
        assert list(result.token_ids) == reference.tokens(node, engine.encode(r), 8)


async def test_a_cancelled_long_prompt_ends_while_prefilling_and_frees_its_slot(tiny_base_dir, tree):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=2, prefill_chunk=1, prefix_cache_bytes=0))
    try:
        busy = _request(f"{tree.name}/fr", "Le patient", 400, ignore_eos=True)  # decoding: the prompt goes in chunks
        busy_task = asyncio.ensure_future(engine.generate(busy))
        long = _request(f"{tree.name}/en", LONG_PROMPT, 4)
        stream = engine.stream(long)
        task = asyncio.ensure_future(stream.__anext__())
        for _ in range(200):  # wait until it is being prefilled (one token per step: hundreds of steps)
            await asyncio.sleep(0.01)
            if engine.stats().active_requests == 2:
                break
        assert engine.cancel(long.request_id)
        with pytest.raises((StopAsyncIteration, RequestCancelled)) as ended:
            chunk = await task
            assert chunk.finish_reason == FinishReason.CANCELLED and chunk.token_ids == ()  # cut while prefilling
            await stream.__anext__()
        assert ended.value is not None
        assert engine.cancel(busy.request_id)
        await busy_task
        after = await engine.generate(_request(f"{tree.name}/fr", "Le patient", 3))
        assert after.usage.completion_tokens > 0
        stats = engine.stats()
        assert stats.cancelled == 2 and stats.active_requests == 0 and stats.cache.pinned == 0
    finally:
        engine.close()
