"""Hide the names of nodes a caller cannot see inside records it may see.

A public parent's candidate and version records carry figures about every child that fed
them (the gate's probe checks name each child, e.g. ``st/en/medical/oncology probe``). Another
tenant may read the parent's records, so before they leave the server every mention of a
private node the caller cannot see becomes :data:`PRIVATE_NODE`, in keys and values alike.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import TypeVar

from cluster.updates.status import UpdateStatus
from registry.records import VersionRecord

__all__ = ["PRIVATE_NODE", "Redactor"]

PRIVATE_NODE = "(private node)"

T = TypeVar("T")


class Redactor:
    """Replaces hidden node ids (and their paths below the tree name) in nested records."""

    def __init__(self, hidden: Iterable[str]):
        names: set[str] = set()
        for node_id in hidden:
            names.add(node_id)
            _tree, _, path = node_id.partition("/")
            if path:
                names.add(path)  # gate checks and file labels may name a node by its path
        # Longest first, so a node's id wins over its path. A name must not be part of a longer
        # segment (segments are [a-z0-9_-]); "/" and "." around it (a file below the node, a
        # flattened figure's key) are boundaries.
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])") if names else None

    @property
    def active(self) -> bool:
        return self._pattern is not None

    def text(self, value: str) -> str:
        return self._pattern.sub(PRIVATE_NODE, value) if self._pattern is not None else value

    def value(self, value: T) -> T:
        """``value`` with every string (and mapping key) redacted; other values as they are."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)  # type: ignore[return-value]
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}  # type: ignore[return-value]
        if isinstance(value, (list, tuple)):
            return type(value)(self.value(v) for v in value)
        return value

    def version(self, record: VersionRecord) -> VersionRecord:
        return dataclasses.replace(record, metrics=self.value(dict(record.metrics))) if self.active else record

    def update(self, status: UpdateStatus) -> UpdateStatus:
        if not self.active:
            return status
        return dataclasses.replace(
            status,
            parent=self.text(status.parent),
            reasons=self.value(tuple(status.reasons)),
            figures=self.value(dict(status.figures)),
        )
