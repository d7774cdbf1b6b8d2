"""Errors raised by the SDK, decoded from the server's gRPC status codes.

    TreeLMError (PicklableError)    any failed call; ``code`` and ``details`` say what the server said
    ├── NotFound                    NOT_FOUND
    │   ├── NodeNotFound            no such node -- or a private node of another tenant (same answer)
    │   ├── ResponseNotFound        feedback on a response id your tenant never received
    │   ├── FileNotFound            a training file id your tenant does not have
    │   └── JobNotFound             a fine-tuning job id your tenant does not have
    ├── InvalidRequest              INVALID_ARGUMENT / OUT_OF_RANGE; ``field`` names the bad parameter
    │                               (also a message over gRPC's size limit: field "message")
    ├── Unauthenticated             UNAUTHENTICATED: no token, or a token the server does not know
    ├── PermissionDenied            PERMISSION_DENIED: the token may not do this
    ├── FailedPrecondition          FAILED_PRECONDITION / ABORTED / ALREADY_EXISTS
    │   ├── FeedbackDeleted         feedback on a response whose records your tenant deleted
    │   ├── NodeExists              a fine-tuning job's new node id is taken: choose another suffix
    │   ├── JobFinished             cancelling a job that already ended
    │   └── FileInUse               deleting a file a queued or running job reads
    ├── Overloaded                  RESOURCE_EXHAUSTED: the queue is full (retried with backoff)
    │   ├── JobQuotaExceeded        your tenant's queued and running jobs are at its limit (not retried)
    │   └── FileQuotaExceeded       your tenant's stored training files are at its limit (not retried)
    ├── Unavailable                 UNAVAILABLE: unreachable or shutting down (retried with backoff)
    ├── DeadlineExceeded            DEADLINE_EXCEEDED: the call's timeout passed
    ├── Cancelled                   CANCELLED
    ├── Unimplemented               UNIMPLEMENTED: this server does not offer the method
    │   └── FineTuningOff           the server runs no fine-tuning jobs for that tree
    ├── ServerError                 INTERNAL / UNKNOWN / DATA_LOSS: a server bug, not your mistake
    ├── PullError                   a pull that left no ready directory (the old one, if any, is intact)
    │   ├── VerificationFailed      a signature, delegation, manifest or file hash that does not verify
    │   └── DiskError               the output directory cannot be written (not writable, disk full)
    └── JobFailed                   a fine-tuning job you waited for ended without a node (``job``, ``reason``)
        └── JobCancelled            ... because it was cancelled

Example::

    from treelm import Client, NodeNotFound, InvalidRequest

    try:
        Client("127.0.0.1:50051", token=TOKEN).generate("demo/xx", prompt="hi")
    except NodeNotFound as exc:
        print("no such node:", exc.details)
    except InvalidRequest as exc:
        print("fix parameter", exc.field)
"""

from __future__ import annotations

from typing import Any

import grpc

from hierarchy.errors import PicklableError

__all__ = [
    "ERROR_FIELD_KEY",
    "ERROR_KIND_KEY",
    "Cancelled",
    "DeadlineExceeded",
    "DiskError",
    "FailedPrecondition",
    "FeedbackDeleted",
    "FileInUse",
    "FileNotFound",
    "FileQuotaExceeded",
    "FineTuningOff",
    "InvalidRequest",
    "JobCancelled",
    "JobFailed",
    "JobFinished",
    "JobNotFound",
    "JobQuotaExceeded",
    "NodeExists",
    "NodeNotFound",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "PullError",
    "ResponseNotFound",
    "ServerError",
    "TreeLMError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "VerificationFailed",
    "from_rpc_error",
]

# Trailing-metadata keys the server sets next to the status code (the wire contract).
ERROR_FIELD_KEY = "treelm-error-field"  # the request field an INVALID_ARGUMENT is about
ERROR_KIND_KEY = "treelm-error-kind"  # a finer kind than the code, e.g. "node-not-found"
RETRY_AFTER_KEY = "retry-after"  # seconds a refused caller should wait (RESOURCE_EXHAUSTED)


class TreeLMError(PicklableError):
    """A call failed. ``code`` is the gRPC status code, ``details`` the server's message, ``kind`` the
    server's finer reason when it gives one (e.g. ``"hash-mismatch"``, ``"stale-parent"``)."""

    retryable = False  # whether the SDK retries (idempotent calls only)
    kind = ""
    retry_after: float | None = None  # the server's hint: seconds to wait before trying again

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        self.details = details
        self.code = code
        super().__init__(details if code is None else f"{code.name}: {details}")


class NotFound(TreeLMError):
    """The thing asked for does not exist (for this caller)."""


class NodeNotFound(NotFound):
    """No such node. A private node of another tenant gives this too, so its existence never leaks."""


class InvalidRequest(TreeLMError, ValueError):
    """A parameter is wrong; ``field`` names it (``"top_p"``, ``"messages.role"``, ...)."""

    def __init__(self, details: str, code: grpc.StatusCode | None = None, field: str = ""):
        self.field = field
        super().__init__(details, code)


class Unauthenticated(TreeLMError):
    """The server needs a token (``Client(..., token=...)``) or does not know this one."""


class PermissionDenied(TreeLMError):
    """The token is valid but may not do this."""


class FailedPrecondition(TreeLMError):
    """The system is not in the state the call needs (e.g. a version that is not current)."""


class ResponseNotFound(NotFound):
    """No response with this id for your tenant (another tenant's id gives this too)."""


class FeedbackDeleted(FailedPrecondition):
    """Your tenant deleted this response's records: it takes no more feedback (deletion is final)."""


class FileNotFound(NotFound):
    """No training file with this id for your tenant (another tenant's id gives this too)."""


class JobNotFound(NotFound):
    """No fine-tuning job with this id for your tenant (another tenant's id gives this too)."""


class NodeExists(FailedPrecondition):
    """The node a fine-tuning job would create exists already, or another job is creating it."""


class JobFinished(FailedPrecondition):
    """The job already ended: there is nothing to cancel."""


class FileInUse(FailedPrecondition):
    """A queued or running job reads this file: cancel the job or wait for it before deleting."""


class Overloaded(TreeLMError):
    """The server's queue is full, or the caller's tenant is over one of its limits (``kind``
    ``tenant-over-limit`` or ``rate-limited``); back off ``retry_after`` seconds and retry (the SDK
    does so for idempotent calls)."""

    retryable = True


class JobQuotaExceeded(Overloaded):
    """Your tenant has as many queued and running fine-tuning jobs as it may: wait for one to end
    or cancel one (``retry_after`` is the server's hint). Never retried by the SDK."""

    retryable = False


class FileQuotaExceeded(Overloaded):
    """Your tenant keeps as many training files (or bytes of them) as it may: delete some first.
    Never retried by the SDK (waiting does not free anything)."""

    retryable = False


class Unavailable(TreeLMError):
    """The server cannot be reached or is shutting down (retried for idempotent calls)."""

    retryable = True


class DeadlineExceeded(TreeLMError):
    """The call's deadline (``timeout=``) passed before it finished."""


class Cancelled(TreeLMError):
    """The call was cancelled."""


class Unimplemented(TreeLMError):
    """The server does not implement this method (yet)."""


class FineTuningOff(Unimplemented):
    """The server runs no fine-tuning jobs for that tree (its update policy has no customize.key)."""


class ServerError(TreeLMError):
    """The server failed in a way that is not the caller's mistake (INTERNAL, UNKNOWN, ...)."""


_BY_CODE: dict[grpc.StatusCode, type[TreeLMError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


# Finer classes for some kinds (the server's kind is a subdivision of its code).
_BY_KIND: dict[str, type[TreeLMError]] = {
    "node-not-found": NodeNotFound,
    "response-not-found": ResponseNotFound,
    "feedback-deleted": FeedbackDeleted,
    "file-not-found": FileNotFound,
    "job-not-found": JobNotFound,
    "node-exists": NodeExists,
    "job-finished": JobFinished,
    "file-in-use": FileInUse,
    "job-quota": JobQuotaExceeded,
    "file-quota": FileQuotaExceeded,
    "fine-tuning-off": FineTuningOff,
}


def _metadata(rpc_error: Any) -> dict[str, str]:
    try:
        items = rpc_error.trailing_metadata() or ()
    except Exception:  # some RpcError kinds carry no call (e.g. a channel that never connected)
        return {}
    return {str(k): v if isinstance(v, str) else v.decode("utf-8", "replace") for k, v in items}


def from_rpc_error(rpc_error: grpc.RpcError) -> TreeLMError:
    """The typed error for a failed call (``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = rpc_error.code() if hasattr(rpc_error, "code") else grpc.StatusCode.UNKNOWN
    details = (rpc_error.details() if hasattr(rpc_error, "details") else None) or str(rpc_error)
    meta = _metadata(rpc_error)
    cls = _BY_CODE.get(code, ServerError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details:
        # gRPC's own size limit (either side): the request is too big, retrying cannot help.
        return InvalidRequest(details, code, field="message")
    if cls is InvalidRequest:
        field = meta.get(ERROR_FIELD_KEY) or (details.split(":", 1)[0] if ":" in details else "")
        error: TreeLMError = InvalidRequest(details, code, field=field.strip())
    else:
        cls = _BY_KIND.get(meta.get(ERROR_KIND_KEY, ""), cls)
        error = cls(details, code)
    error.kind = meta.get(ERROR_KIND_KEY, "")
    try:
        error.retry_after = float(meta[RETRY_AFTER_KEY]) if RETRY_AFTER_KEY in meta else None
    except ValueError:  # a malformed hint is no hint
        error.retry_after = None
    return error


class PullError(TreeLMError):
    """A pull did not produce a ready directory; the output directory is as it was (absent, or the old one)."""


class VerificationFailed(PullError):
    """Something downloaded does not verify against the root keys or the signed manifest: refused."""


class DiskError(PullError):
    """The output directory cannot be written (not writable, or the disk is full)."""


class JobFailed(TreeLMError):
    """A fine-tuning job you waited for ended without a new node: ``job`` is its final state (a
    :class:`treelm.JobState`), ``reason`` its error code (``gate``: it did not beat its parent on
    held-out text; ``data``, ``training``, ``registration``, ``interrupted``; ``cancelled``)."""

    def __init__(self, details: str, job: Any = None, reason: str = ""):
        self.job = job
        self.reason = reason
        super().__init__(details)


class JobCancelled(JobFailed):
    """The job you waited for was cancelled (by you, or by an operator) before it made a node."""
