"""The sampling features over gRPC through the SDK, sync and async: n, penalties, logit bias,
logprobs, echo and structured output arrive as the engine produced them, typed."""

from __future__ import annotations

import json

import jsonschema
import pytest

import treelm
from nodes.runtime.requests import GenerationRequest, ResponseFormat, SamplingParams
from tests.cluster.grpc_harness import make_world, serve
from tests.nodes.test_structured import SCHEMAS

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("grpc-features"))
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def server(world):
    s = serve(world)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server, world):
    with treelm.Client(server.target, token=world.tokens["acme"]) as c:
        yield c


async def direct(world, node, prompt, **params):
    return await world.engine.generate(GenerationRequest(node=node, prompt=prompt, params=SamplingParams(**params)))


def same_logprobs(sdk, engine) -> None:
    assert (sdk is None) == (engine is None)
    for a, b in zip(sdk or (), engine or (), strict=True):
        assert (a.token_id, a.token, a.token_bytes) == (b.token_id, b.token, b.token_bytes)
        assert a.logprob == pytest.approx(b.logprob) if b.logprob is not None else a.logprob is None
        assert [(t.token_id, round(t.logprob, 5)) for t in a.top] == [(t.token_id, round(t.logprob, 5)) for t in b.top]


async def test_choices_logprobs_and_echo_arrive_as_the_engine_made_them(client, world):
    params = dict(max_new_tokens=6, n=3, temperature=0.9, seed=11, logprobs=True, top_logprobs=2, echo=True)
    result = client.generate("rt/en/medical", "The patient", **params)
    engine = await direct(world, "rt/en/medical", "The patient", **params)
    assert isinstance(result.choices[0], treelm.Choice) and len(result.choices) == 3
    for got, want in zip(result.choices, engine.choices, strict=True):
        assert (got.index, got.text, got.token_ids, got.finish_reason.value) == (
            want.index,
            want.text,
            want.token_ids,
            want.finish_reason.value,
        )
        same_logprobs(got.logprobs, want.logprobs)
    assert result.text == result.choices[0].text and result.logprobs == result.choices[0].logprobs
    assert isinstance(result.echo, treelm.Echo) and result.echo.token_ids == engine.echo.token_ids
    assert result.echo.text == "The patient" and result.echo.logprobs[0].logprob is None
    same_logprobs(result.echo.logprobs, engine.echo.logprobs)
    assert result.usage.completion_tokens == sum(len(c.token_ids) for c in result.choices)
    scored = client.generate("rt/en/medical", "The patient", max_new_tokens=0, echo=True, logprobs=True)
    assert scored.token_ids == () and scored.logprobs == () and scored.finish_reason is treelm.FinishReason.LENGTH
    plain = client.generate("rt/en/medical", "The patient", max_new_tokens=3)
    assert plain.logprobs is None and plain.echo is None and len(plain.choices) == 1


async def test_penalties_bias_and_structured_output(client, world):
    params = dict(max_new_tokens=8, presence_penalty=1.5, frequency_penalty=-0.5, logit_bias={7: 5.0, 9: -100.0})
    result = client.generate("rt/fr", "abc", **params)
    assert result.token_ids == (await direct(world, "rt/fr", "abc", **params)).token_ids
    schema = SCHEMAS[0]
    for fmt in (schema, {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}):
        structured = client.generate("rt/en", "Answer:", max_new_tokens=120, response_format=fmt)
        jsonschema.validate(json.loads(structured.text), schema)
    anything = client.generate("rt/en", "Answer:", max_new_tokens=200, response_format="json_object")
    want = await direct(world, "rt/en", "Answer:", max_new_tokens=200, response_format=ResponseFormat("json_object"))
    assert anything.text == want.text


async def test_async_streams_interleave_choices_and_end_once(server, world):
    async with treelm.AsyncClient(server.target, token=world.tokens["acme"]) as client:
        chunks = [
            c
            async for c in client.stream(
                "rt/en/legal", "Once", max_new_tokens=5, n=2, temperature=1.0, seed=3, logprobs=True, echo=True
            )
        ]
        result = await client.generate("rt/en/legal", "Once", max_new_tokens=5, n=2, temperature=1.0, seed=3)
    assert chunks[0].echo is not None and chunks[0].echo.text == "Once" and chunks[0].token_ids == ()
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert sum(1 for c in chunks if c.finish_reason is not None) == 2  # each choice ends once
    for choice in result.choices:
        mine = [c for c in chunks if c.choice == choice.index and c.echo is None]
        assert tuple(t for c in mine for t in c.token_ids) == choice.token_ids
        assert [t.token_id for c in mine for t in c.logprobs] == list(choice.token_ids)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"n": 17}, "n"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),  # the SDK wants a bool
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
            "response_format.schema",
        ),
        ({"presence_penalty": 2.5}, "presence_penalty"),
    ],
)
def test_bad_feature_values_name_their_field(client, world, params, field):
    before = world.engine.stats().submitted
    with pytest.raises(treelm.InvalidRequest) as error:
        client.generate("rt/en", "x", **params)
    assert error.value.field == field
    assert world.engine.stats().submitted == before
