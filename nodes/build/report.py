"""What a tree build reports: one outcome per node, the whole report, and progress callbacks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hierarchy.ids import NodePath
from nodes.errors import BuildError

__all__ = ["BuildProgress", "BuildReport", "NodeOutcome"]


@dataclass(frozen=True)
class NodeOutcome:
    """What the build did with one node."""

    path: NodePath
    node_id: str
    level: str
    status: str  # trained | reused | updated | failed | skipped
    reason: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "path": str(self.path),
            "level": self.level,
            "status": self.status,
            "reason": self.reason,
            "metrics": dict(self.metrics),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class BuildReport:
    """The outcome of one build: per-node results in parents-first order."""

    root: Path
    name: str
    base_model: str
    base_digest: str
    outcomes: tuple[NodeOutcome, ...]
    seconds: float

    @property
    def failed(self) -> tuple[NodeOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status in ("failed", "skipped"))

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failures(self) -> None:
        if self.failed:
            lines = "\n".join(f"  - {o.node_id}: {o.status}: {o.reason}" for o in self.failed)
            raise BuildError(f"{len(self.failed)} node(s) of tree {self.name!r} were not built:\n{lines}")

    def to_json(self) -> dict[str, Any]:
        return {
            "tree": self.name,
            "out": str(self.root),
            "base": {"model": self.base_model, "digest": self.base_digest},
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "nodes": [o.to_json() for o in self.outcomes],
        }


class BuildProgress:
    """Callbacks a front end implements to show a build's progress (all optional no-ops)."""

    def message(self, text: str) -> None: ...

    def node_started(self, node_id: str, steps: int) -> None: ...

    def step(self, node_id: str, step: int, total: int, loss: float) -> None: ...

    def phase(self, node_id: str, text: str) -> None: ...

    def node_finished(self, outcome: NodeOutcome) -> None: ...
