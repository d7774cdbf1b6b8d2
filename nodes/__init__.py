"""The model runtime: bases, adapters in PEFT format, chain composition, built trees."""

from nodes.adapters import AdapterWeights, read_adapter, write_adapter
from nodes.base import LoadedBase, TinyBaseConfig, base_digest, load_base, make_tiny_base
from nodes.compose import flatten_adapters, merge_chain
from nodes.errors import (
    AdapterError,
    BaseModelError,
    BuildError,
    EngineError,
    ExportError,
    IntegrityError,
    NodesError,
)
from nodes.tree_store import BuiltNode, BuiltTree, open_tree, verify_node_files

__all__ = [
    "AdapterError",
    "AdapterWeights",
    "BaseModelError",
    "BuildError",
    "BuiltNode",
    "BuiltTree",
    "EngineError",
    "ExportError",
    "IntegrityError",
    "LoadedBase",
    "NodesError",
    "TinyBaseConfig",
    "base_digest",
    "flatten_adapters",
    "load_base",
    "make_tiny_base",
    "merge_chain",
    "open_tree",
    "read_adapter",
    "verify_node_files",
    "write_adapter",
]
