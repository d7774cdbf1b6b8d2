"""n choices from one prefill; presence/frequency penalties and logit bias exactly as OpenAI's formula;
rows without these features keep their tokens whatever their neighbours do."""

from __future__ import annotations

import asyncio

import pytest
import torch

from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import FinishReason, GenerationRequest, ResponseFormat, SamplingParams
from nodes.runtime.sampling import choice_seed, penalised_scores
from tests.nodes.treefactory import MergedReference, make_random_tree

PROMPTS = ["The patient was admitted with chest pain.", "The contract was signed", "abc"]


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("choices") / "tree", tiny_base_dir)


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tree):
    return MergedReference(tiny_base_dir, tree)


@pytest.fixture(scope="module")
def engine(tiny_base_dir, tree):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=24))
    yield engine
    engine.close()


def req(node, prompt=PROMPTS[0], **params):
    return GenerationRequest(node=node, prompt=prompt, params=SamplingParams(**params))


def penalised_greedy(reference, node, prompt_ids, steps, presence=0.0, frequency=0.0, bias=None, eos=()):
    """Greedy decoding of the merged model with OpenAI's penalties and bias applied step by step, directly."""
    out: list[int] = []
    for _ in range(steps):
        logits = reference.logits(node, prompt_ids + out)
        for token, value in (bias or {}).items():
            logits[token] += value
        for token in set(out):
            count = out.count(token)
            logits[token] -= count * frequency + presence  # (count > 0) here by construction
        token = int(logits.argmax())
        if token in eos:
            break
        out.append(token)
    return out


def test_the_penalty_formula_is_openais():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    counts = torch.randint(0, 4, (3, 50), generator=g).float()
    frequency = torch.tensor([[0.5], [-1.0], [2.0]])
    presence = torch.tensor([[1.5], [0.25], [-2.0]])
    got = penalised_scores(logits, counts, frequency, presence)
    for r in range(3):
        for j in range(50):
            c = counts[r, j].item()
            want = logits[r, j].item() - c * frequency[r, 0].item() - (1.0 if c > 0 else 0.0) * presence[r, 0].item()
            assert abs(got[r, j].item() - want) < 1e-6


async def test_greedy_n_gives_identical_choices_from_one_prefill(engine, reference, tree):
    node = f"{tree.name}/en/medical/radiology"
    request = req(node, max_new_tokens=9, n=3)
    ids = engine.encode(request)
    before = engine.stats()
    result = await engine.generate(request)
    after = engine.stats()
    expected = reference.tokens(node, ids, 9)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert all(list(c.token_ids) == expected for c in result.choices)
    assert list(result.token_ids) == expected and result.text == result.choices[0].text
    assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == 3 * len(expected)
    # One prefill of the prompt, not three.
    assert after.prompt_tokens - before.prompt_tokens == len(ids)
    assert after.prefill_batches - before.prefill_batches == 1
    assert after.tokens_generated - before.tokens_generated == 3 * len(expected)


async def test_sampled_choices_differ_and_are_reproducible_with_a_seed(engine, tree):
    node = f"{tree.name}/fr/medical"
    params = {"max_new_tokens": 12, "temperature": 1.5, "ignore_eos": True}
    first, second, single = await asyncio.gather(
        engine.generate(req(node, n=4, seed=11, **params)),
        engine.generate(req(node, n=4, seed=11, **params)),
        engine.generate(req(node, n=1, seed=11, **params)),
    )
    tokens = [c.token_ids for c in first.choices]
    assert len(set(tokens)) == 4  # every choice its own sample
    assert tokens == [c.token_ids for c in second.choices]  # and the same again with the same seed
    assert single.token_ids == tokens[0]  # choice 0 keeps the request's seed: n=1 behaves as before
    alone = await engine.generate(req(node, n=4, seed=11, **params))
    assert [c.token_ids for c in alone.choices] == tokens
    assert len({choice_seed(11, i) for i in range(16)}) == 16


async def test_streamed_choices_reassemble_into_the_result(engine, tree):
    request = req(f"{tree.name}/en/legal", PROMPTS[1], max_new_tokens=8, n=3, temperature=1.0, seed=5)
    chunks = [c async for c in engine.stream(request)]
    result = await engine.generate(request)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for choice in result.choices:
        mine = [c for c in chunks if c.choice == choice.index]
        assert [t for c in mine for t in c.token_ids] == list(choice.token_ids)
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert [c.usage for c in chunks if c.usage] == [result.usage] and chunks[-1].usage == result.usage


@pytest.mark.parametrize(
    "presence, frequency, bias",
    [(1.5, 0.0, None), (0.0, 0.9, None), (0.7, 1.3, None), (-0.5, -0.5, None), (0.0, 0.0, "boost"), (1.0, 0.5, "ban")],
)
async def test_penalties_and_bias_steer_greedy_decoding_exactly(engine, reference, tree, presence, frequency, bias):
    node = f"{tree.name}/en/medical"
    plain = req(node, PROMPTS[0], max_new_tokens=14)
    ids = engine.encode(plain)
    free = reference.tokens(node, ids, 14)
    if bias == "boost":
        bias = {free[1]: 6.0, 17: 3.5}
    elif bias == "ban":
        bias = {free[0]: -100.0}
    request = req(
        node,
        PROMPTS[0],
        max_new_tokens=14,
        presence_penalty=presence,
        frequency_penalty=frequency,
        logit_bias=bias or {},
    )

    # Neighbours that leave and join mid-way: the batch (and its penalty counts) is rebuilt several times.
    async def late(delay, n):
        await asyncio.sleep(delay)
        return await engine.generate(req(f"{tree.name}/fr", PROMPTS[2], max_new_tokens=n, presence_penalty=0.5))

    result, *_ = await asyncio.gather(
        engine.generate(request),
        *(engine.generate(req(f"{tree.name}/en/legal", PROMPTS[1], max_new_tokens=n)) for n in (2, 5, 9)),
        late(0.01, 4),
    )
    expected = penalised_greedy(reference, node, ids, 14, presence, frequency, bias, eos=engine._scheduler.eos_ids)
    assert list(result.token_ids) == expected
    assert expected != free  # the settings changed the output, so the comparison means something


async def test_rows_without_features_are_unchanged_by_rows_with_them(engine, reference, tree):
    schema = ResponseFormat("json_schema", '{"type":"object","properties":{"a":{"enum":["x","y"]}},"required":["a"]}')
    nodes = [tree.name] + [str(n.node_id) for n in tree.nodes]
    featured = [
        {"n": 3, "temperature": 1.2, "seed": 1},
        {"presence_penalty": 2.0, "frequency_penalty": 2.0},
        {"logit_bias": {5: 100.0}},
        {"logprobs": True, "top_logprobs": 20, "echo": True},
        {"response_format": schema, "max_new_tokens": 30},
        {"n": 2, "max_new_tokens": 0, "echo": True, "logprobs": True},
    ]
    plain = [req(node, PROMPTS[i % 3], max_new_tokens=10) for i, node in enumerate(nodes)]
    others = [
        req(nodes[i % len(nodes)], PROMPTS[i % 3], **({"max_new_tokens": 10} | f)) for i, f in enumerate(featured)
    ]
    mixed = [x for pair in zip(plain, others, strict=False) for x in pair] + plain[len(others) :]
    results = await asyncio.gather(*(engine.generate(r) for r in mixed))
    by_id = {r.request_id: r for r in results}
    for request in plain:
        ids = engine.encode(request)
        assert list(by_id[request.request_id].token_ids) == reference.tokens(request.node, ids, 10)
    assert by_id[others[2].request_id].token_ids == (5,) * 10
    assert by_id[others[4].request_id].finish_reason == FinishReason.STOP
    stats = engine.stats()
    assert stats.active_requests == 0 and stats.tokens_in_flight == 0 and stats.cache.pinned == 0


async def test_cancelling_a_request_ends_all_its_choices_and_frees_their_rows(engine, tree):
    before = engine.stats()
    request = req(f"{tree.name}/en", PROMPTS[0], max_new_tokens=400, n=3, ignore_eos=True, temperature=1.0, seed=2)
    stream = engine.stream(request)
    got = [await stream.__anext__() for _ in range(4)]
    await stream.aclose()  # the client went away
    follow = await engine.generate(req(f"{tree.name}/fr", PROMPTS[1], max_new_tokens=3))
    assert follow.usage.completion_tokens > 0 and len(got) == 4
    after = engine.stats()
    assert after.cancelled == before.cancelled + 1 and after.active_requests == 0
    assert after.tokens_in_flight == 0 and after.cache.pinned == 0
    assert after.tokens_generated - before.tokens_generated < 3 * 400
