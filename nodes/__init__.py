"""The model runtime: bases (:mod:`nodes.base`), built trees on disk (:mod:`nodes.store`),
serving (:mod:`nodes.runtime`) and making models (:mod:`nodes.build`).

The names below are re-exported lazily (PEP 562): ``import nodes.errors`` or the ``treelm``
CLI's help must not load torch and transformers, which most of these modules need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hierarchy.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AdapterBank": "nodes.runtime.bank",
    "AdapterCache": "nodes.runtime.cache",
    "AdapterWeights": "nodes.store.adapters",
    "BuildReport": "nodes.build.builder",
    "BuiltNode": "nodes.store.tree",
    "BuiltTree": "nodes.store.tree",
    "CacheStats": "nodes.runtime.cache",
    "ChainLink": "nodes.store.versions",
    "Engine": "nodes.runtime.engine",
    "EngineConfig": "nodes.runtime.engine",
    "EngineConfigError": "nodes.runtime.engine",
    "EngineStats": "nodes.runtime.engine",
    "Evaluator": "nodes.build.gate",
    "ExportResult": "nodes.build.export",
    "VariantArtifact": "nodes.build.variants",
    "VariantStore": "nodes.build.variants",
    "FineTuneResult": "nodes.build.finetune",
    "GateBounds": "nodes.build.gate",
    "GateReport": "nodes.build.gate",
    "LoadedBase": "nodes.base.model",
    "NodeOutcome": "nodes.build.builder",
    "ResolvedBase": "nodes.base.resolve",
    "ServedNode": "nodes.store.versions",
    "Snapshot": "nodes.store.versions",
    "SnapshotTree": "nodes.store.versions",
    "TinyBaseConfig": "nodes.base.model",
    "VersionStore": "nodes.store.versions",
    "base_digest": "nodes.base.model",
    "build_tree": "nodes.build.builder",
    "export_node": "nodes.build.export",
    "fine_tune": "nodes.build.finetune",
    "flatten_adapters": "nodes.build.compose",
    "increment": "nodes.build.finetune",
    "load_base": "nodes.base.model",
    "make_tiny_base": "nodes.base.model",
    "merge_chain": "nodes.build.compose",
    "open_served_tree": "nodes.store.versions",
    "open_tree": "nodes.store.tree",
    "read_adapter": "nodes.store.adapters",
    "resolve_base": "nodes.base.resolve",
    "verify_node_files": "nodes.store.tree",
    "write_adapter": "nodes.store.adapters",
}

__all__ = [
    "AdapterBank",
    "AdapterCache",
    "AdapterWeights",
    "BuildReport",
    "BuiltNode",
    "BuiltTree",
    "CacheStats",
    "ChainLink",
    "Engine",
    "EngineConfig",
    "EngineConfigError",
    "EngineStats",
    "Evaluator",
    "ExportResult",
    "FineTuneResult",
    "GateBounds",
    "GateReport",
    "LoadedBase",
    "NodeOutcome",
    "ResolvedBase",
    "ServedNode",
    "Snapshot",
    "SnapshotTree",
    "TinyBaseConfig",
    "VariantArtifact",
    "VariantStore",
    "VersionStore",
    "base_digest",
    "build_tree",
    "export_node",
    "fine_tune",
    "flatten_adapters",
    "increment",
    "load_base",
    "make_tiny_base",
    "merge_chain",
    "open_served_tree",
    "open_tree",
    "read_adapter",
    "resolve_base",
    "verify_node_files",
    "write_adapter",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from nodes.base.model import LoadedBase, TinyBaseConfig, base_digest, load_base, make_tiny_base
    from nodes.base.resolve import ResolvedBase, resolve_base
    from nodes.build.builder import BuildReport, NodeOutcome, build_tree
    from nodes.build.compose import flatten_adapters, merge_chain
    from nodes.build.export import ExportResult, export_node
    from nodes.build.finetune import FineTuneResult, fine_tune, increment
    from nodes.build.gate import Evaluator, GateBounds, GateReport
    from nodes.build.variants import VariantArtifact, VariantStore
    from nodes.runtime.bank import AdapterBank
    from nodes.runtime.cache import AdapterCache, CacheStats
    from nodes.runtime.engine import Engine, EngineConfig, EngineConfigError, EngineStats
    from nodes.store.adapters import AdapterWeights, read_adapter, write_adapter
    from nodes.store.tree import BuiltNode, BuiltTree, open_tree, verify_node_files
    from nodes.store.versions import ChainLink, ServedNode, Snapshot, SnapshotTree, VersionStore, open_served_tree
