"""The OpenAI-compatible API of a real Ray cluster's ingress, through the official openai client:
the same code as `treelm serve`, with trunks in Serve replicas."""

from __future__ import annotations

import asyncio

import pytest

import treelm
from nodes.runtime.requests import GenerationRequest, SamplingParams
from tests.cluster.grpc_harness import PRIVATE
from tests.cluster.http_harness import call, openai_client

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

MESSAGES = [{"role": "user", "content": "The patient has chest pain."}]


def test_the_openai_client_lists_chats_streams_and_scores_through_the_cluster(ray_world, kb_engine):
    w = ray_world.world
    client = openai_client(ray_world.http_url, w.tokens["acme"])
    ids = {m.id for m in client.models.list()}
    assert {"rt", "rt/en/medical", PRIVATE, "kb", "kb/de/law/tax"} <= ids and not any(i.startswith("zz") for i in ids)
    assert client.models.retrieve("kb/de/law").model_extra["parent"] == "kb/de"
    with treelm.Client(ray_world.target, token=w.tokens["acme"]) as sdk:
        for node in ("rt/en/medical", "kb/it/med", PRIVATE):
            reply = client.chat.completions.create(model=node, messages=MESSAGES, max_tokens=10, temperature=0)
            twin = sdk.generate(node, messages=MESSAGES, max_new_tokens=10, temperature=0)
            assert reply.choices[0].message.content == twin.text and reply.model == f"{node}@{twin.node_version}"
    chunks = list(
        client.chat.completions.create(
            model="kb/de/law/tax",
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    unary = client.chat.completions.create(model="kb/de/law/tax", messages=MESSAGES, max_tokens=10, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == unary.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    prompt = "The contract was signed"
    scored = client.completions.create(
        model="rt/en/legal", prompt=prompt, max_tokens=4, echo=True, logprobs=2, temperature=0
    )
    request = GenerationRequest(
        node="rt/en/legal",
        prompt=prompt,
        params=SamplingParams(max_new_tokens=4, echo=True, logprobs=True, top_logprobs=2),
    )
    local = asyncio.run(w.engine.generate(request))  # the same tree in this process: what a replica computes
    want = [e.logprob for e in (*local.echo.logprobs, *local.logprobs)]
    got = scored.choices[0].logprobs.token_logprobs
    assert got[0] is None and got[1:] == pytest.approx(want[1:], abs=1e-4)
    assert scored.choices[0].text == prompt + local.text


def test_the_cluster_refuses_like_one_process(ray_world):
    w = ray_world.world
    url = ray_world.http_url
    body = {"model": PRIVATE, "messages": MESSAGES, "max_tokens": 2}
    private = call(url, "POST", "/chat/completions", body, token=w.tokens["globex"])
    absent = call(url, "POST", "/chat/completions", {**body, "model": "rt/en/legal/contract"}, token=w.tokens["globex"])
    assert private.status == absent.status == 404
    assert private.body.replace(PRIVATE.encode(), b"rt/en/legal/contract") == absent.body
    assert call(url, "GET", "/models").status == 401
    bad = call(url, "POST", "/completions", {"model": "rt/en", "prompt": "x", "n": 99}, token=w.tokens["acme"])
    assert (bad.status, bad.error["param"]) == (400, "n")
    # A replica's served version is not known at the ingress: a wrong pin is refused after the
    # replica answered, before anything reaches the client.
    pinned = call(
        url, "POST", "/completions", {"model": "rt/en@1", "prompt": "x", "max_tokens": 2}, token=w.tokens["acme"]
    )
    assert pinned.status == 200 and pinned.json()["model"] == "rt/en@1"
    wrong = call(
        url, "POST", "/completions", {"model": "rt/en@4", "prompt": "x", "max_tokens": 2}, token=w.tokens["acme"]
    )
    assert wrong.status == 404 and wrong.error["code"] == "model_not_found" and "no version 4" in wrong.error["message"]
