"""Bad sampling input: every new field's error names the field, nothing is queued, the engine goes on."""

from __future__ import annotations

import asyncio
import json

import pytest

from nodes.errors import InvalidRequest
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_SCHEMA_BYTES,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
)
from tests.nodes.treefactory import MergedReference, make_random_tree

PROMPT = "The patient was admitted with chest pain."


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("sampling-errors") / "tree", tiny_base_dir)


@pytest.fixture(scope="module")
def engine(tiny_base_dir, tree):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4))
    yield engine
    engine.close()


@pytest.mark.parametrize(
    "params, field",
    [
        ({"n": 0}, "n"),
        ({"n": MAX_CHOICES + 1}, "n"),
        ({"n": True}, "n"),
        ({"n": 2.0}, "n"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: float("inf")}}, "logit_bias"),
        ({"logit_bias": [(1, 2, 3)]}, "logit_bias"),
        ({"logit_bias": 7}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),  # alternatives without logprobs
        ({"echo": 1}, "echo"),
        ({"max_new_tokens": 0}, "max_new_tokens"),  # 0 only with echo
        ({"max_new_tokens": -1, "echo": True}, "max_new_tokens"),
        ({"stop": "end"}, "stop"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_sampling_parameters_name_the_field(params, field):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**params)
    assert info.value.field == field


@pytest.mark.parametrize(
    "kind, schema, field",
    [
        ("json", None, "response_format.type"),
        ("json_schema", None, "response_format.schema"),
        ("json_object", '{"type": "object"}', "response_format.schema"),
        ("json_schema", "{not json", "response_format.schema"),
        ("json_schema", "[1, 2]", "response_format.schema"),
        ("json_schema", {"description": "x" * MAX_SCHEMA_BYTES}, "response_format.schema"),
    ],
)
def test_bad_response_formats_name_the_field(kind, schema, field):
    with pytest.raises(InvalidRequest) as info:
        ResponseFormat(kind, schema)
    assert info.value.field == field


def test_good_values_are_normalised():
    params = SamplingParams(
        logit_bias={"7": 1, 3: -2.5}, presence_penalty=1, n=MAX_CHOICES, top_logprobs=20, logprobs=True
    )
    assert params.logit_bias == ((3, -2.5), (7, 1.0)) and params.presence_penalty == 1.0
    assert ResponseFormat("json_schema", {"b": 1, "a": {}}).schema == '{"a":{},"b":1}'
    assert SamplingParams(max_new_tokens=0, echo=True).max_new_tokens == 0


ENGINE_CASES = {
    "more-choices-than-rows": ({"n": 5}, "n"),
    "bias-outside-the-vocabulary": ({"logit_bias": {400: 1.0}}, "logit_bias"),
    "unknown-schema-type": (
        {"response_format": ResponseFormat("json_schema", {"type": "foo"})},
        "response_format.schema",
    ),
    "unsatisfiable-schema": (
        {"response_format": ResponseFormat("json_schema", {"type": "string", "minLength": 5, "maxLength": 2})},
        "response_format.schema",
    ),
    "dangling-ref": (
        {"response_format": ResponseFormat("json_schema", {"properties": {"a": {"$ref": "#/nope"}}})},
        "response_format.schema",
    ),
    "too-many-tokens-for-n": ({"n": 4, "max_new_tokens": 64}, "max_new_tokens"),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
async def test_the_engine_refuses_what_only_it_can_check_and_queues_nothing(tiny_base_dir, tree, engine, case):
    params, field = ENGINE_CASES[case]
    target = engine
    if case == "too-many-tokens-for-n":  # a small KV budget: one choice fits, four do not
        target = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4, max_tokens_in_flight=150))
        one = await target.generate(GenerationRequest(node=f"{tree.name}/en", prompt=PROMPT, params=SamplingParams()))
        assert one.usage.completion_tokens > 0
    try:
        before = target.stats()
        good = asyncio.ensure_future(
            target.generate(
                GenerationRequest(node=f"{tree.name}/fr", prompt=PROMPT, params=SamplingParams(max_new_tokens=6))
            )
        )
        request = GenerationRequest(node=f"{tree.name}/en/medical", prompt=PROMPT, params=SamplingParams(**params))
        with pytest.raises(InvalidRequest) as info:
            await target.generate(request)
        assert info.value.field == field
        with pytest.raises(InvalidRequest):  # a stream is refused the same way, before any chunk
            async for _ in target.stream(request):
                pytest.fail("a refused request streamed a chunk")
        assert (await good).usage.completion_tokens >= 0
        after = target.stats()
        assert after.submitted == before.submitted + 1 and after.failed == before.failed
        assert after.queue_depth == 0 and after.active_requests == 0
    finally:
        if target is not engine:
            target.close()


async def test_a_bad_schema_does_not_poison_the_cache(engine, tree, tiny_base_dir):
    bad = ResponseFormat("json_schema", {"type": "foo"})
    good = ResponseFormat("json_schema", {"enum": ["a", "b"]})
    for fmt in (bad, good, bad):
        request = GenerationRequest(
            node=f"{tree.name}/en", prompt=PROMPT, params=SamplingParams(max_new_tokens=20, response_format=fmt)
        )
        if fmt is bad:
            with pytest.raises(InvalidRequest):
                await engine.generate(request)
        else:
            assert json.loads((await engine.generate(request)).text) in ("a", "b")
    reference = MergedReference(tiny_base_dir, tree)
    plain = GenerationRequest(node=f"{tree.name}/en", prompt=PROMPT, params=SamplingParams(max_new_tokens=6))
    assert list((await engine.generate(plain)).token_ids) == reference.tokens(plain.node, engine.encode(plain), 6)
