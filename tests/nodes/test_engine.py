"""The engine: mixed batches of different chains give each node's merged-model tokens; streaming,
chat, stop strings, sampling, usage and node versions."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes.errors import IntegrityError, UnknownNode
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from tests.nodes.treefactory import MergedReference, make_random_tree

PROMPTS = [
    "The patient was admitted with chest pain.",
    "The contract was signed",
    "TreeLM serves a tree of language models. The base model sits at the root;",
    "abc",
    "The radiologist reviewed the scan. The",
]


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("engine") / "tree", tiny_base_dir)


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tree):
    return MergedReference(tiny_base_dir, tree)


@pytest.fixture(scope="module")
def engine(tiny_base_dir, tree):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=5))
    yield engine
    engine.close()


def all_nodes(tree) -> list[str]:
    return [tree.name] + [str(n.node_id) for n in tree.nodes]


def check_greedy(engine, reference, request, result):
    ids = engine.encode(request)
    expected = reference.tokens(request.node, ids, request.params.max_new_tokens)
    assert list(result.token_ids) == expected, f"{request.node}: {request.prompt!r}"
    ended_early = len(expected) < request.params.max_new_tokens
    assert result.finish_reason == (FinishReason.STOP if ended_early else FinishReason.LENGTH)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), len(expected))
    chain = engine.tree.chain(request.node)
    assert result.node_version == (chain[-1].version if chain else 0)
    assert result.text == engine.tokenizer.decode(expected, skip_special_tokens=True)


async def run_mix(engine, mix):
    """mix: [(node, prompt, max_new_tokens, delay_s)]; requests arrive staggered, so rows join mid-flight."""

    async def one(node, prompt, n, delay):
        await asyncio.sleep(delay)
        request = GenerationRequest(node=node, prompt=prompt, params=SamplingParams(max_new_tokens=n))
        return request, await engine.generate(request)

    return await asyncio.gather(*(one(*m) for m in mix))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mixed_batches_match_each_nodes_merged_model(engine, reference, tree, data):
    request = st.tuples(
        st.sampled_from(all_nodes(tree)),
        st.sampled_from(PROMPTS),
        st.integers(1, 14),
        st.sampled_from([0.0, 0.0, 0.002, 0.01]),
    )
    mix = data.draw(st.lists(request, min_size=1, max_size=12), label="mix")
    before = engine.stats()
    for req, result in asyncio.run(run_mix(engine, mix)):
        check_greedy(engine, reference, req, result)
    after = engine.stats()
    assert after.completed - before.completed == len(mix)
    assert after.active_requests == 0 and after.tokens_in_flight == 0 and after.cache.pinned == 0


def test_a_full_mix_of_every_node_and_the_base_in_one_batch(engine, reference, tree):
    rng = random.Random(7)
    nodes = all_nodes(tree) * 2
    mix = [(node, rng.choice(PROMPTS), rng.randint(4, 12), 0.0) for node in nodes]
    before = engine.stats()
    for req, result in asyncio.run(run_mix(engine, mix)):
        check_greedy(engine, reference, req, result)
    after = engine.stats()
    # Rows shared decode steps: far fewer steps than tokens.
    assert after.decode_steps - before.decode_steps < (after.tokens_generated - before.tokens_generated) / 2


async def test_a_short_request_joins_and_leaves_a_running_batch(engine, reference, tree):
    long = GenerationRequest(
        node=f"{tree.name}/en/medical/radiology",
        prompt=PROMPTS[0],
        params=SamplingParams(max_new_tokens=300, ignore_eos=True),
    )
    short = GenerationRequest(
        node=f"{tree.name}/fr/medical", prompt=PROMPTS[1], params=SamplingParams(max_new_tokens=6)
    )
    seen = 0
    short_task = None
    async for chunk in engine.stream(long):
        seen += len(chunk.token_ids)
        if short_task is None:
            short_task = asyncio.ensure_future(engine.generate(short))
        elif short_task.done() and seen < 300:
            break  # the short request finished while the long one was still generating
    else:
        pytest.fail("the short request did not finish while the long one ran")
    check_greedy(engine, reference, short, short_task.result())


async def test_streaming_gives_the_same_tokens_text_and_usage(engine, reference, tree):
    for node in (f"{tree.name}/en/medical", tree.name, f"{tree.name}/en/legal/contracts"):
        request = GenerationRequest(node=node, prompt=PROMPTS[2], params=SamplingParams(max_new_tokens=12))
        chunks = [c async for c in engine.stream(request)]
        result = await engine.generate(request)
        check_greedy(engine, reference, request, result)
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason == result.finish_reason
        assert [t for c in chunks for t in c.token_ids] == list(result.token_ids)
        assert "".join(c.text for c in chunks) == result.text
        assert chunks[-1].usage == result.usage and chunks[-1].timings is not None
        assert {c.node_version for c in chunks} == {result.node_version}
        assert all(c.request_id == request.request_id for c in chunks)
    # Versions come from node.json (the factory gives en/medical version 3); the base answers as 0.
    assert result.node_version == 1
    t = chunks[-1].timings
    assert 0 <= t.queue_s <= t.ttft_s <= t.total_s


async def test_chat_messages_go_through_the_chat_template(engine, reference, tree):
    messages = (ChatMessage("system", "You are terse."), ChatMessage("user", "Describe the scan."))
    request = GenerationRequest(
        node=f"{tree.name}/en/medical", messages=messages, params=SamplingParams(max_new_tokens=8)
    )
    expected_text = engine.tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, tokenize=False
    )
    assert expected_text.endswith("<|im_start|>assistant\n")
    ids = engine.encode(request)
    assert ids == engine.tokenizer(expected_text, add_special_tokens=False).input_ids
    result = await engine.generate(request)
    check_greedy(engine, reference, request, result)
    assert result.node_version == 3


async def test_stop_strings_end_the_text_before_them(engine, reference, tree):
    node = f"{tree.name}/en"
    free = await engine.generate(
        GenerationRequest(node=node, prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=16, ignore_eos=True))
    )
    text = free.text
    assert len(text) >= 6
    stop = text[3:5]
    cut = text.find(stop)
    request = GenerationRequest(
        node=node, prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=16, stop=(stop,), ignore_eos=True)
    )
    result = await engine.generate(request)
    assert result.finish_reason == FinishReason.STOP and result.text == text[:cut]
    assert list(result.token_ids) == list(free.token_ids[: len(result.token_ids)])
    streamed = [c async for c in engine.stream(request)]
    assert "".join(c.text for c in streamed) == text[:cut] and streamed[-1].finish_reason == FinishReason.STOP


async def test_sampling_is_per_row_and_reproducible_with_a_seed(engine, tree):
    node = f"{tree.name}/fr/medical"

    def req(**params):
        return GenerationRequest(
            node=node, prompt=PROMPTS[3], params=SamplingParams(max_new_tokens=10, ignore_eos=True, **params)
        )

    greedy = await engine.generate(req())
    # Sampled rows and a greedy row in the same batch: each keeps its own settings and RNG.
    runs = await asyncio.gather(
        engine.generate(req(temperature=1.5, seed=1)),
        engine.generate(req(temperature=1.5, seed=1)),
        engine.generate(req(temperature=1.5, seed=2)),
        engine.generate(req(temperature=1.5, seed=3)),
        engine.generate(req()),
        engine.generate(req(temperature=0.9, top_k=1, seed=5)),
        engine.generate(req(temperature=0.9, top_p=1e-9, seed=6)),
    )
    assert runs[0].token_ids == runs[1].token_ids
    assert len({runs[0].token_ids, runs[2].token_ids, runs[3].token_ids}) > 1
    assert runs[4].token_ids == greedy.token_ids
    assert runs[5].token_ids == greedy.token_ids  # top_k=1 keeps only the argmax
    assert runs[6].token_ids == greedy.token_ids  # a tiny nucleus keeps only the argmax
    alone = await engine.generate(req(temperature=1.5, seed=1))
    assert alone.token_ids == runs[0].token_ids


def test_stats_report_the_engine_and_its_cache(engine, tree):
    mix = [(node, PROMPTS[0], 1, 0.0) for node in all_nodes(tree)]
    asyncio.run(run_mix(engine, mix))
    stats = engine.stats()
    flat = stats.as_dict()
    for key in (
        "queue_depth",
        "active_requests",
        "tokens_in_flight",
        "completed",
        "cache_loads",
        "cache_hits_active",
        "cache_evictions_active",
        "cache_pinned",
        "cache_active",
        "cache_load_p99_s",
    ):
        assert key in flat
    assert stats.cache.loads == stats.cache.active == 8  # every node loaded (verified) once, all still active
    assert stats.cache.hits_active > 0 and stats.failed == 0 and not stats.closed
    assert 0 < stats.cache.load_p50_s <= stats.cache.load_p99_s <= stats.cache.load_seconds


async def test_preload_loads_and_verifies_ahead_of_traffic(tiny_base_dir, tmp_path):
    tree = make_random_tree(tmp_path / "tree", tiny_base_dir)
    file = tree.node(f"{tree.name}/fr").directory / "adapter_model.safetensors"
    async with Engine(tiny_base_dir, tree.root, EngineConfig(max_active_adapters=3)) as engine:
        await engine.preload([f"{tree.name}/en/medical/radiology", f"{tree.name}/en/legal"])
        s = engine.stats().cache
        assert (s.loads, s.active, s.host, s.pinned) == (4, 3, 1, 0)  # 4 adapters, 3 slots: the oldest went to host
        assert engine.cache.tier_of("en/medical") == "host" and engine.cache.tier_of("en/legal") == "active"
        with pytest.raises(UnknownNode):
            await engine.preload([f"{tree.name}/de"])
        file.write_bytes(file.read_bytes()[:-1] + b"\0")
        with pytest.raises(IntegrityError):
            await engine.preload([f"{tree.name}/fr"])
        result = await engine.generate(GenerationRequest(node=f"{tree.name}/en/legal", prompt=PROMPTS[0]))
        assert result.usage.completion_tokens > 0 and engine.stats().cache.loads == 4
