"""Turn a built tree directory into the registry's :class:`registry.TreeImport`, and import it.

This lives in the composition root because it reads :mod:`nodes`' on-disk
layout (tree.json, node.json, PEFT adapters) while :mod:`registry` must not
import :mod:`nodes`. Nothing here loads weights: parameter counts come from the
safetensors headers (8-byte length + JSON), architecture facts from the base's
config.json.

Variants registered per node: ``chain`` (measured: the base's weight files plus
the chain's adapter files), and every kind of ``nodes.build.variants`` (``flat``,
``merged`` in 32 and 16 bits, ``merged-int8`` = GGUF Q8_0, ``gguf-f16``, ``gguf-q4_0``,
``gguf-lora``) — measured from ``TREE_DIR/exports/<node path>/<variant>/manifest.json``
or from the variant cache ``TREE_DIR/variants`` (a variant built for the node's current
chain), else estimated from the architecture (and marked so). A variant's bytes are what
a device downloads: its own files plus the base a flat adapter or LoRA GGUF files run over.
The base itself gets ``chain`` (the base as is) and the merged kinds.
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


def _q_blocks(count: int, block_bytes: int) -> int:
    return -(-count * block_bytes // 32)  # GGML blocks of 32 weights: Q8_0 34 bytes, Q4_0 18 bytes


def _estimates(base: BaseFacts, adapter_params: int) -> dict[str, int]:
    """Download sizes from the architecture: a variant's own files plus the base it runs over."""
    stored = {"float32": 4, "float16": 2, "bfloat16": 2}.get(base.weight_dtype, 4)
    n, q = base.parameter_count, base.quantizable_parameter_count
    return {
        "flat": base.weights_bytes + adapter_params * 4,
        "merged": n * stored,
        "merged-fp16": n * 2,
        "merged-bf16": n * 2,
        "merged-int8": _q_blocks(n, 34),  # GGUF Q8_0: every 2-D tensor, embeddings too
        "gguf-f16": n * 2,
        "gguf-q4_0": _q_blocks(q, 18) + _q_blocks(n - q, 34),
        "gguf-lora": n * 2 + adapter_params * 4,  # the LoRA files (float32) over the base in F16
    }


def _requirement(kind: str, estimates: Mapping[str, int], base: BaseFacts) -> int:
    """What a device downloads beside a variant's own files: the base of flat and gguf-lora."""
    return {"flat": base.weights_bytes, "gguf-lora": estimates["gguf-f16"]}.get(kind, 0)


def cached_variants(tree: BuiltTree) -> dict[tuple[str, str, tuple[tuple[str, int, str], ...]], tuple[int, str]]:
    """Variants built in the tree's cache (TREE_DIR/variants): (node, kind, chain) -> (bytes, dir)."""
    out = {}
    for file in sorted((tree.root / "variants").glob("*/*/manifest.json")):
        try:
            m = json.loads(file.read_text())
            chain = tuple((str(x["path"]), int(x["version"]), str(x["adapter"])) for x in m["chain"])
            out[(str(m["node"]), str(m["kind"]), chain)] = (int(m["bytes"]), str(file.parent))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged cache entry is rebuilt on request; the estimate stands in meanwhile
    return out


_BASE_KINDS = ("merged", "merged-fp16", "merged-bf16", "merged-int8", "gguf-f16", "gguf-q4_0")
_NODE_KINDS = ("flat", *_BASE_KINDS, "gguf-lora")


def _variants(
    tree: BuiltTree,
    base: BaseFacts,
    path: str,
    chain_files: int,
    adapter_params: int,
    chain: tuple[tuple[str, int, str], ...] = (),
    cache: Mapping[tuple[str, str, tuple[tuple[str, int, str], ...]], tuple[int, str]] | None = None,
) -> tuple:
    """Every kind a node (``path``; "" for the base) ships as: measured when exported or cached, else estimated."""
    estimates = _estimates(base, adapter_params)
    node_id = f"{tree.name}/{path}" if path else tree.name
    out = [VariantFacts("chain", base.weights_bytes + chain_files, False, adapter_params)]
    for kind in _NODE_KINDS if path else _BASE_KINDS:
        adapters = adapter_params if kind in ("flat", "gguf-lora") else 0
        exported = _exported(tree, path, kind) if path else None
        built = (cache or {}).get((node_id, kind, chain))
        if exported is not None and isinstance(exported.get("bytes"), int):
            uri = str(tree.root / "exports" / path / kind)
            out.append(
                VariantFacts(
                    kind, int(exported["bytes"]) + _requirement(kind, estimates, base), False, adapters, uri=uri
                )
            )
        elif built is not None:
            out.append(
                VariantFacts(kind, built[0] + _requirement(kind, estimates, base), False, adapters, uri=built[1])
            )
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
    cache = cached_variants(tree)
    nodes = [
        ImportNode(
            path="",
            level="base",
            manifest_digest=tree.base_digest,
            version=1,
            description=str(tree.raw.get("description") or "") or None,
            variants=_variants(tree, base, "", 0, 0, (), cache),
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
                    variants=_variants(
                        tree,
                        base,
                        path,
                        chain_bytes,
                        chain_params,
                        tuple((str(n.path), n.version, n.adapter_digest) for n in tree.chain(node.node_id)),
                        cache,
                    ),
                )
            )
        except InvalidInput as exc:
            raise InvalidInput(f"node {node.node_id}: {exc}", field=exc.field) from None
    return TreeImport(name=tree.name, base=base, nodes=tuple(nodes))


def import_tree(reg: Registry, tree_dir: str | Path) -> ImportResult:
    """Register the built tree at ``tree_dir`` (idempotent; all or nothing)."""
    return register_tree(reg, tree_import(tree_dir))
