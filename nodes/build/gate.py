"""The evaluation gate: perplexity before and after a change, each against its own bound.

A parent's candidate version is compared with what is served now on

- the parent's held-out text            (the parent must not forget its own domain),
- each child's probe text               (no sibling may be hurt by what another child taught),
- a general canary text                 (nothing may leak into general language ability),

and a child re-validated over a new parent version is compared on its probe text. Every
comparison is ``after / before - 1`` (relative perplexity change); any one above its bound
rejects, and :class:`GateReport` keeps every figure so the refusal can say exactly why.

A ``stale`` check is measured and reported but never rejects: the updating child's new adapter
over the candidate parent, which counts the update twice (once in its adapter, once folded into
the parent). That chain is never served: when the parent's version lands, the child is
re-validated over it and held on its pin if it drifts, until its rebased version is ready.

Texts are a node's eval text as recorded in node.json (``data.eval``: the file, relative to the
spec the tree was built from, and its sha256, checked), or files named explicitly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hierarchy.errors import GateRejected
from nodes.base.model import LoadedBase
from nodes.build.finetune import chain_perplexity
from nodes.build.training import tokenize_text
from nodes.errors import GateTextMissing
from nodes.store.adapters import AdapterWeights
from nodes.store.digest import sha256_bytes
from nodes.store.tree import BuiltNode, BuiltTree

__all__ = [
    "Comparison",
    "EvalText",
    "Evaluator",
    "GateBounds",
    "GateCheck",
    "GateReport",
    "canary_text",
    "node_eval_text",
    "node_text",
    "read_eval_text",
]


@dataclass(frozen=True)
class GateBounds:
    """Largest allowed relative perplexity rise (0.02 = 2%) per kind of check."""

    parent: float = field(default=0.02, metadata={"help": "the parent's own held-out text"})
    probe: float = field(default=0.02, metadata={"help": "each child's probe text"})
    canary: float = field(default=0.02, metadata={"help": "the general canary text"})
    repin: float = field(default=0.02, metadata={"help": "a child re-validated over a new parent version"})
    rebase: float = field(default=0.01, metadata={"help": "a child's rebased version on its own text (both ways)"})
    # Not a rise but a required fall: an update made from feedback must lower the perplexity of the
    # node's held-out feedback by at least this much (0 = any improvement).
    feedback: float = field(default=0.0, metadata={"help": "least relative improvement on held-out feedback"})

    def __post_init__(self) -> None:
        for name in ("parent", "probe", "canary", "repin", "rebase", "feedback"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"gate bound {name!r} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, float]:
        return {
            "parent": self.parent,
            "probe": self.probe,
            "canary": self.canary,
            "repin": self.repin,
            "rebase": self.rebase,
            "feedback": self.feedback,
        }

    def bound(self, kind: str) -> float:
        """The signed bound on the relative change of a check of ``kind`` (a fall for feedback;
        a ``stale`` check is reported against the re-pin bound, see the module docstring)."""
        if kind == "stale":
            return self.repin
        return -self.feedback if kind == "feedback" else float(getattr(self, kind))


@dataclass(frozen=True)
class EvalText:
    """A text the gate measures on: where it came from, its sha256, its content."""

    label: str
    sha256: str
    text: str = field(repr=False)


def read_eval_text(path: str | Path, label: str | None = None, sha256: str | None = None) -> EvalText:
    """Read a UTF-8 text file; with ``sha256`` it must match (the text a node was built with)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GateTextMissing(f"cannot read {label or path}: {exc.strerror or exc}") from None
    digest = sha256_bytes(raw)
    if sha256 is not None and digest != sha256:
        raise GateTextMissing(
            f"{path} has sha256 {digest[:12]}..., the tree recorded {sha256[:12]}...: "
            "it changed since the build; restore it or name another text"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GateTextMissing(f"{path} is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise GateTextMissing(f"{path} is empty")
    return EvalText(label or str(path), digest, text)


def node_eval_text(tree: BuiltTree, node: BuiltNode) -> EvalText:
    """The eval text ``node`` was built with (node.json ``data.eval``), found beside the tree's spec."""
    return node_text(tree, node, "eval")


def node_text(tree: BuiltTree, node: BuiltNode, kind: str) -> EvalText:
    """The ``eval`` or ``train`` text ``node`` was built with (node.json ``data``), checked by its digest."""
    info = (node.data or {}).get(kind) or {}
    name = info.get("file")
    if not name:
        raise GateTextMissing(f"node {node.node_id} records no {kind} text; name its probe text explicitly")
    path = Path(name)
    if not path.is_absolute():
        spec = tree.raw.get("spec_source")
        if not spec:
            raise GateTextMissing(f"cannot locate {name} of node {node.node_id}: the tree records no spec file")
        path = Path(spec).parent / path
    return read_eval_text(path, f"{node.node_id} {kind} ({name})", info.get("sha256"))


def canary_text(tree: BuiltTree) -> EvalText:
    """The default canary: the eval texts of the base's children (general text of every language)."""
    parts = [node_eval_text(tree, n) for n in tree.nodes if n.parent_id.is_base]
    if not parts:
        raise GateTextMissing(f"tree {tree.name!r} has no first-level nodes to draw a canary text from")
    text = "\n\n".join(p.text for p in parts)
    return EvalText(
        "canary (" + ", ".join(p.label.split(" ")[0] for p in parts) + ")", sha256_bytes(text.encode()), text
    )


@dataclass(frozen=True)
class Comparison:
    """One gate check to run: a text under the chain served now and under the changed chain."""

    name: str  # e.g. "parent held-out", "probe demo/en/medical/cardiology", "canary"
    kind: str  # parent | probe | canary | repin | rebase | feedback | stale: which bound applies
    text: EvalText
    before: Sequence[AdapterWeights]  # the chain served now (top ancestor first)
    after: Sequence[AdapterWeights]  # the chain with the change
    before_key: Hashable = None  # caching keys for the chains (e.g. their version links); None: no cache
    after_key: Hashable = None


@dataclass(frozen=True)
class GateCheck:
    """One measured check."""

    name: str
    kind: str
    text: str  # the text's label
    before: float  # perplexity now
    after: float  # perplexity with the change
    bound: float

    @property
    def change(self) -> float:
        return self.after / self.before - 1.0

    @property
    def gated(self) -> bool:
        """False for a ``stale`` check: measured and reported, never a reason to reject."""
        return self.kind != "stale"

    @property
    def passed(self) -> bool:
        if not self.gated:
            return True
        if not math.isfinite(self.after) or self.change > self.bound:
            return False
        if self.kind == "rebase":  # a rebased child must stay close to what it was: better counts too
            return abs(self.change) <= self.bound
        return self.kind != "feedback" or self.change < 0  # feedback must improve, not merely hold

    def describe(self) -> str:
        if not self.gated:
            return (
                f"{self.name}: perplexity {self.before:.3f} -> {self.after:.3f} ({self.change:+.2%}; "
                "not gated: held on its pin until rebased where it drifts)"
            )
        verdict = "ok" if self.passed else ("NO IMPROVEMENT" if self.kind == "feedback" else "REGRESSION")
        return (
            f"{self.name}: perplexity {self.before:.3f} -> {self.after:.3f} ({self.change:+.2%}, bound "
            f"{self.bound:+.2%}) {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "text": self.text,
            "before": self.before,
            "after": self.after,
            "change": self.change,
            "bound": self.bound,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class GateReport:
    """Every figure of one gate run; ``passed`` only when every check is within its bound."""

    subject: str  # what was gated, e.g. "candidate demo/en/medical v2"
    checks: tuple[GateCheck, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "passed": self.passed, "checks": [c.to_dict() for c in self.checks]}

    def raise_if_failed(self) -> GateReport:
        if not self.passed:
            lines = "; ".join(c.describe() for c in self.failures)
            raise GateRejected(f"gate rejected {self.subject}: {lines}", report=self)
        return self


class Evaluator:
    """Measures chains on texts with one loaded base (one caller at a time: the model is patched)."""

    def __init__(self, base: LoadedBase, *, seq_len: int = 64, max_tokens: int | None = None):
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.base = base
        self.seq_len = seq_len
        self.max_tokens = max_tokens  # each text measured on its first max_tokens tokens (None: all of it)
        self.lock = threading.RLock()
        self._tokens: dict[str, torch.Tensor] = {}
        self._ppl: dict[tuple[Hashable, str], float] = {}

    def tokens(self, text: EvalText) -> torch.Tensor:
        """The text as one token stream, [n] int64 (cached by sha256)."""
        if text.sha256 not in self._tokens:
            ids = tokenize_text(self.base.tokenizer, text.text)
            if ids.numel() < 2:
                raise GateTextMissing(f"{text.label} has fewer than 2 tokens")
            self._tokens[text.sha256] = ids[: self.max_tokens] if self.max_tokens else ids
        return self._tokens[text.sha256]

    def perplexity(self, chain: Sequence[AdapterWeights], text: EvalText, key: Hashable = None) -> float:
        cache_key = (key, text.sha256)
        if key is not None and cache_key in self._ppl:
            return self._ppl[cache_key]
        with self.lock:
            value = chain_perplexity(self.base.model, list(chain), self.tokens(text), self.seq_len)
        if key is not None:
            if len(self._ppl) >= 4096:  # keys name chains of versions; a long-running server sees many
                self._ppl.clear()
            self._ppl[cache_key] = value
        return value

    def run(self, subject: str, comparisons: Sequence[Comparison], bounds: GateBounds) -> GateReport:
        """Measure every comparison (the report holds them all; nothing raises here)."""
        checks = []
        for c in comparisons:
            before = self.perplexity(c.before, c.text, c.before_key)
            after = self.perplexity(c.after, c.text, c.after_key)
            checks.append(GateCheck(c.name, c.kind, c.text.label, before, after, bounds.bound(c.kind)))
        return GateReport(subject, tuple(checks))
