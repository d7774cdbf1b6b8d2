"""Coalesced streams: a reader that falls behind gets the waiting tokens merged, per choice, and
the same tokens, text, logprobs and ending as without coalescing."""

from __future__ import annotations

import asyncio

import pytest

from nodes.runtime.chunks import merge_chunks
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, SamplingParams, TokenChunk
from tests.nodes.treefactory import make_random_tree


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("chunks") / "tree", tiny_base_dir)


def _chunk(index: int, choice: int = 0, finish=None, echo=None) -> TokenChunk:
    return TokenChunk(
        request_id="r",
        text=f"t{index}",
        token_ids=(index,),
        index=index,
        choice=choice,
        finish_reason=finish,
        echo=echo,
    )


def test_each_choice_merges_in_order_and_other_items_end_the_merging():
    marker = object()
    items = [
        _chunk(0),
        _chunk(1, choice=1),
        _chunk(2),
        _chunk(3, choice=1, finish="length"),
        _chunk(4, choice=1),  # after its choice's end: not merged into it
        marker,
        _chunk(5),
        _chunk(6, finish="stop"),
    ]
    merged = merge_chunks(items)
    # Each merged chunk where its last member was: choice 0's (0, 2) at 2, choice 1's (1, 3) at 3.
    assert [getattr(m, "token_ids", m) for m in merged] == [(0, 2), (1, 3), (4,), marker, (5, 6)]
    assert [getattr(m, "index", None) for m in merged] == [0, 1, 4, None, 5]
    assert merged[1].finish_reason == "length" and merged[0].text == "t0t2" and merged[4].finish_reason == "stop"
    late = merge_chunks([_chunk(0, choice=1), _chunk(1), _chunk(2, choice=1, finish="stop")])
    assert [m.token_ids for m in late] == [(1,), (0, 2)]  # the chunk that ends the request stays last
    assert merge_chunks([]) == [] and merge_chunks([_chunk(7)]) == [_chunk(7)]


async def _read(engine: Engine, request: GenerationRequest, *, coalesce: bool, pause: float) -> list[TokenChunk]:
    out = []
    async for chunk in engine.stream(request, coalesce=coalesce):
        out.append(chunk)
        await asyncio.sleep(pause)  # a reader slower than the model: tokens wait for it
    return out


@pytest.mark.parametrize("n", [1, 2])
async def test_a_slow_reader_gets_fewer_chunks_with_the_same_answer(tiny_base_dir, tree, n):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, n=n, logprobs=True, temperature=0.0)
    request = GenerationRequest(node=f"{tree.name}/en/medical/radiology", prompt="The scan shows", params=params)
    with Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4)) as engine:
        whole = await engine.generate(request)
        plain = await _read(engine, request, coalesce=False, pause=0.05)
        merged = await _read(engine, request, coalesce=True, pause=0.05)
    assert len(plain) == 24 * n and len(merged) < len(plain) / 2
    assert [c.index for c in merged] == list(range(len(merged)))  # each chunk's position in the stream
    assert merged[-1].usage == plain[-1].usage and merged[-1].usage is not None
    for choice in range(n):
        ours = [c for c in merged if c.choice == choice]
        assert sum((c.token_ids for c in ours), ()) == whole.choices[choice].token_ids
        assert "".join(c.text for c in ours) == whole.choices[choice].text
        assert [t.token_id for c in ours for t in c.logprobs or ()] == list(whole.choices[choice].token_ids)
        assert [c.finish_reason for c in ours].count("length") == 1 and ours[-1].finish_reason == "length"
