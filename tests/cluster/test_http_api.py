"""The OpenAI-compatible HTTP API of a real TreeServer (engine, SQLite registry, tokens) on a real
socket, through the official ``openai`` client and raw HTTP: models, chat, streams, completions with
echo logprobs against the node's merged export in transformers, structured output, version pins,
private nodes, the gRPC twin of every answer."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest
import torch

import treelm
from nodes.base.model import TinyBaseConfig, make_tiny_base
from nodes.runtime.engine import EngineConfig
from registry.versions import add_version
from tests.cluster.grpc_harness import PRIVATE, make_world, serve
from tests.cluster.http_harness import OpenStream, call, events, openai_client
from tests.nodes.test_structured import SCHEMAS

pytestmark = pytest.mark.timeout(240)

MESSAGES = [
    {"role": "system", "content": "You are a careful clinician."},
    {"role": "user", "content": "The patient has chest pain. What next?"},
]
TOL = 1e-4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-api")
    base = make_tiny_base(
        root / "base", TinyBaseConfig(hidden=64, layers=2, vocab=400, heads=4, kv_heads=2, max_position=8192)
    )
    w = make_world(base, root, EngineConfig(max_batch_size=16, max_new_tokens_limit=8000))
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
def grpc_client(server, world):
    with treelm.Client(server.target, token=world.tokens["acme"]) as client:
        yield client


def test_models_are_the_nodes_this_token_may_use_here(world, url, acme):
    ids = [m.id for m in acme.models.list()]
    assert sorted(ids) == sorted([world.tree.name, *(str(n.node_id) for n in world.tree.nodes)])
    assert all(ids.index(i.rsplit("/", 1)[0]) < ids.index(i) for i in ids if "/" in i)  # parents first
    theirs = [m.id for m in openai_client(url, world.tokens["globex"]).models.list()]
    assert PRIVATE not in theirs and set(theirs) == set(ids) - {PRIVATE}
    model = acme.models.retrieve("rt/en/medical")  # an id with slashes
    assert (model.id, model.owned_by, model.model_extra["parent"]) == ("rt/en/medical", "treelm", "rt/en")
    assert model.model_extra["stable_version"] == 3 and model.model_extra["level"] == "domain"
    private = acme.models.retrieve(PRIVATE)
    assert private.owned_by == "acme" and private.model_extra["visibility"] == "private"
    assert acme.models.retrieve("rt/en/medical@3").id == "rt/en/medical@3"
    base = acme.models.retrieve("rt")
    assert base.model_extra["parent"] is None and base.model_extra["level"] == "base"


def test_chat_greedy_text_equals_grpc_and_names_the_version_that_answered(acme, grpc_client):
    reply = acme.chat.completions.create(model="rt/en/medical", messages=MESSAGES, max_tokens=12, temperature=0)
    twin = grpc_client.generate("rt/en/medical", messages=MESSAGES, max_new_tokens=12, temperature=0)
    (choice,) = reply.choices
    assert choice.message.content == twin.text and choice.message.role == "assistant"
    assert choice.finish_reason == twin.finish_reason.value
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        twin.usage.prompt_tokens,
        twin.usage.completion_tokens,
    )
    assert reply.usage.total_tokens == twin.usage.total_tokens
    assert reply.model == "rt/en/medical@3" and reply.model_extra["node_version"] == 3 == twin.node_version
    assert reply.id.startswith("chatcmpl-") and reply.system_fingerprint.startswith("fp_")
    # Completions take the prompt as it is: the same text as gRPC's prompt.
    text = acme.completions.create(model="rt/fr/medical", prompt="Bonjour", max_tokens=10, temperature=0)
    assert text.choices[0].text == grpc_client.generate("rt/fr/medical", "Bonjour", max_new_tokens=10).text
    assert text.id.startswith("cmpl-") and text.model == "rt/fr/medical@1"
    # max_completion_tokens wins over max_tokens, developer is rendered as system, text parts join.
    parts = [
        {"role": "developer", "content": MESSAGES[0]["content"]},
        {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]},
    ]
    again = acme.chat.completions.create(
        model="rt/en/medical", messages=parts, max_tokens=3, max_completion_tokens=12, temperature=0
    )
    assert again.choices[0].message.content == twin.text


def test_a_streamed_chat_is_the_unary_answer_in_pieces(acme, url, world):
    unary = acme.chat.completions.create(model="rt/en/legal", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(
        acme.chat.completions.create(
            model="rt/en/legal",
            messages=MESSAGES,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    body, usage = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].delta.content or "" for c in body) == unary.choices[0].message.content
    assert body[0].choices[0].delta.role == "assistant" and all(c.choices[0].delta.role is None for c in body[1:])
    assert [c.choices[0].finish_reason for c in body[:-1]] == [None] * (len(body) - 1)
    assert body[-1].choices[0].finish_reason == unary.choices[0].finish_reason
    assert usage.choices == [] and usage.usage.completion_tokens == unary.usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].model == "rt/en/legal@1"
    raw = events(
        url,
        "/chat/completions",
        {"model": "rt/en/legal", "messages": MESSAGES, "max_tokens": 4, "stream": True},
        token=world.tokens["acme"],
    )
    assert raw[-1] == "[DONE]" and all(e["usage"] is None for e in raw[:-1])  # usage only when asked for


def test_n_choices_logprobs_and_logit_bias_in_chat(acme, world):
    reply = acme.chat.completions.create(
        model="rt/en",
        messages=MESSAGES,
        n=3,
        temperature=1.0,
        seed=7,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # choice i samples with its own seed
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    for choice in reply.choices:
        assert (
            b"".join(bytes(t.bytes) for t in choice.logprobs.content).decode("utf-8", "replace")
            == choice.message.content
        )
        for token in choice.logprobs.content:
            tops = [t.logprob for t in token.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and token.logprob <= tops[0] + TOL
    same = acme.chat.completions.create(
        model="rt/en",
        messages=MESSAGES,
        n=3,
        temperature=1.0,
        seed=7,
        max_tokens=8,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert [c.message.content for c in same.choices] == [c.message.content for c in reply.choices]  # seeded
    forced = acme.chat.completions.create(
        model="rt/en", messages=MESSAGES, max_tokens=5, temperature=0, logit_bias={"65": 100}, logprobs=True
    )
    assert [t.bytes for t in forced.choices[0].logprobs.content] == [
        list(world.engine.tokenizer.decode([65]).encode())
    ] * 5


def test_completion_echo_logprobs_are_the_merged_export_s_log_softmax(acme, grpc_client, world, tmp_path):
    from transformers import AutoModelForCausalLM

    from nodes.build.export import export_node

    node, prompt = "rt/en/medical/cardiology", "The patient was admitted with chest pain."
    export_node(world.tree.root, node, "merged", tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reply = acme.completions.create(model=node, prompt=prompt, max_tokens=6, echo=True, logprobs=3, temperature=0)
    completion = grpc_client.generate(node, prompt, max_new_tokens=6, temperature=0)
    ids = list(world.engine.tokenizer(prompt).input_ids) + list(completion.token_ids)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    (choice,) = reply.choices
    lp = choice.logprobs
    assert choice.text == prompt + completion.text and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    for t in range(1, len(ids)):
        assert abs(lp.token_logprobs[t] - expected[t - 1, ids[t]].item()) < TOL, t
        best = expected[t - 1].topk(3).values.tolist()
        assert all(any(abs(v - b) < TOL for b in best) for v in lp.top_logprobs[t].values()), t
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert "\ufffd" in token or choice.text[offset:].startswith(token)
    # max_tokens 0 with echo scores the prompt alone: the same numbers, nothing generated.
    score = acme.completions.create(model=node, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    (only,) = score.choices
    n_prompt = len(ids) - len(completion.token_ids)
    assert only.text == prompt and only.finish_reason == "length" and score.usage.completion_tokens == 0
    assert only.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n_prompt], abs=TOL)
    assert all(top == {} for top in only.logprobs.top_logprobs[1:])


def test_completions_take_a_list_of_prompts_and_stream_them(acme, grpc_client):
    prompts = ["The contract", "Le patient"]
    reply = acme.completions.create(model="rt/en/legal", prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    want = [grpc_client.generate("rt/en/legal", p, max_new_tokens=5).text for p in prompts]
    assert [c.text for c in reply.choices] == [want[0], want[0], want[1], want[1]]
    streamed: dict[int, str] = {}
    for chunk in acme.completions.create(
        model="rt/en/legal", prompt=prompts, n=2, max_tokens=5, temperature=0, echo=True, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {
        0: prompts[0] + want[0],
        1: prompts[0] + want[0],
        2: prompts[1] + want[1],
        3: prompts[1] + want[1],
    }


@pytest.mark.parametrize("i", range(3))
def test_json_schema_output_parses_and_validates(acme, i):
    schema = SCHEMAS[i]
    reply = acme.chat.completions.create(
        model="rt/en/medical/radiology",
        messages=MESSAGES,
        max_tokens=120,
        temperature=1.0,
        seed=i,
        n=2,
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    anything = acme.chat.completions.create(
        model="rt/en", messages=MESSAGES, max_tokens=40, response_format={"type": "json_object"}, seed=i
    ).choices[0]
    # Any object: a random tiny model may not close it within 40 tokens; the grammar holds meanwhile.
    assert anything.message.content.startswith("{")
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.message.content), dict)


def test_a_pinned_version_answers_only_as_itself(world, url, acme, grpc_client):
    add_version(world.registry, "rt/fr", manifest_digest="a" * 64, version=2)  # known, but not what is served
    assert acme.completions.create(model="rt/fr@1", prompt="x", max_tokens=2).model == "rt/fr@1"
    not_served = call(url, "POST", "/completions", {"model": "rt/fr@2", "prompt": "x"}, token=world.tokens["acme"])
    assert not_served.status == 409 and not_served.error["code"] == "version_not_served"
    assert "served at version 1" in not_served.error["message"]
    never = call(
        url, "POST", "/chat/completions", {"model": "rt/fr@7", "messages": MESSAGES}, token=world.tokens["acme"]
    )
    assert never.status == 404 and never.error["code"] == "model_not_found"
    assert grpc_client.generate("rt/fr@1", "x", max_new_tokens=2).node_version == 1  # gRPC pins the same way
    with pytest.raises(treelm.FailedPrecondition, match="served at version 1"):
        grpc_client.generate("rt/fr@2", "x", max_new_tokens=2)
    with pytest.raises(treelm.NotFound, match="no version 7"):
        list(grpc_client.stream("rt/fr@7", "x", max_new_tokens=2))


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/chat/completions", {"model": "{id}", "messages": MESSAGES, "max_tokens": 2}),
        ("POST", "/completions", {"model": "{id}", "prompt": "x", "n": 99, "logprobs": 99}),  # bad fields too
        ("POST", "/completions", {"model": "{id}@1", "prompt": "x", "stream": True}),
        ("GET", "/models/{id}", None),
    ],
)
def test_another_tenant_s_private_node_is_answered_like_an_unknown_node(world, url, method, path, body):
    unknown = "rt/en/legal/contract"  # one letter short: the bodies differ in nothing else

    def ask(node, tenant):
        text = json.dumps(body).replace("{id}", node) if body else None
        return call(url, method, path.replace("{id}", node), text and text.encode(), token=world.tokens[tenant])

    private, absent = ask(PRIVATE, "globex"), ask(unknown, "globex")
    assert private.status == absent.status == 404
    assert private.body.replace(PRIVATE.encode(), unknown.encode()) == absent.body
    assert {k: v for k, v in private.headers.items() if k not in ("date", "content-length")} == {
        k: v for k, v in absent.headers.items() if k not in ("date", "content-length")
    }
    assert private.error["code"] == "model_not_found" and b"acme" not in private.body
    if body is None or "n" not in body:
        assert ask(PRIVATE, "acme").status == 200  # its owner uses it


def test_streams_answer_with_the_engine_s_request_id_and_free_rows_when_the_client_leaves(world, url):
    body = {"model": "rt/en/medical", "messages": MESSAGES, "max_tokens": 4000, "stream": True}
    stream = OpenStream(url, "/chat/completions", body, token=world.tokens["acme"])
    first = stream.next_event()
    assert world.engine.cancel(first["id"])  # the response id is the engine's request id
    rest = stream.rest()
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "cancelled"
    stream.close()
    leaving = OpenStream(url, "/chat/completions", body, token=world.tokens["acme"])
    leaving.next_event()
    assert world.engine.stats().tokens_in_flight > 0
    leaving.close()
    from tests.cluster.test_server import wait_until

    wait_until(lambda: world.engine.stats().tokens_in_flight == 0, what="the engine to drop the abandoned stream")


def test_a_unary_call_whose_client_leaves_is_cancelled_in_the_engine(world, url):
    import socket
    import urllib.parse

    from tests.cluster.test_server import wait_until

    before = world.engine.stats().cancelled
    body = json.dumps({"model": "rt/en/medical", "prompt": "long", "max_tokens": 8000, "temperature": 0}).encode()
    u = urllib.parse.urlparse(url)
    with socket.create_connection((u.hostname, u.port)) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {world.tokens['acme']}\r\n"
        sock.sendall(
            head.encode() + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        wait_until(lambda: world.engine.stats().tokens_in_flight > 0, what="the request to start")
    wait_until(lambda: world.engine.stats().cancelled == before + 1, what="the engine to cancel the abandoned call")
    assert world.engine.stats().tokens_in_flight == 0


def test_http_calls_are_counted_in_the_metrics(server, url, acme):
    acme.models.list()
    metrics = call(f"http://127.0.0.1:{server.server.metrics_port}", "GET", "/metrics").body.decode()
    assert 'treelm_requests_total{code="OK",method="GET /v1/models",node=""}' in metrics
    assert 'method="POST /v1/chat/completions",node="rt/en/medical"' in metrics
    assert 'treelm_tokens_total{kind="completion",node="rt/en/medical"}' in metrics


def test_a_full_queue_is_429_with_retry_after_and_draining_is_503(world):
    """One row and one queue slot: a long stream holds the row, one call waits, the next is refused."""
    from nodes.runtime.engine import Engine

    engine = Engine(
        world.tree.base_dir, world.tree.root, EngineConfig(max_batch_size=1, max_queue=1, max_new_tokens_limit=8000)
    )
    from cluster.service.server import ServerConfig, TreeServer
    from cluster.service.trunk import EngineTrunk
    from tests.cluster.grpc_harness import ServerThread
    from tests.cluster.test_server import wait_until

    thread = ServerThread(
        lambda: TreeServer(
            [EngineTrunk(engine)], world.catalog(), ServerConfig(port=0, http_port=0, grace_s=60), close_trunks=True
        )
    )
    url, token = thread.server.http_url, world.tokens["acme"]
    try:
        long = {"model": "rt/en/medical", "prompt": "long", "max_tokens": 3000, "temperature": 0, "stream": True}
        holder = OpenStream(url, "/completions", long, token=token)
        holder.next_event()
        waiting = threading.Thread(
            target=call, args=(url, "POST", "/completions", {"model": "rt/en", "prompt": "q"}), kwargs={"token": token}
        )
        waiting.start()
        wait_until(lambda: engine.stats().queue_depth == 1, what="a queued request")
        full = call(url, "POST", "/completions", {"model": "rt/en", "prompt": "x"}, token=token)
        assert full.status == 429 and full.headers["retry-after"] == "1"
        assert full.error["type"] == "rate_limit_error" and "requests are waiting" in full.error["message"]
        stopping = threading.Thread(target=thread.stop, kwargs={"grace": 60})
        stopping.start()
        wait_until(lambda: thread.server._http is not None and thread.server._http.api.draining, what="draining")
        late = call(url, "POST", "/completions", {"model": "rt/en", "prompt": "x"}, token=token)
        assert late.status == 503 and late.headers["retry-after"] == "1" and late.error["code"] == "shutting_down"
        rest = holder.rest()  # the stream in flight runs to its end
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        holder.close()
        waiting.join(60)
        stopping.join(60)
        assert not stopping.is_alive()
    finally:
        thread.stop()
