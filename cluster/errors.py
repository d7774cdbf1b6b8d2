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
    │   ├── BadArgument         a request field is wrong; ``field`` names it
    │   ├── ShuttingDown        the server is draining and takes no new work
    │   └── ReplicaUnavailable  the Ray replica or actor serving the call died or is unreachable (retry it)
    └── CoordinatorError        the update desk's own refusals (the protocol's are hierarchy's UpdateError)
        ├── ApprovalRejected    an approval or rollback signature that may not count
        ├── NotAwaitingApproval approving something that is not a candidate awaiting approval
        ├── PackageError        a package directory or stream that is malformed; ``field`` names the part
        ├── PolicyError         an update policy with a bad field
        └── UpdateStateError    the tree and the registry disagree, or the node cannot change now

cluster/service/status.py maps these, and the errors of hierarchy/, nodes/ and registry/, to
gRPC status codes in one table.
"""

from __future__ import annotations

from hierarchy.errors import PicklableError

__all__ = [
    "ApprovalRejected",
    "BadArgument",
    "CallError",
    "ClusterConfigError",
    "ClusterError",
    "CoordinatorError",
    "DeployError",
    "NodeNotVisible",
    "NotAwaitingApproval",
    "PackageError",
    "PermissionDenied",
    "PolicyError",
    "RayStartError",
    "ReplicaUnavailable",
    "ServeError",
    "ShuttingDown",
    "Unauthenticated",
    "UpdateStateError",
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
        super().__init__(f"unknown node {node!r}: Client.nodes() or `treelm registry ls` lists the nodes you can use")


class BadArgument(CallError, ValueError):
    """A request field is out of range or malformed; ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


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
