"""Write one variant's files into a directory: the weights part of every kind.

Each writer returns the manifest's ``load`` roles (which files a loader opens, in order).
The merged model is the base with the chain folded in (:func:`nodes.build.compose.merge_chain`,
float32); the flat adapter is the chain flattened exactly (:func:`nodes.build.compose.flatten_adapters`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodes.build.compose import flatten_adapters, merge_chain
from nodes.build.variants.gguf_lora import write_gguf_lora
from nodes.build.variants.gguf_model import write_gguf_model
from nodes.build.variants.kinds import VariantKind
from nodes.build.variants.source import VariantSource
from nodes.errors import ExportError
from nodes.store.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterWeights, read_adapter, write_adapter

__all__ = ["Progress", "gguf_name", "merged_model", "write_variant_files"]

Progress = Callable[[str, int, int], None]  # (what, done, total)
Roles = dict[str, tuple[str, ...]]


def _adapters(source: VariantSource) -> list[AdapterWeights]:
    return [read_adapter(n.directory, expected_sha256=n.sha256) for n in source.chain]


def merged_model(source: VariantSource) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the base (digest checked) with the chain folded in, float32, eval mode."""
    import torch

    from nodes.base.model import load_base

    base = load_base(source.tree.base_dir, digest=source.tree.base_digest)
    model: Any = base.model
    with torch.no_grad():
        if source.chain:
            merge_chain(model, _adapters(source))
    return model.eval(), base.tokenizer


def gguf_name(source: VariantSource, suffix: str) -> str:
    """llama.cpp-style file names: ``<tree>-<path>-v<N>-<TYPE>.gguf`` (``<tree>-base-<TYPE>.gguf``)."""
    parts = [source.tree.name, *(str(source.node_id.path).split("/") if source.chain else ["base"])]
    version = [f"v{source.version}"] if source.chain else []
    return "-".join([*parts, *version, suffix]) + ".gguf"


def _hf(kind: VariantKind, source: VariantSource, out: Path, progress: Progress) -> Roles:
    import torch

    progress("merge", 0, 1)
    model, tokenizer = merged_model(source)
    progress("merge", 1, 1)
    model = model.to(getattr(torch, kind.dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    weights = tuple(sorted(p.name for p in out.glob("*.safetensors")))
    return {"weights": weights, "config": ("config.json",), "tokenizer": ("tokenizer.json", "tokenizer_config.json")}


def _flat(source: VariantSource, out: Path, progress: Progress) -> Roles:
    progress("flatten", 0, 1)
    ref = source.tree.raw.get("base", {}).get("hub_id") or source.tree.base_model or str(source.tree.base_dir)
    write_adapter(flatten_adapters(_adapters(source)), out, base_model_name_or_path=ref)
    progress("flatten", 1, 1)
    return {"adapter": (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}


def _gguf(kind: VariantKind, source: VariantSource, out: Path, progress: Progress) -> Roles:
    progress("merge", 0, 1)
    model, _ = merged_model(source)
    progress("merge", 1, 1)
    name = gguf_name(source, kind.dtype)
    write_gguf_model(
        model,
        source.tree.base_dir,
        out / name,
        kind.dtype,
        name=str(source.node_id),
        progress=lambda done, total: progress("tensors", done, total),
    )
    return {"gguf": (name,)}


def _gguf_lora(source: VariantSource, out: Path, progress: Progress) -> Roles:
    files = []
    for i, (node, adapter) in enumerate(zip(source.chain, _adapters(source), strict=True), 1):
        name = f"{i:02d}-" + gguf_name(VariantSource(source.tree, node.node_id, source.chain[:i]), "LoRA-F32")
        write_gguf_lora(
            adapter,
            source.tree.base_dir,
            out / name,
            name=f"{node.node_id} v{node.version}",
            progress=_tell(progress, f"lora {node.path}"),
        )
        files.append(name)
    return {"lora": tuple(files)}


def _tell(progress: Progress, what: str) -> Callable[[int, int], None]:
    return lambda done, total: progress(what, done, total)


def write_variant_files(kind: VariantKind, source: VariantSource, out: Path, progress: Progress) -> Roles:
    """Write the files of ``kind`` for ``source`` into the (empty) directory ``out``."""
    if kind.needs_adapters and source.is_base:
        raise ExportError(f"{source.node_id} is the base itself: {kind.name} needs a node with adapters")
    if kind.family == "hf":
        return _hf(kind, source, out, progress)
    if kind.family == "peft":
        return _flat(source, out, progress)
    if kind.family == "gguf":
        return _gguf(kind, source, out, progress)
    return _gguf_lora(source, out, progress)
