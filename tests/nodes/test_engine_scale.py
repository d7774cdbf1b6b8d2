"""A tree far larger than the adapter cache: every request still gets its node's merged-model tokens,
the tiers never pass their limits while requests churn through them, and disk loads are timed."""

from __future__ import annotations

import asyncio
import random

import pytest

from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, SamplingParams
from tests.nodes.treefactory import MergedReference, balanced_spec, make_random_tree

PROMPTS = ["The patient was admitted with chest pain.", "The contract was signed", "abc", "The scan showed"]
MAX_ACTIVE = 6  # two full chains of depth 3: most requests wait for a running one to release its adapters


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    # 3 + 9 + 36 = 48 nodes, ranks 4/2/2 over q_proj and v_proj: 8x the active slots
    spec = balanced_spec(3, 3, 4, name="wide", ranks=(4, 2, 2), targets=(("q_proj", "v_proj"),) * 3)
    return make_random_tree(tmp_path_factory.mktemp("scale") / "tree", tiny_base_dir, spec)


async def test_many_nodes_through_a_small_cache_stay_within_limits_and_exact(tiny_base_dir, tree):
    nodes = [str(n.node_id) for n in tree.nodes]
    assert len(nodes) == 48
    order = random.Random(0).sample(nodes, len(nodes)) * 2  # every node twice, all distinct in each half
    host_limit = 3 * _adapter_bytes(tiny_base_dir, tree)  # room for about three of the larger adapters
    config = EngineConfig(max_batch_size=8, max_active_adapters=MAX_ACTIVE, host_cache_bytes=host_limit)
    engine = Engine(tiny_base_dir, tree.root, config)
    seen: list = []
    done = asyncio.Event()

    async def watch() -> None:  # the tiers from outside, while the model thread moves adapters
        while not done.is_set():
            seen.append(engine.cache.stats())
            await asyncio.sleep(0.001)

    async def one(i: int, node: str):
        await asyncio.sleep(0.002 * (i % 8))
        request = GenerationRequest(
            node=node, prompt=PROMPTS[i % len(PROMPTS)], params=SamplingParams(max_new_tokens=4)
        )
        return request, await engine.generate(request)

    try:
        watcher = asyncio.create_task(watch())
        runs = await asyncio.gather(*(one(i, node) for i, node in enumerate(order)))
        done.set()
        await watcher
        final = engine.stats().cache
        reference = MergedReference(tiny_base_dir, tree)
        for request, result in runs:
            expected = reference.tokens(request.node, engine.encode(request), 4)
            assert list(result.token_ids) == expected, request.node
    finally:
        engine.close()
    assert len(seen) > 20
    for s in [*seen, final]:
        assert s.active <= MAX_ACTIVE and s.pinned <= s.active
        assert s.host_bytes <= host_limit
    # 48 adapters, each read at least once; at most 10 stay resident between the passes, so the second
    # pass reads most of them again (the passes overlap a little: requests arrive within 14 ms)
    assert final.loads >= 48 + 30 and final.evictions_host > 0 and final.hits_host > 0
    assert 0 < final.load_p50_s <= final.load_p99_s <= final.load_seconds
    assert final.load_seconds >= final.loads * final.load_p50_s / 2  # half the loads took at least the median


def _adapter_bytes(base_dir, tree) -> int:
    """Bytes of the largest adapter of ``tree`` as the cache holds it."""
    from nodes.base.model import load_base
    from nodes.runtime.bank import AdapterBank, prepare_adapter
    from nodes.store.adapters import read_adapter

    base = load_base(base_dir)
    bank = AdapterBank(base.model)
    try:
        return max(
            prepare_adapter(str(n.path), read_adapter(n.directory), bank.shapes, bank.dtype).nbytes for n in tree.nodes
        )
    finally:
        bank.unwrap()
