"""The model runtime: bases, adapters in PEFT format, chain composition, built trees."""

from nodes.adapters import AdapterWeights, read_adapter, write_adapter
from nodes.base import LoadedBase, TinyBaseConfig, base_digest, load_base, make_tiny_base
from nodes.bank import AdapterBank
from nodes.bases import ResolvedBase, resolve_base
from nodes.build import BuildReport, NodeOutcome, build_tree
from nodes.cache import AdapterCache, CacheStats
from nodes.compose import flatten_adapters, merge_chain
from nodes.engine import Engine, EngineConfig, EngineConfigError, EngineStats
from nodes.errors import (
    AdapterError,
    BaseModelError,
    BuildError,
    EngineError,
    ExportError,
    IntegrityError,
    NodesError,
)
from nodes.export import ExportResult, export_node
from nodes.finetune import FineTuneResult, fine_tune, increment
from nodes.gate import Evaluator, GateBounds, GateReport
from nodes.quantize import load_int8
from nodes.tree_store import BuiltNode, BuiltTree, open_tree, verify_node_files
from nodes.versions import ChainLink, ServedNode, Snapshot, SnapshotTree, VersionStore, open_served_tree

__all__ = [
    "AdapterBank",
    "AdapterCache",
    "AdapterError",
    "AdapterWeights",
    "BaseModelError",
    "BuildError",
    "BuildReport",
    "BuiltNode",
    "BuiltTree",
    "CacheStats",
    "ChainLink",
    "Engine",
    "EngineConfig",
    "EngineConfigError",
    "EngineError",
    "EngineStats",
    "Evaluator",
    "ExportError",
    "ExportResult",
    "FineTuneResult",
    "GateBounds",
    "GateReport",
    "IntegrityError",
    "LoadedBase",
    "NodeOutcome",
    "NodesError",
    "ResolvedBase",
    "ServedNode",
    "Snapshot",
    "SnapshotTree",
    "TinyBaseConfig",
    "VersionStore",
    "base_digest",
    "build_tree",
    "export_node",
    "fine_tune",
    "flatten_adapters",
    "increment",
    "load_base",
    "load_int8",
    "make_tiny_base",
    "merge_chain",
    "open_served_tree",
    "open_tree",
    "read_adapter",
    "resolve_base",
    "verify_node_files",
    "write_adapter",
]
