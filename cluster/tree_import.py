"""Turn a built tree directory into the registry's :class:`registry.TreeImport`, and import it.

This lives in the composition root because it reads :mod:`nodes`' on-disk
layout (tree.json, node.json, PEFT adapters) while :mod:`registry` must not
import :mod:`nodes`. Nothing here loads weights: parameter counts come from the
safetensors headers (8-byte length + JSON), architecture facts from the base's
config.json.

Variants registered per node: ``chain`` (measured: the base's weight files plus
the chain's adapter files), and ``flat``, ``merged``, ``merged-int8`` — measured
from ``TREE_DIR/exports/<node path>/<variant>/manifest.json`` when such an
export exists there, else estimated from the architecture (and marked so).
The base itself gets ``chain`` (the base as is) and ``merged-int8``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodes.errors import NodesError
from nodes.store.tree import BuiltNode, BuiltTree, open_tree
from registry import BaseFacts, ImportNode, ImportResult, Registry, TreeImport, VariantFacts, register_tree
from registry.errors import ImportConflict, InvalidInput

__all__ = [
    "base_facts_from_dir",
    "import_tree",
    "manifest_digest",
    "safetensors_summary",
    "tree_import",
]

_DTYPES = {
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F64": ("float64", 8),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
}
ADAPTER_FILE = "adapter_model.safetensors"


def safetensors_summary(files: list[Path]) -> dict[str, Any]:
    """Parameter counts from safetensors headers: total, quantizable (linear weights), dominant dtype, bytes."""
    total = quantizable = size = 0
    by_dtype: dict[str, int] = {}
    for file in files:
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NodesError(f"{file} is not a readable safetensors file: {exc}") from None
        size += file.stat().st_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(info["shape"])
            total += count
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + count
            # Int8 export quantizes every linear layer but the output head; embeddings stay float.
            if len(info["shape"]) == 2 and "embed" not in name and "lm_head" not in name:
                quantizable += count
    dominant = max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "F32"
    return {
        "parameters": total,
        "quantizable": quantizable,
        "bytes": size,
        "dtype": _DTYPES.get(dominant, ("float32", 4))[0],
    }


def base_facts_from_dir(base_dir: Path, digest: str, model: str) -> BaseFacts:
    """Architecture facts of a Hugging Face causal LM directory (config.json + safetensors headers)."""
    config_file = base_dir / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NodesError(f"cannot read the base's {config_file}: {exc}") from None
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    weights = sorted(base_dir.glob("*.safetensors"))
    if not weights:
        raise NodesError(f"base dir {base_dir} has no *.safetensors weights")
    summary = safetensors_summary(weights)
    try:
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return BaseFacts(
            digest=digest,
            model=model or base_dir.name,
            architecture=(config.get("architectures") or [config.get("model_type", "unknown")])[0],
            weight_dtype=str(config.get("dtype") or config.get("torch_dtype") or summary["dtype"]),
            parameter_count=summary["parameters"],
            quantizable_parameter_count=summary["quantizable"],
            weights_bytes=summary["bytes"],
            layers=int(text["num_hidden_layers"]),
            hidden_size=hidden,
            attention_heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            vocab_size=int(text["vocab_size"]),
            max_context=int(text.get("max_position_embeddings") or text.get("max_sequence_length") or 2048),
            intermediate_size=int(text["intermediate_size"]) if text.get("intermediate_size") else None,
        )
    except KeyError as exc:
        raise NodesError(f"{config_file} lacks {exc.args[0]!r}, needed for memory estimates") from None


def manifest_digest(tree: BuiltTree, node: BuiltNode) -> str:
    """sha256 over the canonical JSON of what pins a node version: id, versions, base and files."""
    payload = {
        "node": str(node.node_id),
        "version": node.version,
        "parent_version": node.parent_version,
        "parent_adapter_digest": node.parent_adapter_digest,
        "base_digest": node.base_digest or tree.base_digest,
        "files": {
            name: {"sha256": str(i["sha256"]), "length": int(i["length"])} for name, i in sorted(node.files.items())
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _exported(tree: BuiltTree, path: str, kind: str) -> Mapping[str, Any] | None:
    manifest = tree.root / "exports" / path / kind / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise NodesError(f"{manifest} is corrupt: {exc}") from None


def _variants(tree: BuiltTree, base: BaseFacts, path: str, chain_files: int, adapter_params: int) -> tuple:
    stored = {"float32": 4, "float16": 2, "bfloat16": 2}.get(base.weight_dtype, 4)
    # Sizes on disk when nothing was exported: weights in the base's stored dtype, adapters in float32,
    # int8 linear weights + float32 everything else.
    estimates = {
        "flat": base.weights_bytes + adapter_params * 4,
        "merged": base.parameter_count * stored,
        "merged-int8": base.quantizable_parameter_count + (base.parameter_count - base.quantizable_parameter_count) * 4,
    }
    out = [VariantFacts("chain", base.weights_bytes + chain_files, False, adapter_params)]
    kinds = ("merged-int8",) if not path else ("flat", "merged", "merged-int8")
    for kind in kinds:
        exported = _exported(tree, path, kind) if path else None
        adapters = adapter_params if kind == "flat" else 0
        if exported is not None and isinstance(exported.get("bytes"), int):
            uri = str(tree.root / "exports" / path / kind)
            out.append(VariantFacts(kind, int(exported["bytes"]), False, adapters, uri=uri))
        else:
            out.append(VariantFacts(kind, estimates[kind], True, adapters))
    return tuple(out)


def tree_import(tree_dir: str | Path) -> TreeImport:
    """Read a built tree directory (nothing is loaded into memory but headers and JSON)."""
    tree = open_tree(tree_dir)
    if not (tree.base_dir / "config.json").is_file():
        raise NodesError(f"the base of tree {tree.name!r} is missing: {tree.base_dir} has no config.json")
    base = base_facts_from_dir(tree.base_dir, tree.base_digest, tree.base_model)
    own_params: dict[str, int] = {}
    own_bytes: dict[str, int] = {}
    nodes = [
        ImportNode(
            path="",
            level="base",
            manifest_digest=tree.base_digest,
            version=1,
            description=str(tree.raw.get("description") or "") or None,
            variants=_variants(tree, base, "", 0, 0),
        )
    ]
    for node in tree.nodes:
        path = str(node.path)
        if node.base_digest and node.base_digest != tree.base_digest:
            raise ImportConflict(
                f"node {node.node_id} was built over base {node.base_digest[:12]}..., "
                f"the tree's base is {tree.base_digest[:12]}..."
            )
        adapter = node.directory / ADAPTER_FILE
        own_params[path] = safetensors_summary([adapter])["parameters"] if adapter.is_file() else 0
        own_bytes[path] = sum(int(info["length"]) for info in node.files.values())
        lineage = [str(p) for p in node.path.lineage()]
        chain_params = sum(own_params.get(p, 0) for p in lineage)
        chain_bytes = sum(own_bytes.get(p, 0) for p in lineage)
        try:
            nodes.append(
                ImportNode(
                    path=path,
                    level=node.level.value,
                    manifest_digest=manifest_digest(tree, node),
                    version=node.version,
                    parent_version=node.parent_version,
                    language=node.language,
                    domain=node.domain,
                    subdomain=node.subdomain,
                    tags=node.tags,
                    visibility=node.visibility,
                    owner=node.owner,
                    description=str(node.raw.get("description") or "") or None,
                    metrics=dict(node.metrics),
                    variants=_variants(tree, base, path, chain_bytes, chain_params),
                )
            )
        except InvalidInput as exc:
            raise InvalidInput(f"node {node.node_id}: {exc}", field=exc.field) from None
    return TreeImport(name=tree.name, base=base, nodes=tuple(nodes))


def import_tree(reg: Registry, tree_dir: str | Path) -> ImportResult:
    """Register the built tree at ``tree_dir`` (idempotent; all or nothing)."""
    return register_tree(reg, tree_import(tree_dir))
