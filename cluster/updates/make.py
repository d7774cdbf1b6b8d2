"""`treelm update make`: fine-tune one node on local data and write a signed update package.

Runs where the data is (a hospital, an end device) on a copy of the tree directory: the node
is trained over exactly the chain that copy serves (its snapshot), continuing from its current
adapter, and the manifest pins that parent version and base. Nothing but the package leaves.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cluster.errors import PackageError
from cluster.updates.package import write_package
from hierarchy.ids import NodeId
from hierarchy.spec import TrainSettings
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import FileEntry, LayerSpec, UpdateManifest, sha256_digest, sign_manifest
from nodes.base.model import load_base
from nodes.build.finetune import chain_perplexity, fine_tune
from nodes.build.gate import read_eval_text
from nodes.build.training import tokenize_text
from nodes.store.adapters import AdapterWeights, read_adapter, write_adapter
from nodes.store.versions import open_served_tree

__all__ = ["MadePackage", "adapter_files", "build_manifest", "make_package"]


@dataclass(frozen=True)
class MadePackage:
    """What `update make` wrote."""

    path: Path
    manifest: UpdateManifest
    envelope: Envelope
    metrics: Mapping[str, float]


def adapter_files(adapter: AdapterWeights, base_ref: str = "") -> dict[str, bytes]:
    """The adapter as PEFT files (adapter_config.json, adapter_model.safetensors), as bytes."""
    with tempfile.TemporaryDirectory(prefix="treelm-make-") as scratch:
        write_adapter(adapter, scratch, base_model_name_or_path=base_ref or None)
        return {p.name: p.read_bytes() for p in sorted(Path(scratch).iterdir()) if p.is_file()}


def build_manifest(
    node: str,
    parent_version: int,
    version: int,
    base_digest: str,
    adapter: AdapterWeights,
    files: Mapping[str, bytes],
    training_data: bytes,
    metrics: Mapping[str, float],
    *,
    now: datetime | None = None,
    expires_in: timedelta = timedelta(days=7),
) -> UpdateManifest:
    """The manifest of an update that makes ``adapter`` (as ``files``) version ``version`` of ``node``."""
    node_id = NodeId.parse(node)
    now = now or datetime.now(UTC)
    return UpdateManifest(
        node=node_id,
        parent=node_id.parent,
        parent_version=parent_version,
        base_digest=base_digest if base_digest.startswith("sha256:") else "sha256:" + base_digest,
        version=version,
        files=tuple(FileEntry.of(name, data) for name, data in files.items()),
        layers=tuple(LayerSpec(m, f.out_features, f.in_features, f.rank) for m, f in adapter.factors.items()),
        training_data_digest=sha256_digest(training_data),
        metrics=tuple(sorted(metrics.items())),
        created=now,
        expires=now + expires_in,
    )


def _split(text: str) -> tuple[str, str]:
    """Training text and a held-out tail (the last ~10% of its documents) when no eval file is given."""
    docs = [d for d in text.split("\n\n") if d.strip()]
    if len(docs) < 4:
        return text, text
    cut = max(1, len(docs) // 10)
    return "\n\n".join(docs[:-cut]), "\n\n".join(docs[-cut:])


def make_package(
    tree_dir: str | Path,
    node: str,
    train_file: str | Path,
    key: SigningKey,
    out: str | Path,
    *,
    eval_file: str | Path | None = None,
    steps: int = 20,
    lr: float = 3e-3,
    seed: int = 0,
    version: int | None = None,
    expires_in: timedelta = timedelta(days=7),
) -> MadePackage:
    """Fine-tune ``node`` of the tree at ``tree_dir`` on ``train_file`` and write a package to ``out``."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise PackageError(f"{out} already exists; choose a new --out directory", field="out")
    tree = open_served_tree(tree_dir)
    node_id = NodeId.parse(node)
    built = tree.node(node_id)  # NodesError for a node this tree does not have
    chain = tree.chain(node_id)
    raw = read_eval_text(train_file, f"training text {train_file}")
    train_text, eval_text = _split(raw.text)
    if eval_file is not None:
        train_text, eval_text = raw.text, read_eval_text(eval_file, f"eval text {eval_file}").text
    base = load_base(tree.base_dir, digest=tree.base_digest)
    adapters = [read_adapter(n.directory, expected_sha256=n.sha256) for n in chain]
    seq_len = int(built.training.get("max_seq_len", 64) or 64)
    batch = int(built.training.get("batch_size", 4) or 4)
    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch, max_seq_len=seq_len, seed=seed)
    tokens = tokenize_text(base.tokenizer, train_text)
    held_out = tokenize_text(base.tokenizer, eval_text)
    before = chain_perplexity(base.model, adapters, held_out, seq_len)
    result = fine_tune(base.model, adapters[:-1], adapters[-1], tokens, settings)
    after = chain_perplexity(base.model, [*adapters[:-1], result.adapter], held_out, seq_len)
    metrics = {
        "eval_ppl_before": before,
        "eval_ppl": after,
        "train_loss_first": result.train.first_loss,
        "train_loss_last": result.train.last_loss,
        "steps": float(result.train.steps),
    }
    files = adapter_files(result.adapter, str(tree.base_dir))
    parent_version = chain[-2].version if len(chain) > 1 else 0
    manifest = build_manifest(
        str(node_id),
        parent_version,
        version or built.version + 1,
        tree.base_digest,
        result.adapter,
        files,
        raw.text.encode(),
        metrics,
        expires_in=expires_in,
    )
    envelope = sign_manifest(manifest, [key])
    path = write_package(out, envelope, files)
    return MadePackage(path, manifest, envelope, metrics)
