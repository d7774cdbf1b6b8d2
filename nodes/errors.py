"""Errors raised by the model runtime.

NodesError (PicklableError: every error survives pickle and a Ray call with its fields)
├── BaseModelError        a base that cannot be made, found or loaded
├── AdapterError          an adapter dir that is missing, malformed or does not fit the base
│   └── IntegrityError    a file whose sha256 differs from the recorded one
├── BuildError            a tree build step that failed (bad data, forgetting bound, ...)
├── GateTextMissing       a text the evaluation gate needs cannot be found
├── ExportError           an export that cannot be produced
├── EngineConfigError     an EngineConfig value out of range (the message names the field)
├── CacheFull             every adapter slot is pinned by in-flight requests (internal: retried)
└── EngineError           one request failed; the engine keeps serving others
    ├── UnknownNode       the node id is not in the served tree
    ├── InvalidRequest    a bad parameter; ``field`` names it
    ├── QueueFull         admission queue over its bound (retry after ``retry_after_s``)
    │   └── TenantOverLimit   ... this tenant's own share of it (refused before other tenants are)
    ├── DeadlineExceeded  the request's deadline passed
    ├── RequestCancelled  the caller cancelled (e.g. client disconnect)
    └── EngineClosed      the engine is shutting down or stopped
"""

from __future__ import annotations

from hierarchy.errors import PicklableError

__all__ = [
    "AdapterError",
    "BaseModelError",
    "BuildError",
    "CacheFull",
    "DeadlineExceeded",
    "EngineClosed",
    "EngineConfigError",
    "EngineError",
    "ExportError",
    "GateTextMissing",
    "IntegrityError",
    "InvalidRequest",
    "NodesError",
    "QueueFull",
    "RequestCancelled",
    "TenantOverLimit",
    "UnknownNode",
]


class NodesError(PicklableError):
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


class UnknownNode(EngineError):
    """The requested node id is not part of the tree this engine serves."""


class InvalidRequest(EngineError, ValueError):
    """A request parameter is out of range; ``field`` names it (e.g. ``params.top_p``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class QueueFull(EngineError):
    """The admission queue is at its bound; the caller should back off and retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        super().__init__(message)


class TenantOverLimit(QueueFull):
    """The caller's tenant is over its own limit (queued requests, tokens per minute); others are not."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it finished."""


class RequestCancelled(EngineError):
    """The request was cancelled by its caller."""


class EngineClosed(EngineError):
    """The engine is shutting down or stopped and accepts no new requests."""


class EngineConfigError(NodesError, ValueError):
    """An EngineConfig value is out of range; the message names the field."""


class CacheFull(NodesError):
    """Every active slot is pinned by in-flight requests; try again after one finishes (internal)."""


class GateTextMissing(NodesError):
    """A text the gate needs (a probe, the held-out text, the canary) cannot be found or changed."""
