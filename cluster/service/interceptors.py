"""The one place that turns the project's typed errors into gRPC status codes, plus auth.

| error | code |
|---|---|
| unknown node; another tenant's private node (same message, see below) | NOT_FOUND |
| a bad parameter (the message and ``treelm-error-field`` name the field) | INVALID_ARGUMENT |
| no bearer token, or an unknown / revoked one | UNAUTHENTICATED |
| a valid token that may not do this | PERMISSION_DENIED |
| the engine's queue is full | RESOURCE_EXHAUSTED |
| the request's deadline passed | DEADLINE_EXCEEDED |
| the engine or server is shutting down; a Ray replica died; the database is unreachable | UNAVAILABLE |
| a stored state that forbids the call (alias to a revoked version, outdated schema) | FAILED_PRECONDITION |
| an adapter file changed on disk | DATA_LOSS |
| the update protocol's refusals (bad signature, stale version, screening, gate, ...) | see cluster/updates/wire.py |
| Updates on a server without an update coordinator | UNIMPLEMENTED |
| anything else: a server bug, logged with its traceback | INTERNAL |

Private nodes: a node that is private to another tenant is answered with NOT_FOUND
and exactly the message of a node that does not exist. PERMISSION_DENIED would
confirm that the node exists (and its id can carry information, e.g. a hospital's
name), so callers cannot tell the two apart; nothing of the node is returned.

Only ``/treelm.v1.*`` methods pass through these interceptors; the standard health
and reflection services answer without a token so stock tools can probe a server.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from cluster.errors import (
    BadArgument,
    NodeNotVisible,
    PermissionDenied,
    ReplicaUnavailable,
    ShuttingDown,
    Unauthenticated,
)
from cluster.service.auth import CALLER, Authenticator
from cluster.updates.wire import update_wire_status
from hierarchy.errors import InvalidNodePath
from nodes import errors as engine_errors
from nodes.errors import AdapterError, BaseModelError, IntegrityError
from registry import errors as registry_errors

__all__ = [
    "ERROR_FIELD_KEY",
    "ERROR_KIND_KEY",
    "PROTECTED_PREFIX",
    "AuthInterceptor",
    "StatusInterceptor",
    "WireStatus",
    "wire_status",
]

# Trailing-metadata keys; the SDK (treelm/_errors.py) reads the same names.
ERROR_FIELD_KEY = "treelm-error-field"
ERROR_KIND_KEY = "treelm-error-kind"
PROTECTED_PREFIX = "/treelm.v1."

log = logging.getLogger("treelm.server")

_S = grpc.StatusCode


@dataclass(frozen=True)
class WireStatus:
    """How one error goes on the wire."""

    code: grpc.StatusCode
    details: str
    field: str | None = None  # the request field a bad argument is about
    kind: str | None = None  # a finer kind than the code, e.g. "node-not-found"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        meta = []
        if self.field:
            meta.append((ERROR_FIELD_KEY, self.field))
        if self.kind:
            meta.append((ERROR_KIND_KEY, self.kind))
        return tuple(meta)


# (error type, code, kind); the first match wins, so subclasses come before their bases.
_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, str | None], ...] = (
    (NodeNotVisible, _S.NOT_FOUND, "node-not-found"),
    (engine_errors.UnknownNode, _S.NOT_FOUND, "node-not-found"),
    (registry_errors.NodeNotFound, _S.NOT_FOUND, "node-not-found"),
    (registry_errors.NotFound, _S.NOT_FOUND, None),
    (BadArgument, _S.INVALID_ARGUMENT, None),
    (engine_errors.InvalidRequest, _S.INVALID_ARGUMENT, None),
    (registry_errors.InvalidInput, _S.INVALID_ARGUMENT, None),
    (InvalidNodePath, _S.INVALID_ARGUMENT, None),
    (Unauthenticated, _S.UNAUTHENTICATED, None),
    (registry_errors.InvalidToken, _S.UNAUTHENTICATED, None),
    (PermissionDenied, _S.PERMISSION_DENIED, None),
    (engine_errors.QueueFull, _S.RESOURCE_EXHAUSTED, None),
    (engine_errors.DeadlineExceeded, _S.DEADLINE_EXCEEDED, None),
    (engine_errors.EngineClosed, _S.UNAVAILABLE, "shutting-down"),
    (ShuttingDown, _S.UNAVAILABLE, "shutting-down"),
    (ReplicaUnavailable, _S.UNAVAILABLE, "replica-unavailable"),
    (registry_errors.DatabaseUnavailable, _S.UNAVAILABLE, None),
    (engine_errors.RequestCancelled, _S.CANCELLED, None),
    (registry_errors.DatabaseError, _S.FAILED_PRECONDITION, None),
    (registry_errors.Conflict, _S.FAILED_PRECONDITION, None),
    (IntegrityError, _S.DATA_LOSS, None),
    (NotImplementedError, _S.UNIMPLEMENTED, None),
)

# Server-side failures whose message helps the caller and reveals nothing private.
_SERVER_FAULTS = (AdapterError, BaseModelError)


def wire_status(exc: BaseException) -> WireStatus:
    """The status code, message and metadata for an error raised while serving a call."""
    update = update_wire_status(exc)  # the update protocol's refusals: cluster/updates/wire.py
    if update is not None:
        code, kind, field = update
        return WireStatus(code, str(exc) or type(exc).__name__, field, kind)
    for error_type, code, kind in _TABLE:
        if isinstance(exc, error_type):
            field = getattr(exc, "field", None)
            if error_type is InvalidNodePath:
                field = "node"
            details = str(exc) or error_type.__name__
            if field and str(field).split(".")[0] not in details:
                details = f"{field}: {details}"  # the message always names the field
            if code is _S.UNIMPLEMENTED and not str(exc):
                details = "not implemented by this server yet"
            return WireStatus(code, details, str(field) if field else None, kind)
    if isinstance(exc, _SERVER_FAULTS):
        return WireStatus(_S.INTERNAL, f"the server could not load a model: {exc}")
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s: %r", incident, exc, exc_info=exc)
    return WireStatus(_S.INTERNAL, f"internal server error (incident {incident}); the server log has details")


Behavior = Callable[..., Any]
Wrap = Callable[[Behavior, bool, str], Behavior]


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap: Wrap, method: str) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (keeps serializers and streaming kinds)."""
    if handler.unary_unary:
        make, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        make, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        make, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        make, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return make(
        wrap(behavior, handler.response_streaming, method),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        return _wrap_handler(handler, self.wrap, details.method)

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

    def __init__(self, observe: Callable[[str, str, str, float], None] | None = None):
        self._observe = observe
        self.in_flight = 0  # calls between entry and their last response (one event loop: no lock)

    def _record(self, method: str, request: Any, code: grpc.StatusCode, started: float) -> None:
        self.in_flight -= 1
        if self._observe is not None:
            node = getattr(request, "node", "")  # Inference requests name their node
            self._observe(method, node if isinstance(node, str) else "", code.name, time.perf_counter() - started)

    @staticmethod
    async def _fail(status: WireStatus, context: grpc.aio.ServicerContext) -> None:
        if status.code is not _S.INTERNAL:  # INTERNAL was logged with its traceback already
            log.info("call failed: %s %s", status.code.name, status.details)
        await context.abort(status.code, status.details, status.trailing_metadata())

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        if streaming:

            async def stream_behavior(request: Any, context: grpc.aio.ServicerContext):
                started, code = time.perf_counter(), _S.OK
                self.in_flight += 1
                try:
                    async for item in _iterate(behavior, request, context):
                        yield item
                except grpc.aio.AbortError:
                    code = _S.UNKNOWN
                    raise
                except BaseException as exc:
                    code = _S.CANCELLED
                    if isinstance(exc, Exception):
                        status = wire_status(exc)
                        code = status.code
                        await self._fail(status, context)
                    raise
                finally:
                    self._record(method, request, code, started)

            return stream_behavior

        async def unary_behavior(request: Any, context: grpc.aio.ServicerContext):
            started, code = time.perf_counter(), _S.OK
            self.in_flight += 1
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _S.UNKNOWN
                raise
            except BaseException as exc:
                code = _S.CANCELLED
                if isinstance(exc, Exception):
                    status = wire_status(exc)
                    code = status.code
                    await self._fail(status, context)
                raise
            finally:
                self._record(method, request, code, started)

        return unary_behavior


class AuthInterceptor(_WrappingInterceptor):
    """Resolves the bearer token to a tenant before the servicer runs (``cluster.service.auth.CALLER``)."""

    def __init__(self, authenticator: Authenticator):
        self._auth = authenticator

    def wrap(self, behavior: Behavior, streaming: bool, method: str) -> Behavior:
        if streaming:

            async def stream_behavior(request: Any, context: grpc.aio.ServicerContext):
                caller = await self._auth.authenticate(context.invocation_metadata())
                CALLER.set(caller)
                async for item in _iterate(behavior, request, context):
                    yield item

            return stream_behavior

        async def unary_behavior(request: Any, context: grpc.aio.ServicerContext):
            caller = await self._auth.authenticate(context.invocation_metadata())
            CALLER.set(caller)
            return await behavior(request, context)

        return unary_behavior
