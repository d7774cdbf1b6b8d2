"""Prompt-prefix reuse: exact (the merged model's greedy tokens), only for the same chain at the same
versions, bounded by bytes with LRU eviction."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.prefix import PrefixCache, chain_key
from nodes.runtime.requests import GenerationRequest, SamplingParams
from tests.nodes.treefactory import MergedReference, make_random_tree

SYSTEM = "You are the clinic's assistant. Answer briefly and cite the guideline you use. " * 4


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("prefix") / "tree", tiny_base_dir)


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tree):
    return MergedReference(tiny_base_dir, tree)


def _request(node: str, question: str) -> GenerationRequest:
    return GenerationRequest(node=node, prompt=SYSTEM + question, params=SamplingParams(max_new_tokens=6))


async def _run(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    out = []
    for r in requests:  # one after another: each later prompt can find what the earlier ones left
        out.append(list((await engine.generate(r)).token_ids))
    return out


async def test_reuse_is_exact_and_only_for_the_same_chain(tiny_base_dir, tree, reference):
    med, rad = f"{tree.name}/en/medical", f"{tree.name}/en/medical/radiology"
    requests = [
        _request(med, "What is the dose?"),
        _request(med, "Who signs the form?"),  # same chain, same system prompt: reused
        _request(rad, "What is the dose?"),  # a child: another chain, never reused
        _request(tree.name, "What is the dose?"),  # the base alone
        _request(rad, "When is the review?"),  # reuses what radiology left
    ]
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4))
    try:
        assert len(engine.encode(requests[0])) > 64  # the shared part spans blocks
        got = await _run(engine, requests)
        stats = engine.stats()
    finally:
        engine.close()
    for r, tokens in zip(requests, got, strict=True):
        assert tokens == reference.tokens(r.node, engine.encode(r), 6)
    assert stats.prefix_hits == 2 and stats.prefix_tokens_reused >= 2 * 64 and stats.prefix_bytes > 0
    off = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4, prefix_cache_bytes=0))
    try:
        assert await _run(off, requests) == got
        assert off.stats().prefix_hits == 0 and off.stats().prefix_bytes == 0
    finally:
        off.close()


async def test_concurrent_requests_share_a_prefix_exactly(tiny_base_dir, tree, reference):
    med = f"{tree.name}/en/medical"
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=8))
    try:
        await engine.generate(_request(med, "Warm up."))
        batch = [_request(med, f"Question {i}?") for i in range(6)]
        results = await asyncio.gather(*(engine.generate(r) for r in batch))
        assert engine.stats().prefix_hits == 6
    finally:
        engine.close()
    for r, result in zip(batch, results, strict=True):
        assert list(result.token_ids) == reference.tokens(r.node, engine.encode(r), 6)


@dataclass
class _Node:
    cache_key: str
    version: int
    sha256: dict[str, str] = field(default_factory=dict)


def test_the_key_changes_with_a_version_an_adapter_file_or_the_base():
    v2 = [_Node("en", 1), _Node("en/medical", 2, {"a.safetensors": "aa"})]
    assert chain_key("base", v2) == chain_key("base", [_Node("en", 1), _Node("en/medical", 2, {"a.safetensors": "aa"})])
    assert chain_key("base", v2) != chain_key("base", [_Node("en", 1), _Node("en/medical", 3, {"a.safetensors": "aa"})])
    assert chain_key("base", v2) != chain_key("base", [_Node("en", 1), _Node("en/medical", 2, {"a.safetensors": "bb"})])
    assert chain_key("base", v2) != chain_key("other", v2)
    assert chain_key("base", v2) != chain_key("base", [_Node("en", 1), _Node("en/legal", 2, {"a.safetensors": "aa"})])


def _kv(length: int, value: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.full((1, 2, length, 4), value)], [torch.full((1, 2, length, 4), -value)]


def test_lookup_takes_the_longest_stored_block_and_checks_the_tokens():
    cache = PrefixCache(1 << 20, block=4)
    prompt = list(range(11))  # blocks end at 4 and 8; the 11th token is always computed
    cache.store("c", prompt, *_kv(11))
    hit = cache.lookup("c", [*range(8), 99, 98])
    assert hit is not None and hit.length == 8 and hit.keys[0].shape == (1, 2, 8, 4)
    assert cache.lookup("c", [0, 1, 2, 3, 7, 7, 7, 7, 7]).length == 4  # only the first block is shared
    assert cache.lookup("c", [9, 1, 2, 3, 4]) is None and cache.lookup("other", prompt) is None
    assert cache.lookup("c", list(range(4))) is None  # nothing would be left to compute
    assert (cache.hits, cache.misses, cache.tokens_reused) == (2, 3, 12)


def test_entries_are_evicted_least_recently_used_within_the_byte_bound():
    one = 2 * 2 * 8 * 4 * 4  # keys + values of an 8-token prefix, float32
    cache = PrefixCache(2 * one, block=8)
    for first in (0, 100, 200):
        cache.store("c", [first, *range(1, 9)], *_kv(9))
        if first == 100:
            assert cache.lookup("c", [0, *range(1, 9)]) is not None  # touch the first: the second is older now
    stats = cache.stats()
    assert stats.entries == 2 and stats.bytes == 2 * one and stats.evictions == 1
    assert cache.lookup("c", [100, *range(1, 9)]) is None
    assert cache.lookup("c", [0, *range(1, 9)]) is not None and cache.lookup("c", [200, *range(1, 9)]) is not None
    assert PrefixCache(0).lookup("c", list(range(100))) is None  # off


@pytest.mark.parametrize(("value", "want"), [("256MiB", 256 << 20), ("0", 0), ("off", 0), (" OFF ", 0)])
def test_serve_takes_a_prefix_cache_size_or_off(tmp_path, value, want):
    from cluster.service.standalone import StandaloneOptions

    assert StandaloneOptions(tmp_path, prefix_cache=value).prefix_cache_bytes == want


def test_serve_refuses_a_prefix_cache_that_is_not_a_size(tmp_path):
    from cluster.errors import ServeError
    from cluster.service.standalone import StandaloneOptions

    with pytest.raises(ServeError, match="--prefix-cache 'lots' is not a size"):
        StandaloneOptions(tmp_path, prefix_cache="lots")
