"""The SDK against a scripted server on a real socket: requests, decoding, typed errors, retries."""

from __future__ import annotations

import asyncio
import datetime

import grpc
import grpc.aio
import pytest

import treelm
from tests.treelm.fake_server import start_fake_server
from treelm import AsyncClient, ChatMessage, Client, FinishReason, RetryPolicy

FAST = RetryPolicy(retries=3, initial_backoff=0.001, max_backoff=0.005)
S = grpc.StatusCode


@pytest.fixture
def fake():
    server, port, rec = start_fake_server()
    yield f"127.0.0.1:{port}", rec
    server.stop(None)


@pytest.fixture
def client(fake):
    target, _ = fake
    with Client(target, token="tok-1", retries=FAST, timeout=10) as c:
        yield c


def test_generate_sends_the_request_and_decodes_the_result(fake, client):
    _, rec = fake
    result = client.generate(
        "demo/en",
        "hello",
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=3,
        seed=11,
        stop=["\n", "END"],
        request_id="abc",
    )
    method, request, metadata = rec.calls[-1]
    assert method == "Generate" and request.node == "demo/en" and request.prompt == "hello"
    p = request.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, list(p.stop)) == (
        7,
        0.5,
        0.9,
        3,
        11,
        ["\n", "END"],
    )
    assert request.request_id == "abc"
    assert metadata["authorization"] == "Bearer tok-1"
    assert result.text == "echo:hello" and result.token_ids == (1, 2, 3) and result.request_id == "abc"
    assert result.finish_reason is FinishReason.LENGTH and result.node_version == 2
    assert result.usage.total_tokens == 7 and result.timings.ttft_s == pytest.approx(0.2)


def test_unset_params_stay_unset_so_the_server_applies_its_defaults(fake, client):
    _, rec = fake
    client.generate("demo", "x")
    request = rec.calls[-1][1]
    assert not any(request.params.HasField(f) for f in ("max_new_tokens", "temperature", "top_p", "top_k", "seed"))


def test_messages_accept_dicts_tuples_and_chat_messages(fake, client):
    _, rec = fake
    msgs = [{"role": "system", "content": "a"}, ("user", "b"), ChatMessage("assistant", "c")]
    assert client.generate("demo/en", messages=msgs).text == "echo:a|b|c"
    request = rec.calls[-1][1]
    assert not request.HasField("prompt")
    assert [(m.role, m.content) for m in request.messages] == [("system", "a"), ("user", "b"), ("assistant", "c")]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_new_tokens": 2**40}, "max_new_tokens"),
        ({"top_k": True}, "top_k"),
        ({"beam_width": 4}, "beam_width"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": ["just text"]}, "messages"),
    ],
)
def test_bad_local_values_raise_invalid_request_before_any_call(fake, client, kwargs, field):
    _, rec = fake
    with pytest.raises(treelm.InvalidRequest) as info:
        client.generate("demo/en", None if "messages" in kwargs else "p", **kwargs)
    assert info.value.field == field
    assert rec.calls == []


@pytest.mark.parametrize(
    "code, meta, expected",
    [
        (S.NOT_FOUND, (("treelm-error-kind", "node-not-found"),), treelm.NodeNotFound),
        (S.NOT_FOUND, (), treelm.NotFound),
        (S.INVALID_ARGUMENT, (("treelm-error-field", "top_p"),), treelm.InvalidRequest),
        (S.UNAUTHENTICATED, (), treelm.Unauthenticated),
        (S.PERMISSION_DENIED, (), treelm.PermissionDenied),
        (S.FAILED_PRECONDITION, (), treelm.FailedPrecondition),
        (S.DEADLINE_EXCEEDED, (), treelm.DeadlineExceeded),
        (S.UNIMPLEMENTED, (), treelm.Unimplemented),
        (S.CANCELLED, (), treelm.Cancelled),
        (S.INTERNAL, (), treelm.ServerError),
        (S.DATA_LOSS, (), treelm.ServerError),
    ],
)
def test_status_codes_decode_to_typed_errors(fake, client, code, meta, expected):
    _, rec = fake
    rec.script = [(code, "top_p: must be in (0, 1]", meta)]
    with pytest.raises(expected) as info:
        client.generate("demo/en", "p")
    err = info.value
    assert type(err) is expected and err.code == code and err.details == "top_p: must be in (0, 1]"
    if expected is treelm.InvalidRequest:
        assert err.field == "top_p"
    assert len(rec.calls) == 1  # none of these is retried


@pytest.mark.parametrize(
    "code, error", [(S.UNAVAILABLE, treelm.Unavailable), (S.RESOURCE_EXHAUSTED, treelm.Overloaded)]
)
def test_retryable_codes_are_retried_with_backoff_until_success(fake, client, code, error):
    _, rec = fake
    rec.script = [(code, "busy", ()), (code, "busy", ())]
    assert client.generate("demo/en", "p").text == "echo:p"
    assert len(rec.calls) == 3
    rec.script = [(code, "busy", ())] * 4  # one more failure than retries
    with pytest.raises(error):
        client.nodes()
    assert len(rec.calls) == 3 + 4


def test_no_retries_when_disabled(fake):
    target, rec = fake
    rec.script = [(S.UNAVAILABLE, "down", ())]
    with Client(target, retries=0) as c, pytest.raises(treelm.Unavailable):
        c.status()
    assert len(rec.calls) == 1


def test_the_timeout_bounds_all_attempts_together(fake):
    target, rec = fake
    rec.script = [(S.UNAVAILABLE, "down", ())] * 1000
    policy = RetryPolicy(retries=1000, initial_backoff=0.05, max_backoff=0.05)
    with Client(target, retries=policy, timeout=0.3) as c, pytest.raises((treelm.Unavailable, treelm.DeadlineExceeded)):
        c.nodes()
    assert 1 < len(rec.calls) < 1000


def test_stream_yields_chunks_in_order_with_usage_on_the_last(fake, client):
    _, _rec = fake
    chunks = list(client.stream("demo/en", "p"))
    assert [c.index for c in chunks] == [0, 1, 2] and "".join(c.text for c in chunks) == "t0t1t2"
    assert [c.last for c in chunks] == [False, False, True]
    assert chunks[-1].finish_reason is FinishReason.STOP and chunks[-1].usage.completion_tokens == 3
    assert chunks[0].usage is None and chunks[0].token_ids == (10,)


def test_stream_is_retried_before_its_first_chunk_only(fake, client):
    _, rec = fake
    rec.script = [(S.UNAVAILABLE, "down", ())]
    assert len(list(client.stream("demo/en", "p"))) == 3
    assert len(rec.calls) == 2
    rec.calls.clear()
    rec.script = [(S.UNAVAILABLE, "down mid-stream", ())]
    rec.chunks_before_failure = 1
    got = []
    with pytest.raises(treelm.Unavailable):
        for chunk in client.stream("demo/en", "p"):
            got.append(chunk.text)
    assert got == ["t0"] and len(rec.calls) == 1  # text was delivered: never replayed


def test_cancelling_a_stream_tells_the_server(fake, client):
    _, rec = fake
    rec.stream_chunks, rec.chunk_delay_s = 1000, 0.01
    stream = client.stream("demo/en", "p")
    first = next(stream)
    stream.cancel()
    assert first.index == 0
    assert rec.cancelled.wait(5), "the server never saw the cancellation"
    assert list(stream) == []


def test_registry_and_admin_calls_decode(fake, client):
    _, rec = fake
    nodes = client.nodes()
    assert [n.id for n in nodes] == ["demo", "demo/en"] and nodes[0].parent is None
    assert nodes[1].stable_version == 1 and nodes[1].language == "en"
    assert client.node("demo/en").id == "demo/en"
    (version,) = client.versions("demo/en")
    assert version.metrics == {"eval_ppl": 12.5} and version.parent_version is None
    assert version.created_at == datetime.datetime(2023, 11, 14, 22, 13, 20)
    m = client.match("en/medical", device="cpu", memory=8 * 2**30, context=2048)
    request = rec.calls[-1][1]
    assert (request.task, request.device, request.memory, request.context) == ("en/medical", "cpu", "8589934592B", 2048)
    assert m.best.node == "demo/en/medical" and m.best.reasons == ("memory=8589934592B",)
    (suggestion,) = m.suggestions
    assert (suggestion.kind, suggestion.context, suggestion.node) == ("shorter-context", 512, None)
    client.match("en", memory="8GiB", bandwidth="50GB/s", tags=["clinical"], tree="demo")
    request = rec.calls[-1][1]
    assert (request.memory, request.bandwidth, list(request.tags), request.tree) == (
        "8GiB",
        "50GB/s",
        ["clinical"],
        "demo",
    )
    status = client.status()
    assert status.tenant == "acme" and status.trunks[0].queue_depth == 2 and status.trunks[0].cache.hits == 5


def test_an_injected_channel_is_used_and_left_open(fake):
    target, _rec = fake
    seen = []

    class Spy(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            seen.append(details.method)
            return continuation(details, request)

    channel = grpc.intercept_channel(grpc.insecure_channel(target), Spy())
    with Client(channel=channel, token="t") as c:
        c.status()
    assert seen == ["/treelm.v1.Admin/Status"]
    Client(channel=channel).status()  # still open after the first client closed
    channel.close()


def test_client_arguments_are_checked():
    with pytest.raises(ValueError):
        Client()
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", token="two\nlines")
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)


async def test_async_client_generates_streams_and_retries(fake):
    target, rec = fake
    async with AsyncClient(target, token="tok-a", retries=FAST) as client:
        rec.script = [(S.RESOURCE_EXHAUSTED, "busy", ())]
        results = await asyncio.gather(*(client.generate(f"demo/n{i}", f"p{i}") for i in range(4)))
        assert [r.text for r in results] == [f"echo:p{i}" for i in range(4)]
        assert len(rec.calls) == 5 and rec.calls[0][2]["authorization"] == "Bearer tok-a"
        chunks = [c async for c in client.stream("demo/en", "p")]
        assert [c.text for c in chunks] == ["t0", "t1", "t2"] and chunks[-1].last
        rec.script = [(S.NOT_FOUND, "node 'demo/x' not found", (("treelm-error-kind", "node-not-found"),))]
        with pytest.raises(treelm.NodeNotFound):
            await client.node("demo/x")
        rec.script = [(S.INVALID_ARGUMENT, "memory: bad", (("treelm-error-field", "memory"),))]
        with pytest.raises(treelm.InvalidRequest) as info:
            await client.match("en", memory="eight gigs")
        assert info.value.field == "memory"
        assert [n.id for n in await client.nodes()] == ["demo", "demo/en"]
        assert (await client.status()).auth_enabled


async def test_async_stream_cancel_reaches_the_server(fake):
    target, rec = fake
    rec.stream_chunks, rec.chunk_delay_s = 1000, 0.01
    async with AsyncClient(target) as client:
        stream = client.stream("demo/en", "p")
        assert (await stream.__anext__()).index == 0
        stream.cancel()
        assert await asyncio.to_thread(rec.cancelled.wait, 5)
        assert [c async for c in stream] == []


async def test_async_client_accepts_an_injected_aio_channel(fake):
    target, _rec = fake
    channel = grpc.aio.insecure_channel(target)
    client = AsyncClient(channel=channel)
    await client.close()  # not ours: stays open
    assert (await client.generate("demo", "x")).text == "echo:x"
    await channel.close()


def test_non_idempotent_calls_are_never_retried(fake, client):
    from protos.treelm.v1 import admin_pb2

    _, rec = fake
    rec.script = [(S.UNAVAILABLE, "down", ())]
    with pytest.raises(treelm.Unavailable):
        client._unary(client._admin.Status, admin_pb2.StatusRequest(), 5, idempotent=False)
    assert len(rec.calls) == 1


def test_backoff_is_exponential_with_full_jitter_and_capped():
    policy = RetryPolicy(retries=10, initial_backoff=0.1, max_backoff=1.0)
    for attempt in range(8):
        cap = min(1.0, 0.1 * 2**attempt)
        samples = [policy.backoff(attempt) for _ in range(200)]
        assert all(0.0 <= s <= cap for s in samples)
        assert max(samples) > 0.5 * cap  # spread over the whole interval, not a fixed sleep
