"""Export one node of a built tree for end devices and other LoRA servers: `treelm export`.

The variant is built (or found) in the tree's variant cache (:mod:`nodes.build.variants`) and
copied into the new directory OUT: its files, a model card (README.md with ``base_model``,
``base_model_relation``, ``language``, ``tags``) and ``manifest.json``, the manifest listing
every other file's sha256 and length. Any stored version can be exported, including versions
made by updates (``version=``; default: the version the tree serves now). Before anything is
written the node's whole chain is verified: each file against its recorded sha256, each built
node against the parent adapter it was trained over, and the base against the tree's recorded
digest. OUT is written as a temp dir next to it and renamed into place, so it is either
complete or absent. Kinds: :mod:`nodes.build.variants.kinds` (``flat``, ``merged``,
``merged-fp16``, ``merged-bf16``, ``merged-int8`` = GGUF Q8_0, ``gguf-f16``, ``gguf-q4_0``,
``gguf-lora``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.base.model import LoadedBase, load_base
from nodes.build.files import share_permissions
from nodes.build.training import ChainPatch
from nodes.build.variants import KINDS, MANIFEST_FILE, VariantArtifact, VariantProgress, VariantStore
from nodes.errors import ExportError
from nodes.store.adapters import read_adapter

__all__ = ["MANIFEST", "VARIANTS", "ExportResult", "export_node", "load_chain_model"]

VARIANTS = tuple(KINDS)
MANIFEST = MANIFEST_FILE


@dataclass(frozen=True)
class ExportResult:
    """One finished export."""

    node_id: str
    variant: str
    version: int
    out: Path
    files: Mapping[str, Mapping[str, Any]] = field(repr=False)  # relative path -> {"sha256", "length"}
    bytes_on_disk: int = 0  # every file of the export, manifest included
    artifact: VariantArtifact | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = {
            "node": self.node_id,
            "version": self.version,
            "variant": self.variant,
            "out": str(self.out),
            "bytes": self.bytes_on_disk,
        }
        need = self.artifact.manifest.requires if self.artifact else None
        if need is not None:  # flat and gguf-lora run over the base: `treelm export DIR <tree> --variant KIND`
            data["requires"] = {"variant": need.kind, "node": need.node}
        return data


def load_chain_model(tree_dir: str | Path, node_id: str, version: int | None = None) -> tuple[LoadedBase, ChainPatch]:
    """The tree's own chain forward for ``node_id``: base + every chain adapter as a frozen low-rank term."""
    source = VariantStore(tree_dir).source(node_id, version=version)
    if source.is_base:
        raise ExportError(f"{node_id!r} is the base itself; name one of its nodes")
    adapters = [read_adapter(n.directory, expected_sha256=n.sha256) for n in source.chain]
    base = load_base(source.tree.base_dir, digest=source.tree.base_digest)
    model: Any = base.model
    return base, ChainPatch(model, adapters)


def export_node(
    tree_dir: str | Path,
    node_id: str,
    variant: str,
    out: str | Path,
    *,
    version: int | None = None,
    progress: VariantProgress | None = None,
) -> ExportResult:
    """Export ``node_id`` (at ``version``) of the tree at ``tree_dir`` as ``variant`` into the new directory ``out``."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: choose a new --out or remove it")
    store = VariantStore(tree_dir)
    artifact = store.build(node_id, variant, version=version, progress=progress)
    artifact.verify()  # the copy must be of intact files, whoever built them
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write to {out.parent}: {exc}") from exc
    try:
        for entry in artifact.manifest.files:
            (tmp / entry.name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact.directory / entry.name, tmp / entry.name)
        (tmp / MANIFEST).write_bytes(artifact.manifest_bytes)
        share_permissions(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write the export to {out}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = artifact.manifest
    files = {f.name: {"sha256": f.sha256, "length": f.length} for f in m.files}
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportResult(str(m.node), m.kind, m.version, out, files, total, artifact)
