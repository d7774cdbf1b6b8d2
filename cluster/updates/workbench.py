"""The coordinator's model-side work: adapters of stored versions, reference increments, gate runs.

One base model is loaded (lazily, on first use) beside the serving engine's, so measuring never
disturbs serving. Texts: each node's probe is its eval text from the build (or the policy's
``probes``), the parent's held-out text is its own probe, the canary is the policy's file or the
first-level nodes' texts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from cluster.updates.policy import DistillPolicy, UpdatePolicy
from hierarchy.chain import LoraFactors
from hierarchy.ids import NodeId, NodePath
from hierarchy.spec import TrainSettings
from nodes.base.model import load_base
from nodes.build.activations import input_covariances
from nodes.build.distill import Target, distill
from nodes.build.finetune import fine_tune, increment
from nodes.build.gate import Comparison, EvalText, Evaluator, GateCheck, canary_text, node_eval_text, read_eval_text
from nodes.build.training import tokenize_text
from nodes.errors import GateTextMissing
from nodes.store.adapters import AdapterWeights
from nodes.store.tree import BuiltNode
from nodes.store.versions import ChainLink, VersionStore

__all__ = ["FEEDBACK_EVAL_DIR", "Workbench", "feedback_eval_file"]

Delta = Mapping[str, LoraFactors]
FEEDBACK_EVAL_DIR = "feedback-eval"  # under the tree dir: one text per node, its held-out feedback
_MAX_CACHED = 256  # adapters / reference increments kept in memory (each a few MB at most)


def feedback_eval_file(tree_dir: str | Path, path: str) -> Path:
    """Where node ``path``'s held-out feedback lives (``en/medical`` -> ``feedback-eval/en/medical.txt``)."""
    return Path(tree_dir) / FEEDBACK_EVAL_DIR / f"{path}.txt"


class Workbench:
    """Loads adapters, measures chains and computes reference increments for one tree."""

    def __init__(self, store: VersionStore, policy: UpdatePolicy):
        self.store = store
        self.policy = policy
        self._lock = threading.RLock()
        self._evaluator: Evaluator | None = None
        self._adapters: dict[ChainLink, AdapterWeights] = {}
        self._texts: dict[str, EvalText] = {}
        self._references: dict[tuple, dict[str, LoraFactors]] = {}
        self._covariances: dict[tuple, dict[str, torch.Tensor]] = {}
        self._token_cache: dict[str, torch.Tensor] = {}
        first = store.tree.nodes[0] if store.tree.nodes else None
        self.seq_len = int((first.training if first else {}).get("max_seq_len", 64) or 64)

    # -- loading ---------------------------------------------------------------------------
    @property
    def evaluator(self) -> Evaluator:
        with self._lock:
            if self._evaluator is None:
                base = load_base(self.store.tree.base_dir, digest=self.store.tree.base_digest)
                self._evaluator = Evaluator(base, seq_len=self.seq_len, max_tokens=self.policy.gate_max_tokens)
            return self._evaluator

    def adapter(self, link: ChainLink) -> AdapterWeights:
        with self._lock:
            if link not in self._adapters:
                if len(self._adapters) >= _MAX_CACHED:  # a long-running server sees many versions
                    self._adapters.clear()
                self._adapters[link] = self.store.adapter(link)
            return self._adapters[link]

    def adapters(self, chain: Sequence[ChainLink]) -> list[AdapterWeights]:
        return [self.adapter(link) for link in chain]

    def _built(self, path: str) -> BuiltNode:
        return self.store.tree.node(NodeId(self.store.tree.name, NodePath(path)))

    def probe(self, path: str) -> EvalText:
        """The probe text of node ``path`` (the policy's file, else its eval text from the build)."""
        with self._lock:
            if path not in self._texts:
                override = self.policy.probes.get(path)
                self._texts[path] = (
                    read_eval_text(override, f"probe of {path} ({override})")
                    if override
                    else node_eval_text(self.store.tree, self._built(path))
                )
            return self._texts[path]

    def train_text(self, path: str) -> EvalText:
        """The text node ``path`` was trained on (node.json ``data.train``), else its probe text:
        what distillation replays, so that the gate never measures on what was trained on."""
        with self._lock:
            key = "\0train " + path
            if key not in self._texts:
                node = self._built(path)
                info = (node.data or {}).get("train") or {}
                try:
                    data = {**(node.data or {}), "eval": info} if info.get("file") else None
                    self._texts[key] = (
                        node_eval_text(self.store.tree, replace(node, data=data)) if data else self.probe(path)
                    )
                except GateTextMissing:  # moved or changed since the build
                    self._texts[key] = self.probe(path)
            return self._texts[key]

    def train_tokens(self, path: str) -> torch.Tensor:
        """:meth:`train_text` as one token stream (all of it: the gate's token cap is for measuring)."""
        text = self.train_text(path)
        with self._lock:
            key = "\0tokens " + text.sha256
            if key not in self._token_cache:
                self._token_cache[key] = tokenize_text(self.evaluator.base.tokenizer, text.text)
            return self._token_cache[key]

    def distill(
        self, ancestors: Sequence[AdapterWeights], own: AdapterWeights, targets: Sequence[Target], policy: DistillPolicy
    ) -> AdapterWeights:
        """``nodes.build.distill.distill`` with the workbench's model and ``policy``'s settings."""
        ev = self.evaluator
        with ev.lock:
            return distill(ev.base.model, list(ancestors), own, targets, policy.settings(self.seq_len)).adapter

    def feedback(self, path: str) -> EvalText | None:
        """Node ``path``'s held-out feedback (written by `update make --from-feedback`), if it has any.

        Read on every gate run, not cached: each feedback update adds its held-out part."""
        file = feedback_eval_file(self.store.root, path)
        if not file.is_file():
            return None
        return read_eval_text(file, f"held-out feedback of {path}")

    def canary(self) -> EvalText:
        with self._lock:
            if "\0canary" not in self._texts:
                c = self.policy.canary
                self._texts["\0canary"] = read_eval_text(c, f"canary ({c})") if c else canary_text(self.store.tree)
            return self._texts["\0canary"]

    # -- computing -------------------------------------------------------------------------
    def reference(self, chain: Sequence[ChainLink]) -> dict[str, LoraFactors]:
        """The parent's own reference increment for the node at the end of ``chain`` (FLTrust-style).

        The node's served adapter fine-tuned for a few steps on its clean probe text, over its
        served ancestors: the direction an honest update of that node should roughly share.
        """
        path = chain[-1].path
        settings = TrainSettings(
            steps=self.policy.reference_steps,
            lr=self.policy.reference_lr,
            batch_size=4,
            max_seq_len=self.seq_len,
            seed=self.policy.reference_seed,
        )
        text = self.probe(path)
        key = (tuple(chain), text.sha256, settings)
        with self._lock:
            if key not in self._references:
                if len(self._references) >= _MAX_CACHED:
                    self._references.clear()
                ev = self.evaluator
                current = self.adapter(chain[-1])
                with ev.lock:
                    result = fine_tune(ev.base.model, self.adapters(chain[:-1]), current, ev.tokens(text), settings)
                self._references[key] = increment(current, result.adapter)
            return self._references[key]

    def input_covariance(self, nodes: Sequence[tuple[str, Sequence[ChainLink]]], modules: Iterable[str]):
        """Per layer, the sum over the (node path, served chain) pairs of the mean ``x x^T`` of the
        inputs that chain feeds the layer on that node's probe text (each text counts once,
        whatever its length): what ``project`` / ``contrast`` merges protect or keep."""
        wanted = sorted(set(modules))
        total: dict[str, torch.Tensor] = {}
        for path, chain in nodes:
            text = self.probe(path)
            key = (tuple(chain), text.sha256, tuple(wanted))
            with self._lock:
                if key not in self._covariances:
                    if len(self._covariances) >= _MAX_CACHED:
                        self._covariances.clear()
                    ev = self.evaluator
                    with ev.lock:
                        self._covariances[key] = input_covariances(
                            ev.base.model, self.adapters(chain), ev.tokens(text), self.seq_len, wanted
                        )
                cov = self._covariances[key]
            for m, c in cov.items():
                total[m] = total[m] + c if m in total else c
        return total

    def measure(self, subject: str, comparisons: Sequence[Comparison]):
        return self.evaluator.run(subject, comparisons, self.policy.gate)

    def revalidate(self, path: str, current: Sequence[ChainLink], target: Sequence[ChainLink]) -> GateCheck:
        """The node's probe under its current chain and under ``target``, against the re-pin bound."""
        report = self.measure(
            f"re-validation of {path}",
            [
                Comparison(
                    f"probe {path}",
                    "repin",
                    self.probe(path),
                    self.adapters(current),
                    self.adapters(target),
                    before_key=tuple(current),
                    after_key=tuple(target),
                )
            ],
        )
        return report.checks[0]
