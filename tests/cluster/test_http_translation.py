"""The HTTP layer's pure pieces, without a server: node@version parsing, pydantic errors as typed
errors, error bodies renamed to the endpoint's parameters, legacy logprobs and their offsets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.errors import BadArgument, MalformedRequest, RequestTooLarge, UnknownParameter, VersionNotServed
from cluster.http.errors import error_body, validation_error
from cluster.http.protocol import ChatCompletionRequest, CompletionRequest
from cluster.http.serving.chat import ChatServing
from cluster.http.serving.completion import _Offsets, legacy_logprobs
from cluster.service.admission import NodeRef
from nodes.errors import InvalidRequest, QueueFull
from nodes.runtime.requests import TokenLogprob


@pytest.mark.parametrize(
    "text, node, version",
    [
        ("demo", "demo", None),
        ("demo/en/medical", "demo/en/medical", None),
        (" demo/en/medical/ ", "demo/en/medical", None),
        ("demo/en/medical@2", "demo/en/medical", 2),
        ("demo@0", "demo", 0),
    ],
)
def test_a_node_ref_is_a_node_id_with_an_optional_version(text, node, version):
    ref = NodeRef.parse(text, "model")
    assert (ref.node, ref.version) == (node, version)
    assert NodeRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text", ["", "  ", "demo/en@", "demo/en@v2", "demo/en@-1", "demo/en@1.5", "Demo/EN", "demo//x", 7]
)
def test_a_malformed_node_ref_names_the_field(text):
    with pytest.raises(BadArgument) as error:
        NodeRef.parse(text, "model")
    assert error.value.field == "model"


def _invalid(schema, body: str):
    with pytest.raises(ValidationError) as error:
        schema.model_validate_json(body)
    return validation_error(error.value)


def test_pydantic_errors_become_typed_errors_naming_openai_parameters():
    assert isinstance(_invalid(ChatCompletionRequest, "{"), MalformedRequest)
    assert isinstance(_invalid(ChatCompletionRequest, '"text"'), MalformedRequest)
    unknown = _invalid(ChatCompletionRequest, '{"model": "m", "messages": [], "functions": []}')
    assert (
        isinstance(unknown, UnknownParameter)
        and unknown.field == "functions"
        and "text generation only" in str(unknown)
    )
    nested = _invalid(CompletionRequest, '{"model": "m", "prompt": "p", "stream_options": {"include_usage": "yes"}}')
    assert isinstance(nested, BadArgument) and nested.field == "stream_options.include_usage"
    union = _invalid(CompletionRequest, '{"model": "m", "prompt": {"a": 1}}')
    assert union.field == "prompt" and "wrong type (dict)" in str(union)
    part = _invalid(
        ChatCompletionRequest, '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}'
    )
    assert part.field == "messages[0].content[0].text"


def test_error_bodies_rename_engine_fields_to_the_endpoint_s_parameters():
    body = ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5}'
    )
    status, error = error_body(InvalidRequest("max_new_tokens", "too many"), ChatServing.fields(body))
    assert status == 400 and (error.error.param, error.error.message) == (
        "max_completion_tokens",
        "max_completion_tokens: too many",
    )
    status, error = error_body(InvalidRequest("response_format.schema", "bad"), ChatServing.fields(None))
    assert error.error.param == "response_format.json_schema.schema"
    assert error_body(QueueFull("full"))[0] == 429
    status, error = error_body(VersionNotServed("demo/en", 2, 3))
    assert (status, error.error.code, error.error.type) == (409, "version_not_served", "invalid_request_error")
    status, error = error_body(RequestTooLarge(1024))
    assert (status, error.error.code, error.error.param) == (413, "request_too_large", None)


def _token(raw: bytes, logprob: float | None = -1.0, top: tuple = ()) -> TokenLogprob:
    return TokenLogprob(token_id=0, token=raw.decode("utf-8", "replace"), token_bytes=raw, logprob=logprob, top=top)


def test_legacy_logprobs_have_openai_s_parallel_lists_and_character_offsets():
    alt = (_token(b"x", -0.5), _token(b"y", -1.5))
    entries = [_token(b"ab", None), _token(b"\xc3"), _token(b"\xa9", -2.0, alt), _token(b" d")]
    out = legacy_logprobs(entries, _Offsets())
    assert out.tokens == ["ab", "\ufffd", "\ufffd", " d"]
    assert out.token_logprobs == [None, -1.0, -2.0, -1.0]
    assert out.top_logprobs == [None, {}, {"x": -0.5, "y": -1.5}, {}]
    assert out.text_offset == [0, 2, 2, 3]  # "abé d": the split é starts at 2 for both halves
    broken = legacy_logprobs([_token(b"\xe2"), _token(b"a")], _Offsets())
    assert broken.text_offset == [0, 1]  # "\ufffda": a byte that never became a character counts as one
