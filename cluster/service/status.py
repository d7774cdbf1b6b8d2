"""The one table from the project's typed errors to wire statuses: a gRPC code, an HTTP status
and a finer ``kind``. The gRPC interceptors and the HTTP API both answer from here.

| error | gRPC | HTTP |
|---|---|---|
| unknown node; another tenant's private node (same message); unknown update, version, tenant | NOT_FOUND | 404 |
| a bad parameter (the message and ``treelm-error-field`` name the field); malformed envelope, manifest, package, key; payload files that differ from the manifest; another base; shapes | INVALID_ARGUMENT | 400 |
| no bearer token, or an unknown / revoked one | UNAUTHENTICATED | 401 |
| a valid token that may not do this; unknown key, revoked key, too few valid signatures; an approval that may not count | PERMISSION_DENIED | 403 |
| the same update version again | ALREADY_EXISTS | 409 |
| the engine's queue is full | RESOURCE_EXHAUSTED | 429 |
| the request's deadline passed | DEADLINE_EXCEEDED | 504 |
| the engine or server is shutting down; a Ray replica or the update desk died; the database is unreachable | UNAVAILABLE | 503 |
| stored state that forbids the call (an alias to a revoked version, an outdated schema); an update that is expired, older, skipped, over a stale parent, refused by screening or the gate, not awaiting approval | FAILED_PRECONDITION | 409 |
| an adapter file changed on disk | DATA_LOSS | 500 |
| a call the server does not offer (Updates without an update desk) | UNIMPLEMENTED | 501 |
| anything else: a server bug, logged with its traceback and an incident id | INTERNAL | 500 |

Private nodes: a node that is private to another tenant is answered with NOT_FOUND and exactly
the message of a node that does not exist. PERMISSION_DENIED would confirm that the node exists
(and its id can carry information, e.g. a hospital's name), so callers cannot tell the two apart.

The update protocol's refusals carry a kind derived from the error's class (``threshold``,
``stale-parent``, ``screening-too-large``, ...), which the SDK turns back into a typed error.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

import grpc

from cluster import errors as ce
from hierarchy import errors as he
from nodes import errors as ne
from registry import errors as re_

__all__ = ["ERROR_FIELD_KEY", "ERROR_KIND_KEY", "HTTP_STATUS", "WireStatus", "wire_status"]

# Trailing-metadata keys; the SDK (treelm/_errors.py) reads the same names.
ERROR_FIELD_KEY = "treelm-error-field"
ERROR_KIND_KEY = "treelm-error-kind"

log = logging.getLogger("treelm.server")

_S = grpc.StatusCode

# The HTTP status of each gRPC code (google.rpc's mapping; FAILED_PRECONDITION is a 409 here
# because every such refusal is about stored state the request conflicts with).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    _S.OK: 200,
    _S.CANCELLED: 499,
    _S.INVALID_ARGUMENT: 400,
    _S.NOT_FOUND: 404,
    _S.ALREADY_EXISTS: 409,
    _S.PERMISSION_DENIED: 403,
    _S.UNAUTHENTICATED: 401,
    _S.RESOURCE_EXHAUSTED: 429,
    _S.FAILED_PRECONDITION: 409,
    _S.ABORTED: 409,
    _S.OUT_OF_RANGE: 400,
    _S.UNIMPLEMENTED: 501,
    _S.INTERNAL: 500,
    _S.UNAVAILABLE: 503,
    _S.DATA_LOSS: 500,
    _S.DEADLINE_EXCEEDED: 504,
    _S.UNKNOWN: 500,
}

_DERIVED = "derived"  # the kind is the error class's name in kebab case (update protocol refusals)

# (error type, code, kind); the first match wins, so subclasses come before their bases.
_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, str | None], ...] = (
    # -- the signed update protocol (hierarchy) and the update desk (cluster)
    (he.ReplayError, _S.ALREADY_EXISTS, _DERIVED),
    (he.VersionError, _S.FAILED_PRECONDITION, _DERIVED),
    (he.ExpiredError, _S.FAILED_PRECONDITION, _DERIVED),
    (he.StaleParentError, _S.FAILED_PRECONDITION, _DERIVED),
    (he.ScreeningRejected, _S.FAILED_PRECONDITION, _DERIVED),
    (he.GateRejected, _S.FAILED_PRECONDITION, _DERIVED),
    (he.AggregationError, _S.FAILED_PRECONDITION, _DERIVED),
    (he.RotationError, _S.INVALID_ARGUMENT, _DERIVED),
    (he.ThresholdError, _S.PERMISSION_DENIED, "threshold"),
    (he.TrustError, _S.PERMISSION_DENIED, _DERIVED),
    (he.ManifestError, _S.INVALID_ARGUMENT, "manifest"),
    (he.EnvelopeError, _S.INVALID_ARGUMENT, "envelope"),
    (he.KeyFormatError, _S.INVALID_ARGUMENT, _DERIVED),
    (he.PayloadMismatchError, _S.INVALID_ARGUMENT, _DERIVED),
    (he.BaseMismatchError, _S.INVALID_ARGUMENT, _DERIVED),
    (he.ShapeMismatchError, _S.INVALID_ARGUMENT, _DERIVED),
    (he.UpdateError, _S.INVALID_ARGUMENT, _DERIVED),
    (ce.ApprovalRejected, _S.PERMISSION_DENIED, _DERIVED),
    (ce.NotAwaitingApproval, _S.FAILED_PRECONDITION, _DERIVED),
    (ce.UpdateStateError, _S.FAILED_PRECONDITION, _DERIVED),
    (ce.PackageError, _S.INVALID_ARGUMENT, "package"),
    # -- serving, the registry, the servers
    (ce.NodeNotVisible, _S.NOT_FOUND, "node-not-found"),
    (ne.UnknownNode, _S.NOT_FOUND, "node-not-found"),
    (re_.NodeNotFound, _S.NOT_FOUND, "node-not-found"),
    (re_.NotFound, _S.NOT_FOUND, None),
    (ce.BadArgument, _S.INVALID_ARGUMENT, None),
    (ne.InvalidRequest, _S.INVALID_ARGUMENT, None),
    (re_.InvalidInput, _S.INVALID_ARGUMENT, None),
    (he.InvalidNodePath, _S.INVALID_ARGUMENT, None),
    (ce.Unauthenticated, _S.UNAUTHENTICATED, None),
    (re_.InvalidToken, _S.UNAUTHENTICATED, None),
    (ce.PermissionDenied, _S.PERMISSION_DENIED, None),
    (ne.QueueFull, _S.RESOURCE_EXHAUSTED, None),
    (ne.DeadlineExceeded, _S.DEADLINE_EXCEEDED, None),
    (ne.EngineClosed, _S.UNAVAILABLE, "shutting-down"),
    (ce.ShuttingDown, _S.UNAVAILABLE, "shutting-down"),
    (ce.ReplicaUnavailable, _S.UNAVAILABLE, "replica-unavailable"),
    (re_.DatabaseUnavailable, _S.UNAVAILABLE, None),
    (ne.RequestCancelled, _S.CANCELLED, None),
    (re_.DatabaseError, _S.FAILED_PRECONDITION, None),
    (re_.Conflict, _S.FAILED_PRECONDITION, None),
    (ne.IntegrityError, _S.DATA_LOSS, None),
    (NotImplementedError, _S.UNIMPLEMENTED, None),
)

# Update refusals keep their message as it is: it names the check and the file already.
_UPDATE_ERRORS = (he.UpdateError, ce.CoordinatorError)

# Server-side failures whose message helps the caller and reveals nothing private.
_SERVER_FAULTS = (ne.AdapterError, ne.BaseModelError)


@dataclass(frozen=True)
class WireStatus:
    """How one error goes on the wire (gRPC status + trailing metadata, or an HTTP error body)."""

    code: grpc.StatusCode
    details: str
    field: str | None = None  # the request field a bad argument is about
    kind: str | None = None  # a finer kind than the code, e.g. "node-not-found"

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        meta = []
        if self.field:
            meta.append((ERROR_FIELD_KEY, self.field))
        if self.kind:
            meta.append((ERROR_KIND_KEY, self.kind))
        return tuple(meta)


def _derived_kind(exc: BaseException) -> str:
    if isinstance(exc, he.ScreeningRejected):
        result = exc.details.get("result")
        verdict = getattr(getattr(result, "verdict", None), "value", "rejected")
        return "screening-" + verdict.replace("_", "-")
    name = re.sub(r"Error$", "", type(exc).__name__)
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _field(exc: BaseException, error_type: type[BaseException]) -> str | None:
    if isinstance(exc, he.UpdateError):
        field = exc.details.get("field") or exc.details.get("file")
        if isinstance(exc, he.ManifestError) and field:
            return f"manifest.{field}"
        return str(field) if field else None
    if error_type is he.InvalidNodePath:
        return "node"
    field = getattr(exc, "field", None)
    return str(field) if field else None


def wire_status(exc: BaseException) -> WireStatus:
    """The status, message and metadata for an error raised while serving a call."""
    for error_type, code, kind in _TABLE:
        if not isinstance(exc, error_type):
            continue
        field = _field(exc, error_type)
        details = str(exc) or error_type.__name__
        if field and not isinstance(exc, _UPDATE_ERRORS) and field.split(".")[0] not in details:
            details = f"{field}: {details}"  # the message always names the field
        if code is _S.UNIMPLEMENTED and not str(exc):
            details = "not implemented by this server"
        return WireStatus(code, details, field, _derived_kind(exc) if kind == _DERIVED else kind)
    if isinstance(exc, _SERVER_FAULTS):
        return WireStatus(_S.INTERNAL, f"the server could not load a model: {exc}")
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s: %r", incident, exc, exc_info=exc)
    return WireStatus(_S.INTERNAL, f"internal server error (incident {incident}); the server log has details")
