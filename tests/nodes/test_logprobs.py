"""Logprobs and echo: the engine's numbers are log_softmax of each node's merged model (to 1e-4),
computed inside mixed batches where other nodes' rows do other things."""

from __future__ import annotations

import asyncio

import pytest

from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from tests.nodes.treefactory import MergedReference, make_random_tree

PROMPTS = [
    "The patient was admitted with chest pain.",
    "The contract was signed",
    "TreeLM serves a tree of language models. The base model sits at the root;",
    "abc",
]
TOL = 1e-4


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("logprobs") / "tree", tiny_base_dir)


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tree):
    return MergedReference(tiny_base_dir, tree)


@pytest.fixture(scope="module")
def engine(tiny_base_dir, tree):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=16))
    yield engine
    engine.close()


def check_top(entry, row, k):
    """``entry.top``: the k most likely tokens at this position, best first, with the reference's values."""
    assert len(entry.top) == k
    best = row.topk(k).values.tolist() if k else []
    for alt, value in zip(entry.top, best, strict=True):
        assert abs(alt.logprob - value) < TOL
        assert abs(alt.logprob - row[alt.token_id].item()) < TOL
    assert [a.logprob for a in entry.top] == sorted((a.logprob for a in entry.top), reverse=True)


def check_logprobs(engine, reference, request, result):
    """Prompt (echo) and completion logprobs against the merged model of the request's node."""
    params = request.params
    prompt = engine.encode(request)
    expected = reference.log_softmax(request.node, prompt + list(result.token_ids))
    if params.echo:
        echo = result.echo
        assert list(echo.token_ids) == prompt
        if params.logprobs:
            assert len(echo.logprobs) == len(prompt) and echo.logprobs[0].logprob is None
            assert echo.logprobs[0].top == ()
            for t in range(1, len(prompt)):
                entry = echo.logprobs[t]
                assert entry.token_id == prompt[t]
                assert abs(entry.logprob - expected[t - 1, prompt[t]].item()) < TOL, (request.node, t)
                check_top(entry, expected[t - 1], params.top_logprobs)
        else:
            assert echo.logprobs is None
    else:
        assert result.echo is None
    if not params.logprobs:
        assert result.logprobs is None
        return
    assert [e.token_id for e in result.logprobs] == list(result.token_ids)
    for i, entry in enumerate(result.logprobs):
        row = expected[len(prompt) - 1 + i]
        assert abs(entry.logprob - row[entry.token_id].item()) < TOL, (request.node, i)
        check_top(entry, row, params.top_logprobs)
    # The bytes of the tokens rebuild the text (OpenAI's `bytes`).
    assert b"".join(e.token_bytes for e in result.logprobs).decode("utf-8", errors="replace") == result.text


def all_nodes(tree) -> list[str]:
    return [tree.name] + [str(n.node_id) for n in tree.nodes]


async def test_logprobs_and_echo_equal_each_merged_model_inside_a_mixed_batch(engine, reference, tree):
    nodes = all_nodes(tree)
    requests = []
    for i, node in enumerate(nodes * 2):
        prompt = PROMPTS[i % len(PROMPTS)]
        kind = i % 4
        if kind == 0:  # plain greedy rows beside the others: their tokens must not change
            params = SamplingParams(max_new_tokens=8)
        elif kind == 1:
            params = SamplingParams(max_new_tokens=8, logprobs=True, top_logprobs=i % 6)
        elif kind == 2:
            params = SamplingParams(max_new_tokens=6, logprobs=True, top_logprobs=20, echo=True)
        else:  # a sampled row with penalties: logprobs are still the model's own, before any of that
            params = SamplingParams(
                max_new_tokens=7, temperature=1.3, seed=i, logprobs=True, top_logprobs=3, presence_penalty=1.0
            )
        requests.append(GenerationRequest(node=node, prompt=prompt, params=params))
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    for request, result in zip(requests, results, strict=True):
        check_logprobs(engine, reference, request, result)
        if not request.params.logprobs:
            ids = engine.encode(request)
            assert list(result.token_ids) == reference.tokens(request.node, ids, request.params.max_new_tokens)


async def test_echo_with_zero_new_tokens_scores_a_prompt(engine, reference, tree):
    node = f"{tree.name}/en/medical/radiology"
    scoring = [
        GenerationRequest(node=node, prompt=p, params=SamplingParams(max_new_tokens=0, echo=True, logprobs=True))
        for p in PROMPTS
    ]
    generating = GenerationRequest(node=f"{tree.name}/fr", prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=9))
    before = engine.stats()
    *scores, generated = await asyncio.gather(*(engine.generate(r) for r in [*scoring, generating]))
    for request, result in zip(scoring, scores, strict=True):
        assert result.finish_reason == FinishReason.LENGTH and result.token_ids == () and result.text == ""
        assert result.usage.completion_tokens == 0 and result.usage.prompt_tokens == len(engine.encode(request))
        assert result.echo.text == request.prompt
        check_logprobs(engine, reference, request, result)
    assert list(generated.token_ids) == reference.tokens(generating.node, engine.encode(generating), 9)
    after = engine.stats()
    assert after.completed - before.completed == len(scoring) + 1 and after.tokens_in_flight == 0
    assert after.decode_steps - before.decode_steps <= 9  # the scoring rows never decoded


async def test_echo_without_logprobs_and_of_a_chat_prompt(engine, reference, tree):
    messages = (ChatMessage("user", "Describe the scan."),)
    request = GenerationRequest(
        node=f"{tree.name}/en/medical", messages=messages, params=SamplingParams(max_new_tokens=4, echo=True)
    )
    result = await engine.generate(request)
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe the scan."}], add_generation_prompt=True, tokenize=False
    )
    assert result.echo.text == rendered and result.echo.logprobs is None
    check_logprobs(engine, reference, request, result)
    ids = engine.encode(request)
    assert list(result.token_ids) == reference.tokens(request.node, ids, 4)


async def test_streamed_logprobs_and_echo_match_the_result(engine, reference, tree):
    params = SamplingParams(max_new_tokens=10, logprobs=True, top_logprobs=2, echo=True, n=2)
    request = GenerationRequest(node=f"{tree.name}/en/legal/contracts", prompt=PROMPTS[2], params=params)
    chunks = [c async for c in engine.stream(request)]
    result = await engine.generate(request)
    assert chunks[0].echo == result.echo and chunks[0].token_ids == () and chunks[0].index == 0
    assert all(c.echo is None for c in chunks[1:])
    for choice in result.choices:
        mine = [c for c in chunks[1:] if c.choice == choice.index]
        assert [t for c in mine for t in c.token_ids] == list(choice.token_ids)
        streamed = [e for c in mine for e in c.logprobs]
        assert [e.token_id for e in streamed] == list(choice.token_ids)
        for a, b in zip(streamed, choice.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < TOL and [t.token_id for t in a.top] == [t.token_id for t in b.top]
    check_logprobs(engine, reference, request, result)
