"""Errors raised by the model runtime.

    NodesError
    ├── BaseModelError        a base that cannot be made, found or loaded
    ├── AdapterError          an adapter dir that is missing, malformed or does not fit the base
    │   └── IntegrityError    a file whose sha256 differs from the recorded one
    ├── BuildError            a tree build step that failed (bad data, forgetting bound, ...)
    ├── ExportError           an export that cannot be produced
    └── EngineError           generation errors (see nodes.engine for its subtypes)
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "BaseModelError",
    "BuildError",
    "EngineError",
    "ExportError",
    "IntegrityError",
    "NodesError",
]


class NodesError(Exception):
    """Base of every error raised by :mod:`nodes`."""


class BaseModelError(NodesError):
    """The base model cannot be created, found or loaded."""


class AdapterError(NodesError):
    """An adapter is missing, malformed, or does not fit its base."""


class IntegrityError(AdapterError):
    """A file's content does not match its recorded sha256."""


class BuildError(NodesError):
    """A tree build step failed."""


class ExportError(NodesError):
    """A variant could not be exported."""


class EngineError(NodesError):
    """Generation failed for one request (the engine keeps serving others)."""
