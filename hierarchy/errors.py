"""Errors raised by the pure domain layer.

HierarchyError
├── InvalidNodePath      a path or node id with bad characters or shape
├── SpecError            a tree spec with one or more problems (all listed)
└── ChainError           adapter factors that cannot be composed (shapes, ranks)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChainError", "HierarchyError", "InvalidNodePath", "SpecError", "SpecProblem"]


class HierarchyError(Exception):
    """Base of every error raised by :mod:`hierarchy`."""


class InvalidNodePath(HierarchyError, ValueError):
    """A node path or node id that is not well formed."""


class ChainError(HierarchyError, ValueError):
    """Adapter factors whose shapes or settings do not compose."""


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a tree spec, located as precisely as we can."""

    file: str
    node: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.node is not None:
            where += f": node '{self.node}'"
        if self.field is not None:
            where += f": field '{self.field}'"
        return f"{where}: {self.message}"


class SpecError(HierarchyError, ValueError):
    """A tree spec that failed validation; ``problems`` lists every problem found."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in tree spec:\n{lines}")
