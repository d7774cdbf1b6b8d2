"""The signed update protocol's composition: the update desk (coordinator), key management, packages.

The pure rules live in ``hierarchy.updates`` (verification, trust, screening, aggregation);
the versioned store, fine-tuning and the gate in ``nodes``; records in ``registry.updates``.
This package wires them: ``Coordinator`` (submit -> verify -> screen -> gate -> store ->
aggregate -> approve -> propagate), key management and packages. The Updates gRPC service is
cluster/service/update_servicer.py; the ``treelm keys`` / ``treelm update`` groups are cluster/cli/updates.py.

Nothing is re-exported here: the coordinator imports torch, and the CLI's help must not. Import
from the modules (``cluster.updates.coordinator.Coordinator``, ``cluster.updates.keys``, ...).
"""

__all__: list[str] = []
