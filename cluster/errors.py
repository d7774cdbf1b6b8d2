"""Errors raised by the composition root: the servers, the Ray cluster, the update desk, the CLI.

    ClusterError (PicklableError: every error survives pickle and a Ray call with its fields)
    ├── ServeError              the server cannot start as configured (bad tree dir, TLS files, port in use)
    ├── ClusterConfigError      a cluster.yaml value is missing or wrong; ``file`` and ``field`` say where
    ├── RayStartError           a Ray process did not start (the message carries the end of its log)
    ├── DeployError             a Serve application did not become healthy
    ├── CallError               one call failed for a reason found in cluster/ itself
    │   ├── Unauthenticated     no bearer token, or one the registry does not know
    │   ├── PermissionDenied    a valid token that may not do this
    │   ├── NodeNotVisible      no such node for this caller (unknown, or another tenant's private node)
    │   ├── UnknownVersion      a pinned version (``node@3``) the node never had
    │   ├── VersionNotServed    a pinned version that exists but is not the one served now
    │   ├── BadArgument         a request field is wrong; ``field`` names it
    │   │   └── UnknownParameter  a request field the API does not have (HTTP)
    │   ├── MalformedRequest    an HTTP body that is not UTF-8 JSON (an object)
    │   ├── RequestTooLarge     an HTTP body over the server's size limit
    │   ├── RangeNotSatisfiable an HTTP ``Range`` a variant file cannot satisfy (416)
    │   ├── RateLimited         the caller's tenant spent its tokens per minute (retry after ``retry_after_s``)
    │   ├── ShuttingDown        the server is draining and takes no new work
    │   ├── FineTuningOff       fine-tuning jobs for a tree this server does not run jobs for (501)
    │   └── ReplicaUnavailable  the Ray replica or actor serving the call died or is unreachable (retry it)
    └── CoordinatorError        the update desk's own refusals (the protocol's are hierarchy's UpdateError)
        ├── ApprovalRejected    an approval or rollback signature that may not count
        ├── NotAwaitingApproval approving something that is not a candidate awaiting approval
        ├── PackageError        a package directory or stream that is malformed; ``field`` names the part
        ├── PolicyError         an update policy with a bad field
        ├── JobError            a fine-tuning job that failed (``code``: gate, data, training, interrupted)
        │   └── JobCancelled    the job was cancelled while it ran (its worker stops between steps)
        └── UpdateStateError    the tree and the registry disagree, or the node cannot change now

cluster/service/status.py maps these, and the errors of hierarchy/, nodes/ and registry/, to
gRPC status codes in one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hierarchy.errors import PicklableError

__all__ = [
    "ApprovalRejected",
    "BadArgument",
    "CallError",
    "ClusterConfigError",
    "ClusterError",
    "CoordinatorError",
    "DeployError",
    "FineTuningOff",
    "JobCancelled",
    "JobError",
    "MalformedRequest",
    "NodeNotVisible",
    "NotAwaitingApproval",
    "PackageError",
    "PermissionDenied",
    "PolicyError",
    "RangeNotSatisfiable",
    "RateLimited",
    "RayStartError",
    "ReplicaUnavailable",
    "RequestTooLarge",
    "ServeError",
    "ShuttingDown",
    "Unauthenticated",
    "UnknownParameter",
    "UnknownVersion",
    "UpdateStateError",
    "UploadIdle",
    "UploadRefused",
    "VersionNotServed",
]


class ClusterError(PicklableError):
    """Base of every error raised by :mod:`cluster`."""


class ServeError(ClusterError):
    """The server cannot start as configured."""


class CallError(ClusterError):
    """One RPC failed; the server keeps serving others."""


class Unauthenticated(CallError):
    """The call carries no valid bearer token."""


class PermissionDenied(CallError):
    """The caller's tenant may not do this."""


class NodeNotVisible(CallError):
    """The node does not exist for this caller. Same message whether it is absent or private."""

    def __init__(self, node: str):
        self.node = node
        super().__init__(
            f"unknown node {node!r}: Client.nodes(), GET /v1/models or `treelm registry ls` list the nodes you can use"
        )


class UnknownVersion(CallError):
    """A pinned node version (``demo/en/medical@7``) that the node never had."""

    def __init__(self, node: str, version: int):
        self.node = node
        self.version = version
        super().__init__(f"{node!r} has no version {version}")


class VersionNotServed(CallError):
    """A pinned version that exists but is not the one this server serves now.

    Only the served snapshot's version can answer: the engine serves one chain per node.
    """

    def __init__(self, node: str, version: int, served: int):
        self.node = node
        self.version = version
        self.served = served
        super().__init__(
            f"{node}@{version} is not served here: {node!r} is served at version {served} "
            f"(pin {node}@{served}, or leave the version out)"
        )


class BadArgument(CallError, ValueError):
    """A request field is out of range or malformed; ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownParameter(BadArgument):
    """A request field the API does not have (a typo, or an OpenAI feature TreeLM does not offer)."""


class MalformedRequest(CallError, ValueError):
    """An HTTP request body that is not UTF-8, not JSON, or not a JSON object."""


class RequestTooLarge(CallError):
    """An HTTP request body over the server's limit (``limit`` bytes)."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"the request body is larger than this server's limit of {limit} bytes")


class UploadRefused(CallError):
    """An update upload over the server's concurrency or spool limits (the tenant's uploads in
    progress, the bytes all uploads in progress declare); a retry later may be taken."""


class UploadIdle(CallError):
    """An update upload that sent nothing for ``idle_s`` seconds (aborted, its spool removed)."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        super().__init__(f"the upload sent nothing for {idle_s:g} s; it was aborted (send the package again)")


class RateLimited(CallError):
    """The caller's tenant generated its tokens per minute; more are allowed after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class RangeNotSatisfiable(CallError):
    """An HTTP ``Range`` that a file of ``length`` bytes cannot satisfy: past its end, or not one
    ``bytes=`` range."""

    def __init__(self, header: str, length: int):
        self.header, self.length = header, length
        super().__init__(
            f"Range {header!r} cannot be satisfied by this file of {length} bytes: "
            f"send one range, bytes=START- or bytes=START-END, with START below {length}"
        )


class ShuttingDown(CallError):
    """The server is draining for shutdown."""


class ReplicaUnavailable(CallError):
    """The replica serving a call failed (died, its node left); the call did not complete."""


class ClusterConfigError(ClusterError, ValueError):
    """A cluster.yaml value is missing or wrong; ``field`` names it, ``file`` says where."""

    def __init__(self, file: str, field: str, message: str):
        self.file = file
        self.field = field
        super().__init__(f"{file}: {field}: {message}" if field else f"{file}: {message}")


class RayStartError(ClusterError):
    """A Ray node did not start (the message carries the end of its log)."""


class DeployError(ClusterError):
    """An application did not become healthy (Serve's message says why)."""


# -- the update desk ----------------------------------------------------------------------


class CoordinatorError(ClusterError):
    """Base of the coordinator's own errors."""


class ApprovalRejected(CoordinatorError):
    """A signature that does not verify, or a key whose role or node scope may not approve this."""


class NotAwaitingApproval(CoordinatorError):
    """The update is not a candidate awaiting approvals (already stable, rejected, or a package)."""


class PackageError(CoordinatorError, ValueError):
    """A package that cannot be read: missing envelope, a file outside files/, too large."""

    def __init__(self, message: str, field: str = "package"):
        self.field = field
        super().__init__(message)


class PolicyError(CoordinatorError, ValueError):
    """An update policy (file) with an unknown or out-of-range field; the message names it."""


class UpdateStateError(CoordinatorError):
    """The stored state forbids the operation (e.g. a tree that was never imported, a version not stored)."""


class FineTuningOff(CallError):
    """This server runs no fine-tuning jobs for the tree asked for (no ``customize.key`` in its policy)."""


class JobError(CoordinatorError):
    """A fine-tuning job that failed; ``code`` says where (data, parent, training, gate, worker,
    registration, interrupted); ``figures``: what it measured before it failed (the gate's
    perplexities), kept in the job's result."""

    def __init__(self, code: str, message: str, figures: Mapping[str, Any] | None = None):
        self.code = code
        self.figures = dict(figures or {})
        super().__init__(message)


class JobCancelled(JobError):
    """A running job was cancelled (the training loop checks between steps)."""

    def __init__(self, message: str = "the job was cancelled"):
        super().__init__("cancelled", message)
