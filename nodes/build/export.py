"""Export one node of a built tree for end devices and other LoRA servers.

    flat         ONE PEFT adapter of rank sum(r_i) over the base (the chain flattened exactly):
                 stock ``PeftModel.from_pretrained(base, OUT)`` loads it
    merged       a standalone Hugging Face model dir (W0 + sum s_i B_i A_i folded in):
                 stock ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it
    merged-int8  the merged model with int8 linear weights (per output channel); load it
                 with :func:`nodes.build.quantize.load_int8`: weight-only int8 by default, or
                 torch's dynamic quantization (int8 activations too) on request

Every export carries a model card (README.md with ``base_model``,
``base_model_relation``, ``language``, ``tags``) and ``manifest.json`` listing
the sha256 and length of every other file and the total size on disk. Before
anything is written the node's whole chain is verified: each file against its
recorded sha256, each node against the parent adapter it was trained over, and
the base against the tree's recorded digest. The export is written to a temp
dir next to OUT and renamed into place, so OUT is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hierarchy.ids import NodeId, NodePath
from nodes.base.model import LoadedBase, load_base
from nodes.build.compose import flatten_adapters, merge_chain
from nodes.build.files import share_permissions
from nodes.build.quantize import load_int8, save_int8
from nodes.build.training import ChainPatch
from nodes.errors import ExportError, IntegrityError
from nodes.store.adapters import AdapterWeights, read_adapter, write_adapter
from nodes.store.digest import file_digests
from nodes.store.tree import BuiltNode, BuiltTree, open_tree, verify_node_files

__all__ = [
    "MANIFEST",
    "VARIANTS",
    "ExportResult",
    "export_node",
    "load_chain_model",
    "load_int8",
    "resolve_node",
    "verified_chain",
]

VARIANTS = ("flat", "merged", "merged-int8")
MANIFEST = "manifest.json"
_RELATION = {"flat": "adapter", "merged": "finetune", "merged-int8": "finetune"}
_LIBRARY = {"flat": "peft", "merged": "transformers", "merged-int8": "transformers"}


@dataclass(frozen=True)
class ExportResult:
    """One finished export."""

    node_id: str
    variant: str
    out: Path
    files: Mapping[str, Mapping[str, Any]] = field(repr=False)  # relative path -> {"sha256", "length"}
    bytes_on_disk: int = 0  # every file of the export, manifest included

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node_id, "variant": self.variant, "out": str(self.out), "bytes": self.bytes_on_disk}


def resolve_node(tree: BuiltTree, node_id: str) -> NodeId:
    """Accept ``<tree>/<path>`` or a bare path; ExportError listing the tree's nodes otherwise."""
    text = str(node_id).strip().strip("/")
    candidates = []
    try:
        candidates.append(NodeId.parse(text))
    except ValueError:
        pass
    try:
        candidates.append(NodeId(tree.name, NodePath(text)))
    except ValueError:
        pass
    for key in candidates:
        if key.tree == tree.name and not key.is_base and any(n.node_id == key for n in tree.nodes):
            return key
    known = ", ".join(str(n.node_id) for n in tree.nodes) or "(none built)"
    if any(key.tree == tree.name and key.is_base for key in candidates):
        raise ExportError(f"{node_id!r} is the base itself; export one of its nodes: {known}")
    raise ExportError(f"unknown node {node_id!r} in tree {tree.name!r} at {tree.root}; built nodes: {known}")


def verified_chain(tree: BuiltTree, key: NodeId) -> tuple[BuiltNode, ...]:
    """The node's chain, each file re-hashed and each link checked against its parent's adapter."""
    chain = tree.chain(key)
    parent_digest = None
    for node in chain:
        verify_node_files(node)
        if node.parent_adapter_digest != parent_digest:
            raise IntegrityError(
                f"node {node.node_id} was trained over a different version of {node.parent_id} "
                f"(recorded {str(node.parent_adapter_digest)[:12]}..., found {str(parent_digest)[:12]}...): "
                "rebuild the tree with `treelm tree build SPEC --out DIR`"
            )
        if node.base_digest and node.base_digest != tree.base_digest:
            raise IntegrityError(
                f"node {node.node_id} was trained over base {node.base_digest[:12]}..., "
                f"the tree's base is {tree.base_digest[:12]}..."
            )
        parent_digest = node.adapter_digest
    return chain


def _adapters(chain: tuple[BuiltNode, ...]) -> list[AdapterWeights]:
    return [read_adapter(n.directory, expected_sha256=n.sha256) for n in chain]


def load_chain_model(tree_dir: str | Path, node_id: str) -> tuple[LoadedBase, ChainPatch]:
    """The tree's own chain forward for ``node_id``: base + every chain adapter as a frozen low-rank term."""
    tree = open_tree(tree_dir)
    key = resolve_node(tree, node_id)
    adapters = _adapters(verified_chain(tree, key))
    base = load_base(tree.base_dir, digest=tree.base_digest)
    return base, ChainPatch(base.model, adapters)


def _card(tree: BuiltTree, node: BuiltNode, variant: str, chain: tuple[BuiltNode, ...]) -> str:
    hub_id = tree.raw.get("base", {}).get("hub_id") or str(tree.base_dir)
    tags = ["treelm", f"treelm-{node.level.value}", "lora" if variant == "flat" else "merged-lora"]
    tags += [t for t in (node.domain, node.subdomain) if t] + list(node.tags)
    if variant == "merged-int8":
        tags += ["int8", "dynamic-quantization"]
    front = {
        "base_model": hub_id,
        "base_model_relation": _RELATION[variant],
        "language": [node.language] if node.language else [],
        "library_name": _LIBRARY[variant],
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(tags)),
    }
    lines = ["---"]
    for k, v in front.items():
        if isinstance(v, list):
            lines.append(f"{k}:" + ("" if v else " []"))
            lines += [f"- {json.dumps(item)}" for item in v]
        else:
            lines.append(f"{k}: {json.dumps(v)}")
    lines += ["---", "", f"# {node.node_id} ({variant})", ""]
    description = node.raw.get("description") or ""
    if description:
        lines += [description, ""]
    lines += [
        f"A TreeLM node: level `{node.level.value}` of tree `{tree.name}`, exported as `{variant}`.",
        "",
        "| chain | level | rank | alpha | adapter sha256 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n.node_id} | {n.level.value} | {n.lora.get('r')} | {n.lora.get('alpha')} | {n.adapter_digest[:16]} |"
        for n in chain
    ]
    m = node.metrics
    if m.get("eval_ppl") is not None:
        lines += ["", "| metric | value |", "|---|---|"]
        lines.append(
            f"| perplexity on own eval text (node / parent) | {m['eval_ppl']:.3f} / {m['parent_eval_ppl']:.3f} |"
        )
        if m.get("forgetting") is not None:
            lines.append(
                f"| perplexity on {m.get('forgetting_reference')} eval text (node / parent) | "
                f"{m['parent_text_ppl']:.3f} / {m['parent_text_parent_ppl']:.3f} |"
            )
    if node.visibility == "private":
        lines += ["", f"**Private node** owned by tenant `{node.owner}`: do not redistribute."]
    usage = {
        "flat": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)",
        "merged": "AutoModelForCausalLM.from_pretrained(OUT)",
        "merged-int8": "nodes.build.quantize.load_int8(OUT)  # -> (model, tokenizer); activations='int8' for torch dynamic quantization",
    }[variant]
    lines += ["", "## Load", "", "```python", usage, "```", ""]
    return "\n".join(lines)


def _write_variant(variant: str, tree: BuiltTree, chain: tuple[BuiltNode, ...], tmp: Path) -> None:
    adapters = _adapters(chain)
    base_ref = tree.raw.get("base", {}).get("hub_id") or str(tree.base_dir)
    if variant == "flat":
        write_adapter(flatten_adapters(adapters), tmp, base_model_name_or_path=base_ref)
        return
    base = load_base(tree.base_dir, digest=tree.base_digest)
    with torch.no_grad():
        model = merge_chain(base.model, adapters)
    if variant == "merged":
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        save_int8(model, tmp)
        model.generation_config.save_pretrained(tmp)
    base.tokenizer.save_pretrained(tmp)


def export_node(tree_dir: str | Path, node_id: str, variant: str, out: str | Path) -> ExportResult:
    """Export ``node_id`` of the tree at ``tree_dir`` as ``variant`` into the new directory ``out``."""
    if variant not in VARIANTS:
        raise ExportError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: choose a new --out or remove it")
    tree = open_tree(tree_dir)
    key = resolve_node(tree, node_id)
    chain = verified_chain(tree, key)
    node = chain[-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_variant(variant, tree, chain, tmp)
        (tmp / "README.md").write_text(_card(tree, node, variant, chain))
        files = file_digests(tmp)
        manifest = {
            "format": "treelm-export/1",
            "tree": tree.name,
            "node": str(node.node_id),
            "variant": variant,
            "base": {
                "model": tree.base_model,
                "digest": tree.base_digest,
                "hub_id": tree.raw.get("base", {}).get("hub_id"),
            },
            "chain": [
                {"id": str(n.node_id), "version": n.version, "adapter_sha256": n.adapter_digest, "lora": dict(n.lora)}
                for n in chain
            ],
            "metrics": dict(node.metrics),
            "files": files,
            "bytes": sum(int(f["length"]) for f in files.values()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        share_permissions(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportResult(node_id=str(node.node_id), variant=variant, out=out, files=files, bytes_on_disk=total)
