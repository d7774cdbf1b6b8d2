"""`TreeServer` over a real engine and registry, through the SDK on real 127.0.0.1 sockets."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import treelm
from nodes.base.model import TinyBaseConfig, make_tiny_base
from nodes.runtime.engine import EngineConfig
from nodes.runtime.requests import ChatMessage, GenerationRequest, SamplingParams
from tests.cluster.grpc_harness import PRIVATE, PUBLIC_LEAVES, make_world, serve

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base with a long context, so that one stream can run for seconds."""
    root = tmp_path_factory.mktemp("grpc-server")
    base = make_tiny_base(
        root / "base", TinyBaseConfig(hidden=64, layers=2, vocab=400, heads=4, kv_heads=2, max_position=8192)
    )
    w = make_world(base, root, EngineConfig(max_batch_size=16, max_new_tokens_limit=8000))
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def server(world):
    s = serve(world, metrics_port=0)
    yield s
    s.stop()


def wait_until(predicate, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def engine_tokens(world, node, prompt=None, messages=None, **params) -> tuple[int, ...]:
    msgs = tuple(ChatMessage(**m) for m in messages) if messages else None
    request = GenerationRequest(node=node, prompt=prompt, messages=msgs, params=SamplingParams(**params))
    return (await world.engine.generate(request)).token_ids


async def test_unary_and_streams_for_several_nodes_at_once_match_the_engine(world, server):
    nodes = ("rt", "rt/en", *PUBLIC_LEAVES, PRIVATE)
    async with treelm.AsyncClient(server.target, token=world.tokens["acme"]) as client:
        unary = await asyncio.gather(
            *(client.generate(n, f"Report {i}:", max_new_tokens=12) for i, n in enumerate(nodes))
        )

        async def collect(i, node):
            return [c async for c in client.stream(node, f"Report {i}:", max_new_tokens=12)]

        streams = await asyncio.gather(*(collect(i, n) for i, n in enumerate(nodes)))
    for i, (node, result, chunks) in enumerate(zip(nodes, unary, streams, strict=False)):
        expected = await engine_tokens(world, node, f"Report {i}:", max_new_tokens=12)
        assert result.token_ids == expected, node
        assert tuple(t for c in chunks for t in c.token_ids) == expected, node
        assert "".join(c.text for c in chunks) == result.text
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert chunks[-1].last and not any(c.last for c in chunks[:-1])
        assert chunks[-1].usage == result.usage and result.usage.completion_tokens == len(expected)
        want_version = world.tree.node(node).version if node != "rt" else 0
        assert result.node == node and result.node_version == want_version and chunks[0].node_version == want_version
        assert 0 <= result.timings.queue_s <= result.timings.ttft_s <= result.timings.total_s


async def test_chat_messages_and_sampling_match_the_engine(world, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a scan?"}]
    params = dict(max_new_tokens=10, temperature=0.9, top_p=0.8, top_k=20, seed=7)
    async with treelm.AsyncClient(server.target, token=world.tokens["globex"]) as client:
        result = await client.generate("rt/en/medical/radiology", messages=messages, **params)
    expected = await engine_tokens(world, "rt/en/medical/radiology", messages=messages, **params)
    assert result.token_ids == expected and result.usage.prompt_tokens > 10


def test_health_and_reflection_answer_stock_clients_without_a_token(world, server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "treelm.v1.Inference", "treelm.v1.Registry", "treelm.v1.Admin"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (listed,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in listed.list_services_response.service}
        assert {
            "treelm.v1.Inference",
            "treelm.v1.Registry",
            "treelm.v1.Updates",
            "treelm.v1.Admin",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names

        # What grpcurl does: learn the schema by reflection, then call with dynamic messages.
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("treelm.v1.Inference").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        generate = channel.unary_unary(
            "/treelm.v1.Inference/Generate",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        request = request_cls(node="rt/en", prompt="Hi")
        request.params.max_new_tokens = 4
        reply = generate(request, metadata=[("authorization", f"Bearer {world.tokens['globex']}")], timeout=30)
        assert reply.node == "rt/en" and len(reply.token_ids) == 4


def test_a_client_that_disconnects_mid_stream_frees_its_slot(world, server):
    before = world.engine.stats()
    with treelm.Client(server.target, token=world.tokens["acme"]) as client:
        stream = client.stream("rt/en/medical", "long", max_new_tokens=6000)  # seconds of greedy decoding
        first = [next(stream), next(stream)]
        assert world.engine.stats().active_requests >= 1
        stream.cancel()
    assert [c.index for c in first] == [0, 1]
    wait_until(lambda: world.engine.stats().active_requests == 0, what="the engine to drop the cancelled row")
    after = world.engine.stats()
    assert after.cancelled == before.cancelled + 1 and after.queue_depth == 0
    assert after.tokens_generated - before.tokens_generated < 6000  # it stopped early
    wait_until(lambda: server.server.status_interceptor.in_flight == 0, what="the server to finish the call")


async def test_64_concurrent_streams_complete_with_nothing_lost_or_mixed_up(world, server):
    combos = [(node, f"Case {k}:") for k, node in enumerate(("rt", "rt/en", *PUBLIC_LEAVES, PRIVATE, "rt/fr"))]
    expected = {combo: await engine_tokens(world, *combo, max_new_tokens=10) for combo in combos}
    async with treelm.AsyncClient(server.target, token=world.tokens["acme"], timeout=120) as client:

        async def one(i):
            node, prompt = combos[i % len(combos)]
            return i, [c async for c in client.stream(node, prompt, max_new_tokens=10, request_id=f"s{i}")]

        results = await asyncio.gather(*(one(i) for i in range(64)))
    assert len(results) == 64
    for i, chunks in results:
        node, prompt = combos[i % len(combos)]
        assert {c.request_id for c in chunks} == {f"s{i}"} and {c.node for c in chunks} == {node}
        assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[-1].last
        assert tuple(t for c in chunks for t in c.token_ids) == expected[(node, prompt)], i
    wait_until(lambda: world.engine.stats().active_requests == 0, what="an idle engine")


def test_admin_status_is_for_operators_and_names_every_loaded_adapter(world, server):
    with (
        treelm.Client(server.target, token=world.tokens["acme"]) as acme,
        treelm.Client(server.target, token=world.operator_token) as operator,
    ):
        acme.generate(PRIVATE, "x", max_new_tokens=2)
        with pytest.raises(treelm.PermissionDenied):
            acme.status()
        status = operator.status()
    assert status.tenant == "ops" and status.auth_enabled
    (trunk,) = status.trunks
    assert trunk.tree == "rt" and trunk.base_digest == world.tree.base_digest and trunk.max_batch == 16
    assert PRIVATE in trunk.loaded_adapters
    assert trunk.cache.loads >= 3 and trunk.cache.active >= 3


def test_prometheus_metrics_count_requests_tokens_and_the_cache(world, server):
    with treelm.Client(server.target, token=world.tokens["globex"]) as client:
        client.generate("rt/fr/medical", "Bonjour", max_new_tokens=5)
        with pytest.raises(treelm.NodeNotFound):
            client.generate("rt/made/up", "x")
    port = server.server.metrics_port
    # The server counts a call after its status is sent, so a fast client can scrape first: poll.
    expected = 'treelm_requests_total{code="NOT_FOUND",method="Inference/Generate",node="other"}'
    for _ in range(50):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if expected in text:
            break
        time.sleep(0.1)
    assert 'treelm_requests_total{code="OK",method="Inference/Generate",node="rt/fr/medical"}' in text
    assert 'treelm_requests_total{code="NOT_FOUND",method="Inference/Generate",node="other"}' in text
    assert "rt/made/up" not in text  # made-up ids do not become labels
    completion = [
        line
        for line in text.splitlines()
        if line.startswith('treelm_tokens_total{kind="completion",node="rt/fr/medical"}')
    ]
    assert completion and float(completion[0].split()[-1]) >= 5
    for name in (
        "treelm_request_latency_seconds_bucket",
        "treelm_time_to_first_token_seconds_bucket",
        'treelm_queue_depth{tree="rt"}',
        'treelm_adapter_cache_loads_total{tree="rt"}',
        'treelm_adapter_cache_hits_total{tree="rt"}',
        "treelm_in_flight_requests",
    ):
        assert name in text, name
