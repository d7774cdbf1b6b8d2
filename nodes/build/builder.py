"""Build a tree: train every node parents-first over its parent's effective model.

``build_tree(spec, out)`` resolves the base (nodes.base.resolve), checks every node's
data up front, then for each node in parents-first order either reuses the
built node (same training digest, files verified) or trains it with its
ancestors applied and frozen (nodes.build.training), measures it, applies the
forgetting guard, and commits it atomically. Layout: see nodes.store.tree.

Incremental rebuilds. A node's *training digest* covers everything that shapes
its weights or its guard verdict: the builder version, the base digest, the
parent's adapter digest (so any ancestor change reaches the whole subtree), its
lora/training/guard settings, the precision, and the sha256 of its train and
eval text and of the guard's replay and reference text. A matching digest
reuses the node; metadata-only changes (tags, description, visibility, owner,
level attributes) rewrite node.json without retraining. ``force`` retrains the
named nodes and their subtrees.

Forgetting guard. Every node is measured on its own eval text (node vs parent:
the specialisation gain) and on its parent's eval text (node vs parent: the
forgetting). A child of the base has no parent text; its reference is the text
of its sibling nodes (the other languages), which the base is expected to keep
handling, and its replay text is theirs too. A node whose forgetting exceeds
``guard.max_forgetting`` fails with the reason; nothing of it is written, its
subtree is skipped (a previous build of it that still fits its parent is kept).

Atomicity. A node is written into a hidden temp dir next to its final dir,
then swapped in by rename; tree.json (listing only nodes that are complete and
consistent with their parents) is replaced atomically after every change. A
lock file (DIR/.build.lock) keeps a second build from writing the same DIR.

The fields the builder writes to tree.json and node.json are listed in nodes.store.tree.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hierarchy.ids import NodePath
from hierarchy.spec import NodeSpec, TreeSpec
from nodes.base.model import load_base
from nodes.base.resolve import ResolvedBase, resolve_base
from nodes.build.files import (
    TextFile,
    clean_leftovers,
    commit_node,
    node_metadata,
    read_node_record,
    read_text,
    spec_digest,
    write_json_atomic,
)
from nodes.build.report import BuildProgress, BuildReport, NodeOutcome
from nodes.build.training import (
    PRECISIONS,
    ChainPatch,
    perplexity,
    planned_steps,
    resolve_precision,
    tokenize_text,
    train_adapter,
)
from nodes.errors import BuildError, IntegrityError, NodesError
from nodes.store.adapters import AdapterWeights, read_adapter
from nodes.store.digest import sha256_bytes
from nodes.store.tree import NODE_RECORD, TREE_RECORD, BuiltNode, node_dir, verify_node_files

__all__ = ["BUILDER", "BuildProgress", "BuildReport", "NodeOutcome", "build_tree"]

BUILDER = "treelm-build/1"


# --------------------------------------------------------------------------- the build


class _Builder:
    def __init__(self, spec: TreeSpec, out: Path, force: Sequence[str], precision: str, progress: BuildProgress):
        self.spec = spec
        self.out = out
        self.progress = progress
        self.precision_option = precision
        self.spec_dir = spec.source.parent.resolve() if spec.source else Path.cwd()
        if precision not in PRECISIONS:
            raise BuildError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.force: set[NodePath] = set()
        for value in force:
            key = NodePath(str(value).strip("/"))
            if key.is_root or not spec.has(key):
                known = ", ".join(str(n.path) for n in spec.nodes)
                raise BuildError(f"--force {value!r}: no such node in tree {spec.name!r} (nodes: {known})")
            self.force |= {n.path for n in spec.subtree(key)}
        self.present: dict[NodePath, dict[str, Any]] = {}  # committed node records, this build
        self.adapters: dict[NodePath, AdapterWeights] = {}
        self.ppl_cache: dict[tuple, float] = {}
        self.tree_record: dict[str, Any] = {}

    # ---- preparation

    def _existing_tree(self) -> dict[str, Any] | None:
        file = self.out / TREE_RECORD
        if not file.is_file():
            return None
        try:
            record = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise BuildError(f"{file} is corrupt ({exc}); build into a new --out directory") from exc
        if record.get("name") != self.spec.name:
            raise BuildError(
                f"{self.out} holds tree {record.get('name')!r}, the spec is tree {self.spec.name!r}: "
                "build into a new --out directory"
            )
        gone = [
            p
            for p in record.get("nodes", [])
            if not self.spec.has(p) and (node_dir(self.out, p) / NODE_RECORD).is_file()
        ]
        if gone:
            listed = ", ".join(gone)
            raise BuildError(
                f"node(s) built in {self.out} are no longer in the spec: {listed}. "
                f"Restore them in the spec, or delete their folders under {self.out / 'nodes'} first."
            )
        return record

    def _read_texts(self) -> dict[tuple[str, str], TextFile]:
        problems: list[str] = []
        texts: dict[tuple[str, str], TextFile] = {}
        for node in self.spec.nodes:
            for fld in ("train", "eval"):
                got = read_text(node, fld, getattr(node, fld), self.spec_dir, problems)
                if got is not None:
                    texts[(str(node.path), fld)] = got
        if problems:
            raise BuildError(
                f"{len(problems)} data problem(s) in tree {self.spec.name!r}:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        return texts

    def _tokenize(self, tokenizer) -> dict[tuple[str, str], Any]:
        problems: list[str] = []
        tokens = {key: tokenize_text(tokenizer, t.text) for key, t in self.texts.items()}
        for node in self.spec.nodes:
            need = node.training.max_seq_len + 1
            n_train = int(tokens[(str(node.path), "train")].numel())
            if n_train < need:
                problems.append(
                    f"node '{node.path}': field 'train': {self.texts[(str(node.path), 'train')].label} has {n_train} "
                    f"tokens, fewer than one training sequence (training.max_seq_len + 1 = {need}); "
                    "add text or lower training.max_seq_len"
                )
            if int(tokens[(str(node.path), "eval")].numel()) < 2:
                problems.append(f"node '{node.path}': field 'eval': fewer than 2 tokens of evaluation text")
        if problems:
            raise BuildError(
                f"{len(problems)} data problem(s) in tree {self.spec.name!r}:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        return tokens

    # ---- guard texts

    def _guard_sources(self, node: NodeSpec) -> tuple[str, list[str]]:
        """(reference label, node paths whose texts are the parent's text for replay and forgetting)."""
        if not node.parent.is_root:
            return str(node.parent), [str(node.parent)]
        siblings = [str(n.path) for n in self.spec.nodes if n.path.depth == 1 and n.path != node.path]
        return ("siblings:" + ",".join(siblings) if siblings else ""), siblings

    def _joined(self, paths: list[str], fld: str):
        parts = [self.tokens[(p, fld)] for p in paths]
        return torch.cat(parts) if parts else None

    # ---- digests and records

    def _training_digest(self, node: NodeSpec, parent_digest: str | None, sources: list[str]) -> str:
        p = str(node.path)
        payload = {
            "builder": BUILDER,
            "base": self.base.digest,
            "parent_adapter": parent_digest,
            "lora": node.lora.to_dict(),
            "training": node.training.to_dict(),
            "guard": node.guard.to_dict(),
            "precision": self.precision,
            "data": {
                "train": self.texts[(p, "train")].sha256,
                "eval": self.texts[(p, "eval")].sha256,
                "parent_train": [self.texts[(s, "train")].sha256 for s in sources],
                "parent_eval": [self.texts[(s, "eval")].sha256 for s in sources],
            },
        }
        return sha256_bytes(json.dumps(payload, sort_keys=True).encode())

    def _node_record(self, node: NodeSpec, digest: str, sources: list[str], metrics: dict, training: dict) -> dict:
        p = str(node.path)
        parent = None if node.parent.is_root else self.present[node.parent]
        return node_metadata(node) | {
            "id": str(self.spec.node_id(node.path)),
            "parent": str(self.spec.node_id(node.parent)),
            "version": 1,
            "parent_version": None if parent is None else int(parent.get("version", 1)),
            "parent_adapter_digest": None if parent is None else parent["files"]["adapter_model.safetensors"]["sha256"],
            "base_digest": self.base.digest,
            "lora": node.lora.to_dict(),
            "training": training,
            "guard": node.guard.to_dict(),
            "data": {
                fld: {
                    "file": self.texts[(p, fld)].label,
                    "sha256": self.texts[(p, fld)].sha256,
                    "tokens": int(self.tokens[(p, fld)].numel()),
                }
                for fld in ("train", "eval")
            }
            | {
                "parent_text": [
                    {
                        "node": s,
                        "train_sha256": self.texts[(s, "train")].sha256,
                        "eval_sha256": self.texts[(s, "eval")].sha256,
                    }
                    for s in sources
                ]
            },
            "metrics": metrics,
            "build_digest": digest,
            "builder": BUILDER,
        }

    def _write_tree(self) -> None:
        self.tree_record["nodes"] = [str(n.path) for n in self.spec.nodes if n.path in self.present]
        write_json_atomic(self.out / TREE_RECORD, self.tree_record)

    def _drop_subtree(self, path: NodePath) -> None:
        for n in self.spec.subtree(path):
            self.present.pop(n.path, None)
            self.adapters.pop(n.path, None)

    # ---- per node

    def _reuse(self, node: NodeSpec, digest: str, sources: list[str]) -> NodeOutcome | None:
        if node.path in self.force:
            return None
        record = read_node_record(self.out, node.path)
        if record is None or record.get("build_digest") != digest:
            return None
        built = BuiltNode.from_record(node_dir(self.out, node.path), record)
        try:
            verify_node_files(built)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}; retrain it with `--force {node.path}`") from None
        status = "reused"
        wanted = self._node_record(
            node, digest, sources, dict(record.get("metrics", {})), dict(record.get("training", {}))
        )
        wanted["files"] = record["files"]
        if wanted != record:
            write_json_atomic(node_dir(self.out, node.path) / NODE_RECORD, wanted)
            status = "updated"
        self.present[node.path] = wanted
        self._write_tree()
        return NodeOutcome(node.path, wanted["id"], node.level.value, status, "", wanted.get("metrics", {}))

    def _chain(self, node: NodeSpec) -> list[AdapterWeights]:
        chain = []
        for path in node.path.ancestors():
            if path not in self.adapters:
                record = self.present[path]
                expected = {name: info["sha256"] for name, info in record["files"].items()}
                self.adapters[path] = read_adapter(node_dir(self.out, path), expected_sha256=expected)
            chain.append(self.adapters[path])
        return chain

    def _ppl(self, key: tuple, stream, seq_len: int) -> float:
        full = (*key, seq_len)
        if full not in self.ppl_cache:
            self.ppl_cache[full] = perplexity(self.model, stream, seq_len)
        return self.ppl_cache[full]

    def _train(self, node: NodeSpec, digest: str, ref_label: str, sources: list[str]) -> NodeOutcome:
        p, node_id = str(node.path), str(self.spec.node_id(node.path))
        started = time.perf_counter()
        own, own_eval = self.tokens[(p, "train")], self.tokens[(p, "eval")]
        replay, ref_eval = self._joined(sources, "train"), self._joined(sources, "eval")
        seq = node.training.max_seq_len
        parent_key = tuple(
            self.present[a]["files"]["adapter_model.safetensors"]["sha256"] for a in node.path.ancestors()
        )
        self.progress.node_started(node_id, planned_steps(node.training, int(own.numel())))
        with ChainPatch(self.model, self._chain(node), node.lora, seed=node.training.seed) as patch:
            self.progress.phase(node_id, "measuring the parent")
            patch.set_own_enabled(False)
            parent_eval = self._ppl((parent_key, p, "eval"), own_eval, seq)
            parent_ref = self._ppl((parent_key, ref_label, "ref"), ref_eval, seq) if ref_eval is not None else None
            patch.set_own_enabled(True)
            result = train_adapter(
                self.model,
                patch,
                own,
                replay,
                node.training,
                node.guard,
                precision=self.precision,
                on_step=lambda step, total, loss: self.progress.step(node_id, step, total, loss),
            )
            self.progress.phase(node_id, "evaluating")
            node_eval = perplexity(self.model, own_eval, seq)
            node_ref = perplexity(self.model, ref_eval, seq) if ref_eval is not None else None
            adapter = patch.own_adapter()
        forgetting = None if node_ref is None or parent_ref is None else node_ref / parent_ref - 1.0
        metrics = {
            "eval_ppl": node_eval,
            "parent_eval_ppl": parent_eval,
            "specialisation_gain": 1.0 - node_eval / parent_eval,
            "parent_text_ppl": node_ref,
            "parent_text_parent_ppl": parent_ref,
            "forgetting": forgetting,
            "forgetting_bound": node.guard.max_forgetting,
            "forgetting_reference": ref_label or None,
            "train_loss_first": result.first_loss,
            "train_loss_last": result.last_loss,
            "steps": result.steps,
            "tokens": result.tokens,
            "train_seconds": round(result.seconds, 3),
            "precision": result.precision,
        }
        seconds = time.perf_counter() - started
        if forgetting is not None and forgetting > node.guard.max_forgetting:
            reason = (
                f"forgetting {forgetting:.1%} exceeds guard.max_forgetting {node.guard.max_forgetting:.1%}: perplexity "
                f"on {ref_label}'s eval text rose from {parent_ref:.3f} (parent) to {node_ref:.3f}; raise guard.replay "
                "or guard.kl_weight, lower training.lr or training.steps, or raise guard.max_forgetting"
            )
            return NodeOutcome(node.path, node_id, node.level.value, "failed", reason, metrics, seconds)
        training = node.training.to_dict() | {"precision": self.precision, "steps_run": result.steps}
        record = self._node_record(node, digest, sources, metrics, training)
        self._drop_subtree(node.path)  # its old subtree (if any) is stale from here on
        self._write_tree()
        record = commit_node(self.out, node.path, adapter, record, self.base.recorded_dir)
        self.present[node.path] = record
        self.adapters[node.path] = adapter
        self._write_tree()
        return NodeOutcome(node.path, node_id, node.level.value, "trained", "", metrics, seconds)

    # ---- whole build

    def run(self) -> BuildReport:
        started = time.perf_counter()
        existed = self.out.exists()
        existing = self._existing_tree() if existed else None
        self._lock = _lock(self.out)
        try:
            self.texts = self._read_texts()
            if existed:
                clean_leftovers(self.out)
            self.progress.message(f"resolving base {self.spec.base.model!r}")
            all_train = [t.text for (_, fld), t in self.texts.items() if fld == "train"]
            self.base: ResolvedBase = resolve_base(
                self.spec.base,
                self.out,
                spec_dir=self.spec_dir,
                texts=all_train,
                recorded=existing.get("base") if existing else None,
            )
            loaded = load_base(self.base.directory)
            self.model = loaded.model
            self.tokens = self._tokenize(loaded.tokenizer)
            self.precision = resolve_precision(self.precision_option, self.model)
        except BaseException:
            if not existed and self.out.exists():  # nothing of a failed first build stays behind
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        # Nodes of the previous build stay listed (they are consistent) until one is retrained.
        for path in (existing or {}).get("nodes", []):
            record = read_node_record(self.out, NodePath(path))
            if record is not None and NodePath(path).parent in (*self.present, NodePath.root()):
                self.present[NodePath(path)] = record
        self.tree_record = {
            "name": self.spec.name,
            "description": self.spec.description,
            "base": self.base.to_record(),
            "spec_digest": (existing or {}).get("spec_digest", ""),
            "spec_source": str(self.spec.source) if self.spec.source else None,
            "builder": BUILDER,
            "nodes": [],
        }
        self._write_tree()
        outcomes = [self._one(node) for node in self.spec.nodes]
        if all(o.status in ("trained", "reused", "updated") for o in outcomes):
            self.tree_record["spec_digest"] = spec_digest(self.spec, self.texts)
        self._write_tree()
        return BuildReport(
            root=self.out,
            name=self.spec.name,
            base_model=self.spec.base.model,
            base_digest=self.base.digest,
            outcomes=tuple(outcomes),
            seconds=time.perf_counter() - started,
        )

    def _one(self, node: NodeSpec) -> NodeOutcome:
        node_id = str(self.spec.node_id(node.path))
        if not node.parent.is_root and node.parent not in self.present:
            self._drop_subtree(node.path)
            self._write_tree()
            outcome = NodeOutcome(
                node.path,
                node_id,
                node.level.value,
                "skipped",
                f"its parent {self.spec.node_id(node.parent)} was not built",
            )
        else:
            ref_label, sources = self._guard_sources(node)
            parent = None if node.parent.is_root else self.present[node.parent]
            parent_digest = None if parent is None else parent["files"]["adapter_model.safetensors"]["sha256"]
            digest = self._training_digest(node, parent_digest, sources)
            outcome = self._reuse(node, digest, sources) or self._train(node, digest, ref_label, sources)
            if outcome.status == "failed":
                if self._previous_still_fits(node, parent_digest):
                    outcome = replace(outcome, reason=outcome.reason + " (the previous build of this node is kept)")
                else:
                    self._drop_subtree(node.path)
                    self._write_tree()
        self.progress.node_finished(outcome)
        return outcome

    def _previous_still_fits(self, node: NodeSpec, parent_digest: str | None) -> bool:
        """Whether the node's previous build (if any) is still valid over its current parent."""
        record = self.present.get(node.path)
        if record is None or record.get("parent_adapter_digest") != parent_digest:
            return False
        if record.get("base_digest") != self.base.digest:
            return False
        try:
            verify_node_files(BuiltNode.from_record(node_dir(self.out, node.path), record))
        except NodesError:
            return False
        return True


def _lock(out: Path):
    """An exclusive lock on DIR/.build.lock, held until the returned file is closed (or the process ends)."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".build.lock", "w")  # noqa: SIM115 - held for the whole build
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BuildError(f"another `treelm tree build` is writing {out}; wait for it to finish") from None
    return handle


def build_tree(
    spec: TreeSpec,
    out: str | Path,
    *,
    force: Sequence[str | NodePath] = (),
    precision: str = "auto",
    progress: BuildProgress | None = None,
) -> BuildReport:
    """Build (or incrementally rebuild) ``spec`` into ``out``; see the module docstring.

    Raises BuildError / BaseModelError / IntegrityError for bad input before anything
    is changed; nodes failing the forgetting guard are reported in the returned
    report (``report.raise_for_failures()`` turns them into a BuildError).
    """
    builder = _Builder(spec, Path(out).resolve(), [str(f) for f in force], precision, progress or BuildProgress())
    try:
        return builder.run()
    finally:
        lock = getattr(builder, "_lock", None)
        if lock is not None:
            lock.close()
