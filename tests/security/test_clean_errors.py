"""Clean errors: bytes that are not the method's protobuf get INVALID_ARGUMENT naming ``request``,
with no Python internals (exception names, tracebacks) in what the caller sees."""

from __future__ import annotations

import grpc
import pytest

from cluster.service.interceptors import StatusInterceptor
from protos.treelm.v1 import updates_pb2, updates_pb2_grpc
from tests.cluster.grpc_harness import serve

pytestmark = pytest.mark.timeout(300)

GARBAGE = (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", b"\x12\x05ab")  # bad tag, overlong length, short field

_INTERNALS = ("DecodeError", "Exception", "Traceback", "deserializ", "google.protobuf", ".py")


def _identity(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize(
    "method,shape",
    [
        ("/treelm.v1.Inference/Generate", "unary_unary"),
        ("/treelm.v1.Inference/GenerateStream", "unary_stream"),
        ("/treelm.v1.Registry/GetNode", "unary_unary"),
        ("/treelm.v1.Registry/Match", "unary_unary"),
    ],
)
def test_undecodable_request_bytes_get_invalid_argument_without_internals(world, method, shape):
    server = serve(world)
    metadata = [("authorization", f"Bearer {world.tokens['acme']}")]
    try:
        with grpc.insecure_channel(server.target) as channel:
            make = getattr(channel, shape)
            stub = make(method, request_serializer=_identity, response_deserializer=_identity)
            for garbage in GARBAGE:
                with pytest.raises(grpc.RpcError) as info:
                    if shape == "unary_unary":
                        stub(garbage, metadata=metadata, timeout=30)
                    else:
                        list(stub(garbage, metadata=metadata, timeout=30))
                error = info.value
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
                assert error.details().startswith("request: the bytes sent are not a valid")
                assert not any(word in error.details() for word in _INTERNALS), error.details()
                assert ("treelm-error-field", "request") in (error.trailing_metadata() or ())
            # The server goes on serving on the same channel.
            ok = channel.unary_unary("/treelm.v1.Registry/ListNodes", request_serializer=_identity)
            assert ok(b"", metadata=metadata, timeout=30)
    finally:
        server.stop()


class _CountingUpdates(updates_pb2_grpc.UpdatesServicer):
    """Reads every chunk of a Submit stream (the real servicer needs an update coordinator)."""

    async def Submit(self, request_iterator, context):
        chunks = [chunk async for chunk in request_iterator]
        return updates_pb2.UpdateStatus(node=f"{len(chunks)} chunks")


async def test_an_undecodable_message_inside_a_client_stream_is_refused_too():
    server = grpc.aio.server(interceptors=[StatusInterceptor()])
    updates_pb2_grpc.add_UpdatesServicer_to_server(_CountingUpdates(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            submit = channel.stream_unary(
                "/treelm.v1.Updates/Submit", request_serializer=_identity, response_deserializer=_identity
            )
            good = updates_pb2.SubmitChunk().SerializeToString()
            assert updates_pb2.UpdateStatus.FromString(await submit(iter([good, good]), timeout=30)).node == "2 chunks"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await submit(iter([good, GARBAGE[0], good]), timeout=30)
    finally:
        await server.stop(0)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request: the bytes sent are not a valid Updates.Submit request (protobuf)"
