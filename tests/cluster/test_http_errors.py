"""Every bad HTTP request gets OpenAI's error shape with the right status, ``param`` and ``code``, and
nothing else changes: no engine request is queued, the registry is as it was."""

from __future__ import annotations

import json

import pytest

from registry.trees import list_nodes
from tests.cluster.grpc_harness import make_world, serve
from tests.cluster.http_harness import call

pytestmark = pytest.mark.timeout(180)

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/chat/completions"
TEXT = "/completions"


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("http-errors"))
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def url(world):
    s = serve(world, http_port=0, max_request_body_bytes=64 * 1024)
    yield s.server.http_url
    s.stop()


def chat(**fields):
    return {"model": "rt/en", "messages": MSG, **fields}


def text(**fields):
    return {"model": "rt/en", "prompt": "hi", **fields}


# (path, body, status, param, code)
CASES = {
    "n-above-the-limit": (CHAT, chat(n=17), 400, "n", "invalid_value"),
    "n-zero": (TEXT, text(n=0), 400, "n", "invalid_value"),
    "n-not-a-number": (CHAT, chat(n="3"), 400, "n", "invalid_value"),
    "top-logprobs-above-20": (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    "top-logprobs-without-logprobs": (CHAT, chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    "completion-logprobs-above-20": (TEXT, text(logprobs=21), 400, "logprobs", "invalid_value"),
    "invalid-json-schema": (
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
        400,
        "response_format.json_schema.schema",
        "invalid_value",
    ),
    "json-schema-without-schema": (
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        400,
        "response_format.json_schema.schema",
        "invalid_value",
    ),
    "unknown-response-format": (
        CHAT,
        chat(response_format={"type": "yaml"}),
        400,
        "response_format.type",
        "invalid_value",
    ),
    "temperature-above-2": (CHAT, chat(temperature=2.5), 400, "temperature", "invalid_value"),
    "temperature-negative": (TEXT, text(temperature=-1), 400, "temperature", "invalid_value"),
    "top-p-zero": (CHAT, chat(top_p=0), 400, "top_p", "invalid_value"),
    "presence-penalty-out-of-range": (CHAT, chat(presence_penalty=3), 400, "presence_penalty", "invalid_value"),
    "logit-bias-not-a-token-id": (CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias", "invalid_value"),
    "logit-bias-outside-the-vocabulary": (CHAT, chat(logit_bias={"400": 1}), 400, "logit_bias", "invalid_value"),
    "logit-bias-too-strong": (TEXT, text(logit_bias={"5": 101}), 400, "logit_bias", "invalid_value"),
    "max-tokens-zero-in-chat": (CHAT, chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    "max-completion-tokens-negative": (
        CHAT,
        chat(max_completion_tokens=-1),
        400,
        "max_completion_tokens",
        "invalid_value",
    ),
    "max-tokens-above-the-engine-limit": (TEXT, text(max_tokens=10**6), 400, "max_tokens", "invalid_value"),
    "max-tokens-zero-without-echo": (TEXT, text(max_tokens=0), 400, "max_tokens", "invalid_value"),
    "stop-not-strings": (CHAT, chat(stop=[1]), 400, "stop[0]", "invalid_value"),
    "no-messages": (CHAT, chat(messages=[]), 400, "messages", "invalid_value"),
    "a-tool-message": (
        CHAT,
        chat(messages=[{"role": "tool", "content": "x"}]),
        400,
        "messages[0].role",
        "invalid_value",
    ),
    "an-image-part": (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content[0].type",
        "invalid_value",
    ),
    "a-user-message-without-content": (
        CHAT,
        chat(messages=[{"role": "user"}]),
        400,
        "messages[0].content",
        "invalid_value",
    ),
    "no-model": (CHAT, {"messages": MSG}, 400, "model", "invalid_value"),
    "a-malformed-model": (CHAT, chat(model="RT/En!"), 400, "model", "invalid_value"),
    "a-malformed-version": (TEXT, text(model="rt/en@latest"), 400, "model", "invalid_value"),
    "an-unknown-parameter": (CHAT, chat(temprature=0), 400, "temprature", "unknown_parameter"),
    "tools": (CHAT, chat(tools=[]), 400, "tools", "unknown_parameter"),
    "suffix": (TEXT, text(suffix="x"), 400, "suffix", "unknown_parameter"),
    "echo-in-chat": (CHAT, chat(echo=True), 400, "echo", "unknown_parameter"),
    "stream-options-without-stream": (
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
        "invalid_value",
    ),
    "token-id-prompts": (TEXT, text(prompt=[1, 2, 3]), 400, "prompt", "invalid_value"),
    "an-empty-prompt-list": (TEXT, text(prompt=[]), 400, "prompt", "invalid_value"),
    "a-prompt-of-the-wrong-type": (TEXT, text(prompt=3), 400, "prompt", "invalid_value"),
    "too-many-prompts": (TEXT, text(prompt=["x"] * 65), 400, "prompt", "invalid_value"),
    "best-of-above-n": (TEXT, text(best_of=3), 400, "best_of", "invalid_value"),
    "a-prompt-over-the-context": (TEXT, text(prompt="word " * 3000), 400, "prompt", "invalid_value"),
    "not-utf-8": (CHAT, b'{"model": "rt/en", "messages": [], "x": "\xff"}', 400, None, "malformed_request"),
    "not-json": (CHAT, b'{"model": "rt/en",', 400, None, "malformed_request"),
    "not-an-object": (TEXT, b"[1, 2]", 400, None, "malformed_request"),
    "over-the-size-limit": (TEXT, json.dumps(text(prompt="x" * 70_000)).encode(), 413, None, "request_too_large"),
    "over-the-size-limit-chunked": (TEXT, None, 413, None, "request_too_large"),  # body made in the test
    "an-unknown-model": (CHAT, chat(model="rt/xx"), 404, None, "model_not_found"),
    "an-unknown-version": (CHAT, chat(model="rt/en@5"), 404, None, "model_not_found"),
    "a-tree-not-served-here": (TEXT, text(model="zz/en"), 404, None, "model_not_found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_request_names_its_field_and_changes_nothing(world, url, case):
    path, body, status, param, code = CASES[case]
    if case == "over-the-size-limit-chunked":  # no Content-Length: the limit holds while reading
        body = iter([b'{"model": "rt/en", "prompt": "'] + [b"x" * 8192] * 10 + [b'"}'])
    before = world.engine.stats()
    nodes = list_nodes(world.registry, include_private=True)
    answer = call(url, "POST", path, body, token=world.tokens["acme"])
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/json"
    error = answer.error
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    if param is not None:
        assert error["message"].startswith(param), error  # the message names the field too
    assert error["type"] == ("invalid_request_error" if status in (400, 404, 413) else error["type"])
    after = world.engine.stats()
    assert (after.submitted, after.queue_depth, after.rejected) == (
        before.submitted,
        before.queue_depth,
        before.rejected,
    )
    assert list_nodes(world.registry, include_private=True) == nodes


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "needs a bearer token"),
        ({"Authorization": "Bearer tlm_not-a-token"}, "not valid"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "must be 'Bearer <token>'"),
    ],
)
def test_a_missing_or_bad_token_is_401(url, headers, message):
    for method, path, body in (("POST", CHAT, chat()), ("GET", "/models", None), ("GET", "/models/rt/en", None)):
        answer = call(url, method, path, body, headers=headers)
        assert answer.status == 401 and message in answer.error["message"], answer.body
        assert (answer.error["type"], answer.error["code"]) == ("authentication_error", "invalid_api_key")


def test_routes_and_methods_that_do_not_exist_answer_in_the_same_shape(world, url):
    missing = call(url, "GET", "/embeddings", token=world.tokens["acme"])
    assert missing.status == 404 and missing.error["code"] == "not_found"
    wrong = call(url, "GET", CHAT, token=world.tokens["acme"])
    assert wrong.status == 405 and wrong.error["code"] == "method_not_allowed"
    # The API itself still works after all of that.
    good = call(url, "POST", CHAT, chat(max_tokens=2), token=world.tokens["acme"])
    assert good.status == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"
