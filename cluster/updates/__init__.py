"""The signed update protocol's composition: coordinator, key management, packages, gRPC, CLI.

The pure rules live in ``hierarchy.updates`` (verification, trust, screening, aggregation);
the versioned store, fine-tuning and the gate in ``nodes``; records in ``registry.updates``.
This package wires them: ``Coordinator`` (submit -> verify -> screen -> gate -> store ->
aggregate -> approve -> propagate), ``UpdateServicer`` (the Updates gRPC service) and the
``treelm keys`` / ``treelm update`` command groups.
"""

from cluster.service.update_servicer import UpdateServicer
from cluster.updates.coordinator import Coordinator
from cluster.updates.errors import (
    ApprovalRejected,
    CoordinatorError,
    NotAwaitingApproval,
    PackageError,
    PolicyError,
    UpdateStateError,
)
from cluster.updates.keys import load_signing_key, load_trust, register_key, revoke, rotate, write_key_files
from cluster.updates.make import make_package
from cluster.updates.package import Package, read_package, write_package
from cluster.updates.policy import UpdatePolicy
from cluster.updates.status import RollbackResult, UpdateStatus

__all__ = [
    "ApprovalRejected",
    "Coordinator",
    "CoordinatorError",
    "NotAwaitingApproval",
    "Package",
    "PackageError",
    "PolicyError",
    "RollbackResult",
    "UpdatePolicy",
    "UpdateServicer",
    "UpdateStateError",
    "UpdateStatus",
    "load_signing_key",
    "load_trust",
    "make_package",
    "read_package",
    "register_key",
    "revoke",
    "rotate",
    "write_key_files",
    "write_package",
]
