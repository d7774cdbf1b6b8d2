"""Errors of the update coordinator (the protocol's own refusals are hierarchy.updates errors).

    ClusterError
    └── CoordinatorError
        ├── ApprovalRejected      an approval or rollback signature that may not count (PERMISSION_DENIED)
        ├── NotAwaitingApproval   approving something that is not a candidate awaiting approval
        ├── PackageError          a package directory or stream that is malformed (INVALID_ARGUMENT)
        ├── PolicyError           an update policy with a bad field
        └── UpdateStateError      the tree and the registry disagree, or the node cannot change now

An unknown update id is registry.updates.UpdateNotFound (NOT_FOUND).
"""

from __future__ import annotations

from cluster.errors import ClusterError

__all__ = [
    "ApprovalRejected",
    "CoordinatorError",
    "NotAwaitingApproval",
    "PackageError",
    "PolicyError",
    "UpdateStateError",
]


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
