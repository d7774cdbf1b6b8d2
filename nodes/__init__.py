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
from nodes.quantize import load_int8
from nodes.tree_store import BuiltNode, BuiltTree, open_tree, verify_node_files

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
    "Engine",
    "EngineConfig",
    "EngineConfigError",
    "EngineError",
    "EngineStats",
    "ExportError",
    "ExportResult",
    "IntegrityError",
    "LoadedBase",
    "NodeOutcome",
    "NodesError",
    "ResolvedBase",
    "TinyBaseConfig",
    "base_digest",
    "build_tree",
    "export_node",
    "flatten_adapters",
    "load_base",
    "load_int8",
    "make_tiny_base",
    "merge_chain",
    "open_tree",
    "read_adapter",
    "resolve_base",
    "verify_node_files",
    "write_adapter",
]
