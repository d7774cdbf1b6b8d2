"""gRPC interceptors: errors to status codes (the table is cluster/service/status.py), and auth.

Only ``/treelm.v1.*`` methods pass through these interceptors; the standard health
and reflection services answer without a token so stock tools can probe a server.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from cluster.errors import BadArgument
from cluster.service.auth import CALLER, Authenticator
from cluster.service.client_certs import grpc_peer_certificate
from cluster.service.refusals import PENALIZED_HTTP_STATUSES, RefusalLog, RefusalPenalty
from cluster.service.status import WireStatus, wire_status
from hierarchy.clip import clip

__all__ = ["LOGGED_DETAIL_CHARS", "PROTECTED_PREFIX", "AuthInterceptor", "StatusInterceptor"]

PROTECTED_PREFIX = "/treelm.v1."

log = logging.getLogger("treelm.server")
refusals = RefusalLog(log)

_S = grpc.StatusCode
LOGGED_DETAIL_CHARS = 300  # a refusal's message can quote what a caller sent: the log keeps its start


Behavior = Callable[..., Any]
Wrap = Callable[[Behavior, bool, str], Behavior]


@dataclass(frozen=True)
class _Undecodable:
    """Stands for request bytes the method's message type cannot parse (the behaviour refuses it)."""

    method: str  # e.g. Inference.Generate


def _tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """A deserializer that returns _Undecodable instead of raising: grpc would answer UNKNOWN with
    the parser's exception name; StatusInterceptor answers INVALID_ARGUMENT instead."""
    if deserializer is None:
        return None
    short = method.removeprefix(PROTECTED_PREFIX).replace("/", ".")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _Undecodable(short)

    return deserialize


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise BadArgument("request", f"the bytes sent are not a valid {request.method} request (protobuf)")


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        _refuse_undecodable(request)
        yield request


def _wrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Wrap, method: str, *, tolerant: bool = False
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (keeps serializers and streaming kinds).

    ``tolerant``: undecodable request bytes reach the behaviour as _Undecodable."""
    if handler.unary_unary:
        make, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        make, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        make, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        make, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    deserializer = _tolerant(handler.request_deserializer, method) if tolerant else handler.request_deserializer
    return make(
        wrap(behavior, handler.response_streaming, method),
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def _checked(request: Any) -> Any:
    """The request, or (client streaming) its messages, refusing any that did not decode."""
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    _refuse_undecodable(request)
    return request


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        return _wrap_handler(handler, self.wrap, details.method, tolerant=self.tolerant)

    tolerant = False  # whether this interceptor refuses undecodable requests itself

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:  # pragma: no cover
        raise NotImplementedError


async def _iterate(behavior: Behavior, request: Any, context: Any):
    """Run a response-streaming behaviour (async generator or coroutine using context.write)."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        try:
            async for item in result:
                yield item
        finally:
            await result.aclose()  # a client that went away closes the engine stream too
    else:
        await result


class StatusInterceptor(_WrappingInterceptor):
    """Maps errors to status codes (see the module table) and records each call's outcome.

    ``observe(method, node, code_name, seconds)`` is called once per call when given.
    """

    tolerant = True

    def __init__(
        self,
        observe: Callable[[str, str, str, float], None] | None = None,
        penalty: RefusalPenalty | None = None,
    ):
        self._observe = observe
        self._penalty = penalty
        self.in_flight = 0  # calls between entry and their last response (one event loop: no lock)

    def _record(self, method: str, request: Any, code: grpc.StatusCode, started: float) -> None:
        self.in_flight -= 1
        if self._observe is not None:
            node = getattr(request, "node", "")  # Inference requests name their node
            self._observe(method, node if isinstance(node, str) else "", code.name, time.perf_counter() - started)

    async def _fail(self, status: WireStatus, context: grpc.aio.ServicerContext) -> None:
        if status.code is not _S.INTERNAL:  # INTERNAL was logged with its traceback already
            refusals.info("call failed: %s %s", status.code.name, clip(status.details, LOGGED_DETAIL_CHARS))
        if self._penalty is not None and status.http_status in PENALIZED_HTTP_STATUSES:
            tenant = CALLER.get().tenant
            # ipv4:HOST:PORT / ipv6:[HOST]:PORT: the host alone, so reconnecting makes no new caller.
            await self._penalty.hold(tenant if tenant is not None else f"peer {context.peer().rpartition(':')[0]}")
        await context.abort(status.code, status.details, status.trailing_metadata())

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        if streaming:

            async def stream_behavior(request: Any, context: grpc.aio.ServicerContext):
                started, code = time.perf_counter(), _S.OK
                self.in_flight += 1
                status = None
                try:
                    request = _checked(request)
                    async for item in _iterate(behavior, request, context):
                        yield item
                except grpc.aio.AbortError:
                    code = _S.UNKNOWN
                    raise
                except Exception as exc:
                    status = wire_status(exc)
                    code = status.code
                except BaseException:
                    code = _S.CANCELLED
                    raise
                finally:
                    self._record(method, request, code, started)
                if status is not None:
                    del request  # see unary_behavior
                    await self._fail(status, context)

            return stream_behavior

        async def unary_behavior(request: Any, context: grpc.aio.ServicerContext):
            started, code = time.perf_counter(), _S.OK
            self.in_flight += 1
            try:
                request = _checked(request)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _S.UNKNOWN
                raise
            except Exception as exc:
                status = wire_status(exc)
                code = status.code
            except BaseException:
                code = _S.CANCELLED
                raise
            finally:
                self._record(method, request, code, started)
            # Aborted outside the except block and without the request: grpc keeps the abort's
            # traceback in a reference cycle, which must not hold the error's frames or a request
            # of megabytes until the next full garbage collection.
            del request
            await self._fail(status, context)

        return unary_behavior


class AuthInterceptor(_WrappingInterceptor):
    """Resolves the bearer token to a tenant before the servicer runs (``cluster.service.auth.CALLER``)."""

    def __init__(self, authenticator: Authenticator):
        self._auth = authenticator

    def _certificate(self, context: grpc.aio.ServicerContext) -> bytes | None:
        # Only a server that maps certificates to tenants looks at them.
        return grpc_peer_certificate(context) if self._auth.client_tenants is not None else None

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        if streaming:

            async def stream_behavior(request: Any, context: grpc.aio.ServicerContext):
                caller = await self._auth.authenticate(context.invocation_metadata(), self._certificate(context))
                CALLER.set(caller)
                async for item in _iterate(behavior, request, context):
                    yield item

            return stream_behavior

        async def unary_behavior(request: Any, context: grpc.aio.ServicerContext):
            caller = await self._auth.authenticate(context.invocation_metadata(), self._certificate(context))
            CALLER.set(caller)
            return await behavior(request, context)

        return unary_behavior
