"""The one table from the project's typed errors to wire statuses: a gRPC code, an HTTP status,
a finer ``kind``, and OpenAI's error ``type`` and ``code``. The gRPC interceptors and the HTTP
API (cluster/http/) both answer from here.

| error | gRPC | HTTP |
|---|---|---|
| unknown node; another tenant's private node (same message); unknown update, version, tenant; a response id unknown to the caller's tenant (kind ``response-not-found``, the same message for another tenant's) | NOT_FOUND | 404 |
| a bad parameter (the message and ``treelm-error-field`` name the field); malformed envelope, manifest, package, key; payload files that differ from the manifest; another base; shapes; an HTTP body that is not UTF-8 JSON | INVALID_ARGUMENT | 400 |
| an HTTP body over the size limit | RESOURCE_EXHAUSTED | 413 |
| an HTTP ``Range`` a variant file cannot satisfy (HTTP only) | OUT_OF_RANGE | 416 |
| no bearer token, or an unknown / revoked one | UNAUTHENTICATED | 401 |
| a valid token that may not do this; unknown key, revoked key, too few valid signatures; an approval that may not count | PERMISSION_DENIED | 403 |
| the same update version again; a fine-tuning job's new node id that is taken (kind ``node-exists``) | ALREADY_EXISTS | 409 |
| the engine's queue is full; the caller's tenant is over its own limit (queued requests: kind ``tenant-over-limit``; tokens per minute: ``rate-limited``); both carry a retry hint, gRPC trailing metadata ``retry-after`` and HTTP ``Retry-After`` (whole seconds) | RESOURCE_EXHAUSTED | 429 |
| an update upload beyond its tenant's concurrent uploads or the spool's bytes; a fine-tuning job beyond its tenant's queued and running jobs (kind ``job-quota``); a training file beyond its tenant's stored files or bytes (``file-quota``) | RESOURCE_EXHAUSTED | 429 |
| an update upload idle past its deadline | DEADLINE_EXCEEDED | 504 |
| the request's deadline passed | DEADLINE_EXCEEDED | 504 |
| the engine or server is shutting down; a Ray replica or the update desk died; the database is unreachable | UNAVAILABLE | 503 |
| feedback on a response whose records its tenant deleted (kind ``feedback-deleted``) | FAILED_PRECONDITION | 409 |
| stored state that forbids the call (an alias to a revoked version, an outdated schema); a pinned node version that is not the served one; an update that is expired, older, skipped, over a stale parent, refused by screening or the gate, not awaiting approval | FAILED_PRECONDITION | 409 |
| an adapter file changed on disk | DATA_LOSS | 500 |
| a call the server does not offer (Updates without an update desk; fine-tuning for a tree without ``customize.key``) | UNIMPLEMENTED | 501 |
| anything else: a server bug, logged with its traceback and an incident id | INTERNAL | 500 |

Private nodes: a node that is private to another tenant is answered with NOT_FOUND and exactly
the message of a node that does not exist. PERMISSION_DENIED would confirm that the node exists
(and its id can carry information, e.g. a hospital's name), so callers cannot tell the two apart.

The update protocol's refusals carry a kind derived from the error's class (``threshold``,
``stale-parent``, ``screening-too-large``, ...), which the SDK turns back into a typed error.

OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``): ``type`` follows the
gRPC code (``invalid_request_error``, ``authentication_error``, ``permission_error``,
``rate_limit_error``, ``timeout_error``, ``server_error``); ``code`` is the kind in snake case
where there is one (``model_not_found`` for an unknown node or version, ``version_not_served``,
``shutting_down``, ``unknown_parameter``, ...), else a default per gRPC code (``invalid_value``,
``invalid_api_key``, ``rate_limit_exceeded``, ...); ``param`` is the field.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass

import grpc

from cluster import errors as ce
from hierarchy import errors as he
from nodes import errors as ne
from registry import errors as re_

__all__ = [
    "ERROR_FIELD_KEY",
    "ERROR_KIND_KEY",
    "HTTP_STATUS",
    "OPENAI_ERRORS",
    "RETRY_AFTER_KEY",
    "WireStatus",
    "wire_status",
]

# Trailing-metadata keys; the SDK (treelm/_errors.py) reads the same names.
ERROR_FIELD_KEY = "treelm-error-field"
ERROR_KIND_KEY = "treelm-error-kind"
RETRY_AFTER_KEY = "retry-after"  # trailing metadata of a RESOURCE_EXHAUSTED refusal: seconds to wait

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

# OpenAI's error ``type`` and default ``code`` per gRPC code (the HTTP API's error body).
OPENAI_ERRORS: dict[grpc.StatusCode, tuple[str, str]] = {
    _S.CANCELLED: ("invalid_request_error", "cancelled"),
    _S.INVALID_ARGUMENT: ("invalid_request_error", "invalid_value"),
    _S.OUT_OF_RANGE: ("invalid_request_error", "invalid_value"),
    _S.NOT_FOUND: ("invalid_request_error", "not_found"),
    _S.ALREADY_EXISTS: ("invalid_request_error", "conflict"),
    _S.FAILED_PRECONDITION: ("invalid_request_error", "conflict"),
    _S.ABORTED: ("invalid_request_error", "conflict"),
    _S.UNAUTHENTICATED: ("authentication_error", "invalid_api_key"),
    _S.PERMISSION_DENIED: ("permission_error", "permission_denied"),
    _S.RESOURCE_EXHAUSTED: ("rate_limit_error", "rate_limit_exceeded"),
    _S.DEADLINE_EXCEEDED: ("timeout_error", "deadline_exceeded"),
    _S.UNAVAILABLE: ("server_error", "service_unavailable"),
    _S.UNIMPLEMENTED: ("server_error", "not_implemented"),
}
_OPENAI_CODE_OF_KIND = {"node-not-found": "model_not_found", "version-not-found": "model_not_found"}
# Kinds whose HTTP status (and OpenAI type) differ from their gRPC code's.
_HTTP_OF_KIND = {
    "request-too-large": (413, "invalid_request_error"),
    "range-not-satisfiable": (416, "invalid_request_error"),
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
    (ce.JobError, _S.FAILED_PRECONDITION, "job-failed"),
    (ce.PackageError, _S.INVALID_ARGUMENT, "package"),
    # -- serving, the registry, the servers
    (ce.NodeNotVisible, _S.NOT_FOUND, "node-not-found"),
    (ne.UnknownNode, _S.NOT_FOUND, "node-not-found"),
    (ce.UnknownVersion, _S.NOT_FOUND, "version-not-found"),
    (ce.VersionNotServed, _S.FAILED_PRECONDITION, "version-not-served"),
    (ce.UnknownParameter, _S.INVALID_ARGUMENT, "unknown-parameter"),
    (re_.NodeNotFound, _S.NOT_FOUND, "node-not-found"),
    (re_.ResponseNotFound, _S.NOT_FOUND, "response-not-found"),
    (re_.FeedbackDeleted, _S.FAILED_PRECONDITION, "feedback-deleted"),
    (re_.FileNotFound, _S.NOT_FOUND, "file-not-found"),
    (re_.JobNotFound, _S.NOT_FOUND, "job-not-found"),
    (re_.NodeExists, _S.ALREADY_EXISTS, "node-exists"),
    (re_.FileInUse, _S.FAILED_PRECONDITION, "file-in-use"),
    (re_.JobFinished, _S.FAILED_PRECONDITION, "job-finished"),
    (re_.JobQuotaExceeded, _S.RESOURCE_EXHAUSTED, "job-quota"),
    (re_.FileQuotaExceeded, _S.RESOURCE_EXHAUSTED, "file-quota"),
    (ce.FineTuningOff, _S.UNIMPLEMENTED, "fine-tuning-off"),
    (re_.NotFound, _S.NOT_FOUND, None),
    (ce.BadArgument, _S.INVALID_ARGUMENT, None),
    (ne.InvalidRequest, _S.INVALID_ARGUMENT, None),
    (re_.InvalidInput, _S.INVALID_ARGUMENT, None),
    (he.InvalidNodePath, _S.INVALID_ARGUMENT, None),
    (ce.MalformedRequest, _S.INVALID_ARGUMENT, "malformed-request"),
    (ce.RequestTooLarge, _S.RESOURCE_EXHAUSTED, "request-too-large"),
    (ce.RangeNotSatisfiable, _S.OUT_OF_RANGE, "range-not-satisfiable"),
    (ce.UploadRefused, _S.RESOURCE_EXHAUSTED, "upload-refused"),
    (ce.UploadIdle, _S.DEADLINE_EXCEEDED, "upload-idle"),
    (ce.Unauthenticated, _S.UNAUTHENTICATED, None),
    (re_.InvalidToken, _S.UNAUTHENTICATED, None),
    (ce.PermissionDenied, _S.PERMISSION_DENIED, None),
    (ne.TenantOverLimit, _S.RESOURCE_EXHAUSTED, "tenant-over-limit"),
    (ce.RateLimited, _S.RESOURCE_EXHAUSTED, "rate-limited"),
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
    retry_after_s: int | None = None  # when a refused caller may try again (whole seconds, at least 1)

    @property
    def http_status(self) -> int:
        if self.kind in _HTTP_OF_KIND:
            return _HTTP_OF_KIND[self.kind][0]
        return HTTP_STATUS.get(self.code, 500)

    @property
    def openai_type(self) -> str:
        if self.kind in _HTTP_OF_KIND:
            return _HTTP_OF_KIND[self.kind][1]
        return OPENAI_ERRORS.get(self.code, ("server_error", "internal_error"))[0]

    @property
    def openai_code(self) -> str:
        if self.kind:
            return _OPENAI_CODE_OF_KIND.get(self.kind, self.kind.replace("-", "_"))
        return OPENAI_ERRORS.get(self.code, ("server_error", "internal_error"))[1]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        meta = []
        if self.field:
            meta.append((ERROR_FIELD_KEY, self.field))
        if self.kind:
            meta.append((ERROR_KIND_KEY, self.kind))
        if self.retry_after_s is not None:
            meta.append((RETRY_AFTER_KEY, str(self.retry_after_s)))
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
        retry = getattr(exc, "retry_after_s", None) if code is _S.RESOURCE_EXHAUSTED else None
        retry_after = max(1, math.ceil(retry)) if isinstance(retry, (int, float)) else None
        return WireStatus(code, details, field, _derived_kind(exc) if kind == _DERIVED else kind, retry_after)
    if isinstance(exc, _SERVER_FAULTS):
        return WireStatus(_S.INTERNAL, f"the server could not load a model: {exc}")
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s: %r", incident, exc, exc_info=exc)
    return WireStatus(_S.INTERNAL, f"internal server error (incident {incident}); the server log has details")
