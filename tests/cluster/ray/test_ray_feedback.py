"""Feedback on an answer of a real Ray cluster's ingress: the response row is committed to the shared
registry before the answer leaves, so the very next call (HTTP or gRPC) finds it."""

from __future__ import annotations

import pytest
from sqlalchemy import text

import treelm
from tests.cluster.http_harness import call, openai_client

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

MESSAGES = [{"role": "user", "content": "The patient has chest pain."}]


def test_feedback_on_answers_of_the_ray_ingress(ray_world):
    w = ray_world.world
    token = w.tokens["acme"]
    reply = openai_client(ray_world.http_url, token).chat.completions.create(
        model="rt/en/medical", messages=MESSAGES, max_tokens=4, temperature=0
    )
    stored = call(ray_world.http_url, "POST", "/feedback", {"response_id": reply.id, "rating": -1}, token=token)
    assert stored.status == 200 and stored.json()["node"] == "rt/en/medical"
    foreign = call(
        ray_world.http_url, "POST", "/feedback", {"response_id": reply.id, "rating": 1}, token=w.tokens["globex"]
    )
    assert foreign.status == 404 and foreign.error["code"] == "response_not_found"
    with treelm.Client(ray_world.target, token=token) as sdk:
        result = sdk.generate("rt/en/legal", prompt="The contract", max_new_tokens=3, temperature=0)
        assert sdk.feedback(result.request_id, 1).version == result.node_version
    with w.registry.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT tenant, prompt FROM responses WHERE response_id IN (:a, :b)"),
            {"a": reply.id, "b": result.request_id},
        ).all()
    assert sorted(tuple(r) for r in rows) == [("acme", None), ("acme", None)]  # retention is off by default
