"""Feedback on answers through a real TreeServer (engine, SQLite registry, tokens) on real sockets: the
official openai client makes the answers, feedback goes over raw HTTP and through the SDK over gRPC;
the tables are read directly to check what was (and was not) stored."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

import treelm
from registry.feedback import MAX_CORRECTION_BYTES
from tests.cluster.grpc_harness import PRIVATE, make_world, serve
from tests.cluster.http_harness import call, events, openai_client

pytestmark = pytest.mark.timeout(240)

NODE = "rt/en/medical/cardiology"
MESSAGES = [{"role": "user", "content": "The patient has chest pain. What next?"}]


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("feedback"))
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def server(world):
    s = serve(world, http_port=0, metrics_port=0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def url(server):
    return server.server.http_url


@pytest.fixture(scope="module")
def acme(url, world):
    return openai_client(url, world.tokens["acme"])


@pytest.fixture(scope="module")
def sdk(server, world):
    with treelm.Client(server.target, token=world.tokens["acme"]) as client:
        yield client


def _rows(world, sql: str, **params):
    with world.registry.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def _feedback_count(world) -> int:
    return _rows(world, "SELECT count(*) FROM feedback")[0][0]


def _chat(acme, node: str = NODE) -> str:
    answer = acme.chat.completions.create(model=node, messages=MESSAGES, max_tokens=4, temperature=0)
    return answer.id


def test_a_chat_answer_takes_feedback_at_once_and_keeps_no_text_without_retention(world, url, acme):
    response_id = _chat(acme)
    assert response_id.startswith("chatcmpl-")
    # No pause: the answer was handed out only once its row was committed.
    got = call(url, "POST", "/feedback", {"response_id": response_id, "rating": 1}, token=world.tokens["acme"])
    assert got.status == 200, got.body
    record = got.json()
    assert record["object"] == "feedback" and record["response_id"] == response_id
    assert (record["node"], record["version"], record["rating"], record["tags"]) == (NODE, 1, 1, [])
    rows = _rows(
        world, "SELECT tenant, node, version, prompt, answer FROM responses WHERE response_id = :r", r=response_id
    )
    assert rows == [("acme", NODE, 1, None, None)]
    listed = call(url, "GET", f"/feedback?node={NODE}", token=world.tokens["acme"]).json()
    assert listed["data"][0]["response_id"] == response_id


def test_sdk_feedback_over_grpc_for_unary_streamed_and_caller_chosen_ids(world, sdk):
    result = sdk.generate(NODE, prompt="The heart", max_new_tokens=3, temperature=0)
    record = sdk.feedback(result.request_id, -1, correction="The heart pumps blood.", tags=["wrong"])
    assert (record.rating, record.correction, record.tags, record.node) == (
        -1,
        "The heart pumps blood.",
        ("wrong",),
        NODE,
    )
    chunks = list(sdk.stream(NODE, prompt="The lungs", max_new_tokens=3, request_id="my-own-id-1"))
    assert chunks[-1].request_id == "my-own-id-1"
    assert sdk.feedback("my-own-id-1", 1).response_id == "my-own-id-1"
    mine = {f.response_id for f in sdk.list_feedback(NODE)}
    assert {result.request_id, "my-own-id-1"} <= mine


def test_n_choices_and_multi_prompt_completions_are_recorded_under_the_ids_the_caller_sees(world, url, acme):
    token = world.tokens["acme"]
    n = acme.chat.completions.create(model=NODE, messages=MESSAGES, max_tokens=2, n=2, temperature=0.7, seed=1)
    assert call(url, "POST", "/feedback", {"response_id": n.id, "rating": 1}, token=token).status == 200
    multi = acme.completions.create(model=NODE, prompt=["One", "Two"], max_tokens=2, temperature=0)
    for rid in (multi.id, f"{multi.id}-0", f"{multi.id}-1"):
        assert call(url, "POST", "/feedback", {"response_id": rid, "rating": -1}, token=token).status == 200, rid
    streamed = events(
        url, "/completions", {"model": NODE, "prompt": ["A", "B"], "max_tokens": 2, "stream": True}, token=token
    )
    sid = streamed[0]["id"]
    for rid in (sid, f"{sid}-0", f"{sid}-1"):
        assert call(url, "POST", "/feedback", {"response_id": rid, "rating": 1}, token=token).status == 200, rid


def test_bad_feedback_is_refused_precisely_and_stores_nothing(world, url, acme, sdk):
    token, theirs = world.tokens["acme"], world.tokens["globex"]
    response_id = _chat(acme)
    before = _feedback_count(world)
    unknown = call(url, "POST", "/feedback", {"response_id": "chatcmpl-nope", "rating": 1}, token=token)
    assert unknown.status == 404 and unknown.error["code"] == "response_not_found"
    foreign = call(url, "POST", "/feedback", {"response_id": response_id, "rating": 1}, token=theirs)
    mine_unknown = call(url, "POST", "/feedback", {"response_id": response_id, "rating": 1}, token=world.operator_token)
    assert foreign.status == 404 and foreign.body == mine_unknown.body  # another tenant's id: the unknown id's answer
    zero = call(url, "POST", "/feedback", {"response_id": response_id, "rating": 0}, token=token)
    assert zero.status == 400 and zero.error["param"] == "rating" and "rating" in zero.error["message"]
    big = "x" * (MAX_CORRECTION_BYTES + 1)
    over = call(url, "POST", "/feedback", {"response_id": response_id, "rating": -1, "correction": big}, token=token)
    assert over.status == 400 and over.error["param"] == "correction"
    tags = call(url, "POST", "/feedback", {"response_id": response_id, "rating": 1, "tags": ["t"] * 17}, token=token)
    assert tags.status == 400 and tags.error["param"] == "tags"
    extra = call(url, "POST", "/feedback", {"response_id": response_id, "rating": 1, "score": 3}, token=token)
    assert extra.status == 400 and extra.error["param"] == "score"
    with pytest.raises(treelm.ResponseNotFound):
        sdk.feedback("no-such-response", 1)
    with pytest.raises(treelm.InvalidRequest) as bad:
        sdk.feedback(response_id, 2)
    assert bad.value.field == "rating"
    assert _feedback_count(world) == before


def test_retention_keeps_texts_for_export_and_exports_are_per_tenant(world, url, acme, sdk):
    token = world.tokens["acme"]
    node = "rt/en/medical/radiology"
    on = call(url, "PUT", "/feedback/retention", {"node": node, "enabled": True}, token=token)
    assert on.status == 200 and on.json() == {"object": "feedback.retention", "node": node, "enabled": True}
    kept = acme.chat.completions.create(model=node, messages=MESSAGES, max_tokens=4, temperature=0)
    rid = kept.id
    assert (
        call(
            url, "POST", "/feedback", {"response_id": rid, "rating": -1, "correction": "Do an ECG."}, token=token
        ).status
        == 200
    )
    ((prompt, answer),) = _rows(world, "SELECT prompt, answer FROM responses WHERE response_id = :r", r=rid)
    assert json.loads(prompt) == {"messages": MESSAGES} and answer == kept.choices[0].message.content
    export = call(url, "GET", f"/feedback/export?node={node}", token=token)
    assert export.status == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in export.body.decode().splitlines()]
    mine = [r for r in lines if r["response_id"] == rid]
    assert mine and mine[0]["prompt"] == {"messages": MESSAGES} and mine[0]["correction"] == "Do an ECG."
    exported = {f.response_id: f for f in sdk.export_feedback(node)}
    assert exported[rid].prompt == {"messages": MESSAGES} and exported[rid].answer == answer
    assert [r.node for r in sdk.retention()] == [node]
    # globex sees none of it, in any listing or export.
    theirs = world.tokens["globex"]
    assert call(url, "GET", "/feedback/export", token=theirs).body == b""
    assert call(url, "GET", "/feedback", token=theirs).json()["data"] == []
    off = sdk.set_retention(node, False)
    assert off == treelm.Retention(node, False)
    later = acme.chat.completions.create(model=node, messages=MESSAGES, max_tokens=2, temperature=0)
    assert _rows(world, "SELECT prompt, answer FROM responses WHERE response_id = :r", r=later.id) == [(None, None)]


def test_a_private_node_is_the_unknown_node_for_others(world, url):
    theirs = world.tokens["globex"]
    private = call(url, "PUT", "/feedback/retention", {"node": PRIVATE, "enabled": True}, token=theirs)
    unknown = call(url, "PUT", "/feedback/retention", {"node": "rt/en/nothing", "enabled": True}, token=theirs)
    assert private.status == unknown.status == 404
    assert private.error["code"] == unknown.error["code"] == "model_not_found"
    assert private.error["message"].replace(PRIVATE, "X") == unknown.error["message"].replace("rt/en/nothing", "X")
    listed = call(url, "GET", f"/feedback?node={PRIVATE}", token=theirs)
    assert listed.status == 404
    assert _rows(world, "SELECT count(*) FROM feedback_retention WHERE tenant = 'globex'") == [(0,)]


def test_deletion_is_final(world, url, acme, sdk):
    token = world.tokens["acme"]
    node = "rt/fr/medical"
    sdk.set_retention(node, True)
    first, second = _chat(acme, node), _chat(acme, node)
    for rid in (first, second):
        assert call(url, "POST", "/feedback", {"response_id": rid, "rating": 1}, token=token).status == 200
    gone = call(url, "DELETE", f"/feedback?node={node}&response_id={first}", token=token)
    assert gone.status == 200 and gone.json() == {"object": "feedback.deleted", "deleted": 1}
    assert _rows(world, "SELECT prompt, answer FROM responses WHERE response_id = :r", r=first) == [(None, None)]
    before = _feedback_count(world)
    again = call(url, "POST", "/feedback", {"response_id": first, "rating": -1}, token=token)
    assert again.status == 409 and again.error["code"] == "feedback_deleted"
    with pytest.raises(treelm.FeedbackDeleted) as refused:
        sdk.feedback(first, 1)
    assert refused.value.code.name == "FAILED_PRECONDITION" and refused.value.kind == "feedback-deleted"
    assert _feedback_count(world) == before
    assert sdk.delete_feedback(node) == 1  # the second; the first is deleted already
    assert [f for f in sdk.list_feedback(node)] == []
    sdk.set_retention(node, False)


def test_answers_finishing_together_share_a_transaction(world, server):
    import asyncio

    recorder = server.server.recorder
    before = recorder.transactions

    async def many() -> list[str]:
        async with treelm.AsyncClient(server.target, token=world.tokens["acme"]) as client:
            results = await asyncio.gather(
                *(client.generate(NODE, prompt=f"Case {i}", max_new_tokens=3) for i in range(16))
            )
            return [r.request_id for r in results]

    ids = asyncio.run(many())
    assert 1 <= recorder.transactions - before < 16
    stored = {r for (r,) in _rows(world, "SELECT response_id FROM responses WHERE tenant = 'acme'")}
    assert set(ids) <= stored


def test_recording_off_records_nothing(world):
    quiet = serve(world, http_port=0, feedback=False)
    try:
        client = openai_client(quiet.server.http_url, world.tokens["acme"])
        rid = _chat(client)
        assert _rows(world, "SELECT count(*) FROM responses WHERE response_id = :r", r=rid) == [(0,)]
        answer = call(
            quiet.server.http_url, "POST", "/feedback", {"response_id": rid, "rating": 1}, token=world.tokens["acme"]
        )
        assert answer.status == 404
    finally:
        quiet.stop()


def _cli(monkeypatch, capsys, server, token: str, *args: str) -> tuple[int, str, str]:
    from cluster.cli import main

    monkeypatch.setenv("TREELM_TOKEN", token)
    monkeypatch.setenv("TREELM_SERVER", server.target)
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    code = main(["feedback", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lists_exports_deletes_and_switches_retention(world, server, acme, monkeypatch, capsys, tmp_path):
    token, theirs = world.tokens["acme"], world.tokens["globex"]
    node = "rt/en/legal"
    assert _cli(monkeypatch, capsys, server, token, "retention", node, "--on")[0] == 0
    code, out, _ = _cli(monkeypatch, capsys, server, token, "retention", "--json")
    assert code == 0 and {"node": node, "enabled": True} in json.loads(out)["retention"]
    rid = _chat(acme, node)
    assert (
        call(
            server.server.http_url,
            "POST",
            "/feedback",
            {"response_id": rid, "rating": -1, "correction": "No."},
            token=token,
        ).status
        == 200
    )
    code, out, _ = _cli(monkeypatch, capsys, server, token, "ls", "--node", node, "--json")
    assert code == 0 and [r["response_id"] for r in json.loads(out)["feedback"]] == [rid]
    code, out, _ = _cli(monkeypatch, capsys, server, token, "ls", "--node", node)
    assert code == 0 and rid in out and "No." in out
    target = tmp_path / "fb.jsonl"
    assert _cli(monkeypatch, capsys, server, token, "export", "--node", node, "--out", str(target))[0] == 0
    (line,) = target.read_text().splitlines()
    assert json.loads(line)["prompt"] == {"messages": MESSAGES} and json.loads(line)["correction"] == "No."
    code, out, _ = _cli(monkeypatch, capsys, server, theirs, "export")
    assert code == 0 and rid not in out
    code, _, err = _cli(monkeypatch, capsys, server, token, "delete")
    assert code == 2 and "--all" in err
    code, out, _ = _cli(monkeypatch, capsys, server, token, "delete", "--response-id", rid, "--json")
    assert code == 0 and json.loads(out) == {"deleted": 1}
    assert _cli(monkeypatch, capsys, server, token, "retention", node, "--off")[0] == 0


def test_cli_errors_exit_2_with_the_server_s_reason(world, server, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, server, world.tokens["globex"], "retention", PRIVATE, "--on")
    assert code == 2 and "NOT_FOUND" in err and "Traceback" not in err
    code, _, err = _cli(monkeypatch, capsys, server, "tlm_not_a_token", "ls")
    assert code == 2 and "UNAUTHENTICATED" in err
    code, _, err = _cli(monkeypatch, capsys, server, world.tokens["acme"], "ls", "--node", "rt/en@2")
    assert code == 2 and "node" in err


def _scrape(server) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=30) as answer:
        return answer.read().decode()


def _sample(metrics: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_metrics_count_feedback_per_public_node_and_name_no_private_node(world, server, acme):
    from registry.feedback import record_decision

    token = world.tokens["acme"]
    private = acme.chat.completions.create(model=PRIVATE, messages=MESSAGES, max_tokens=2, temperature=0)
    assert (
        call(server.server.http_url, "POST", "/feedback", {"response_id": private.id, "rating": -1}, token=token).status
        == 200
    )
    for rating in (1, -1, -1):
        assert (
            call(
                server.server.http_url, "POST", "/feedback", {"response_id": _chat(acme), "rating": rating}, token=token
            ).status
            == 200
        )
    record_decision(world.registry, NODE, "make", "test: 3 new corrections >= 3", update_id="u1")
    ((pos, neg),) = _rows(world, "SELECT sum(rating > 0), sum(rating < 0) FROM feedback WHERE node = :n", n=NODE)
    metrics = _scrape(server)
    assert _sample(metrics, "treelm_feedback_ratings", node=NODE, rating="positive") == pos
    assert _sample(metrics, "treelm_feedback_ratings", node=NODE, rating="negative") == neg
    assert 0 < _sample(metrics, "treelm_feedback_negative_rate", node=NODE) < 1
    assert _sample(metrics, "treelm_feedback_updates_made_total", node=NODE) == 1
    assert 0 <= _sample(metrics, "treelm_feedback_last_update_age_seconds", node=NODE) < 60
    assert _sample(metrics, "treelm_feedback_ratings", node="other", rating="negative") >= 1  # the private node's
    assert PRIVATE not in metrics and "contracts" not in metrics


def test_the_grafana_dashboard_queries_only_exported_metrics(server):
    import re

    from tests.conftest import REPO

    dashboard = json.loads((REPO / "docs" / "grafana" / "treelm-feedback.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\btreelm_[a-z_]+", e)}
    exported = set(re.findall(r"^(treelm_[a-z_]+)[{ ]", _scrape(server), re.M))
    assert {"treelm_feedback_ratings", "treelm_feedback_updates_made_total"} <= queried
    assert queried <= exported, queried - exported
