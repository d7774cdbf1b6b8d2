"""The inputs of matching: a task, a hardware profile, a request, and candidate rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hierarchy.errors import InvalidNodePath
from hierarchy.ids import NodePath
from registry.errors import InvalidHardware, InvalidInput, InvalidTask
from registry.memory import DEFAULT_CONTEXT, DEFAULT_DTYPE, DEVICES, DTYPE_BYTES
from registry.records import BaseFacts, VariantFacts, normalise_label

__all__ = ["DEFAULT_CONTEXT", "CandidateRow", "Hardware", "MatchRequest", "TaskQuery"]

ATTRIBUTES = ("language", "domain", "subdomain")


@dataclass(frozen=True)
class TaskQuery:
    """What the user works on: a node path (``en/medical/radiology``) or attributes, plus optional tags."""

    path: str | None = None
    language: str | None = None
    domain: str | None = None
    subdomain: str | None = None
    tags: tuple[str, ...] = ()
    tree: str | None = None  # restrict to one tree

    def __post_init__(self) -> None:
        if self.path is not None:
            text = str(self.path).strip().strip("/")
            if not text:
                raise InvalidTask("task path is empty: give e.g. en/medical/radiology", field="task")
            try:
                NodePath(text)
            except InvalidNodePath as exc:
                raise InvalidTask(f"task {self.path!r} is not a node path: {exc}", field="task") from None
            object.__setattr__(self, "path", text)
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _label(value, name))
        object.__setattr__(self, "tags", tuple(dict.fromkeys(_label(t, "tag") for t in self.tags)))
        if self.path is not None and self.has_attributes:
            raise InvalidTask(
                "give the task as a path (--task) or as attributes (--language/--domain/--subdomain), not both",
                field="task",
            )
        if self.path is None and not self.has_attributes and not self.tags:
            raise InvalidTask(
                "no task: give --task en/medical/radiology, or --language/--domain/--subdomain/--tag", field="task"
            )

    @classmethod
    def parse(cls, text: str, *, tags: tuple[str, ...] = (), tree: str | None = None) -> TaskQuery:
        """``en/medical/radiology`` (a path) or ``language=en,domain=medical`` (attributes)."""
        if "=" not in text:
            return cls(path=text, tags=tags, tree=tree)
        values: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in (*ATTRIBUTES, "tag"):
                raise InvalidTask(
                    f"task {text!r}: {part.strip()!r} is not language=, domain=, subdomain= or tag=", field="task"
                )
            if key == "tag":
                tags = (*tags, value)
            else:
                values[key] = value
        return cls(tags=tags, tree=tree, **values)

    @property
    def attributes(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((name, getattr(self, name)) for name in ATTRIBUTES)

    @property
    def has_attributes(self) -> bool:
        return any(v is not None for _, v in self.attributes)

    def path_attributes(self) -> TaskQuery | None:
        """A path task read as attributes (language, domain, sub-domain by position), when it can be.

        ``en/medical/radiology`` also asks for language=en, domain=medical, subdomain=radiology,
        so it finds a node declared with those attributes whatever its path (``en/med/radio``).
        """
        if self.path is None:
            return None
        segments = self.path.split("/")
        if len(segments) > len(ATTRIBUTES):
            return None
        try:
            return TaskQuery(tags=self.tags, tree=self.tree, **dict(zip(ATTRIBUTES, segments, strict=False)))
        except InvalidTask:
            return None

    def describe(self) -> str:
        parts = [self.path] if self.path else [f"{k}={v}" for k, v in self.attributes if v is not None]
        if self.tags:
            parts.append("tags=" + "+".join(self.tags))
        text = ",".join(p for p in parts if p)
        return f"{self.tree}:{text}" if self.tree else text

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, **dict(self.attributes), "tags": list(self.tags), "tree": self.tree}


def _label(value: str, name: str) -> str:
    try:
        return normalise_label(value, name)
    except InvalidInput as exc:
        raise InvalidTask(str(exc), field=name) from None


@dataclass(frozen=True)
class Hardware:
    """A device profile: kind, memory in bytes, optional bandwidth (bytes/s) and compute (FLOP/s)."""

    device: str
    memory: int
    bandwidth: float | None = None
    compute: float | None = None
    dtype: str | None = None  # serving dtype; default per device (fp32 on cpu, fp16 on cuda/mps)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise InvalidHardware(f"device {self.device!r} is not one of {', '.join(DEVICES)}", field="device")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory <= 0:
            raise InvalidHardware(f"memory must be a positive number of bytes, got {self.memory!r}", field="memory")
        for name in ("bandwidth", "compute"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidHardware(f"{name} must be positive, got {value!r}", field=name)
        if self.dtype is not None and self.dtype not in DTYPE_BYTES:
            raise InvalidHardware(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}", field="dtype")

    @property
    def serving_dtype(self) -> str:
        return self.dtype or DEFAULT_DTYPE[self.device]


@dataclass(frozen=True)
class MatchRequest:
    """A task on a device. ``context`` None: not asked for, so each model gets the smaller of
    :data:`DEFAULT_CONTEXT` and its own limit; an explicit context rules out models it exceeds."""

    task: TaskQuery
    hardware: Hardware
    context: int | None = None
    batch: int = 1
    tenant: str | None = None
    top: int = 5

    def __post_init__(self) -> None:
        for name in ("context", "batch", "top"):
            value = getattr(self, name)
            if name == "context" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"{name} must be a positive integer, got {value!r}", field=name)

    def context_for(self, max_context: int) -> int:
        """The context estimated for a model whose limit is ``max_context``."""
        return self.context if self.context is not None else min(DEFAULT_CONTEXT, max_context)

    def exceeds(self, max_context: int) -> bool:
        """Whether an explicitly asked context is longer than the model allows."""
        return self.context is not None and self.context > max_context


@dataclass(frozen=True)
class CandidateRow:
    """One node with its stable version and one of that version's variants, as the query returns it.

    ``version``/``variant`` are None when the node has no usable stable version;
    such rows only explain why a node was skipped.
    """

    node_id: str
    tree: str
    path: str
    level: str
    language: str | None
    domain: str | None
    subdomain: str | None
    visibility: str
    owner: str | None
    base: BaseFacts
    tags: tuple[str, ...] = ()
    version: int | None = None
    version_status: str | None = None
    parent_version: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    variant: VariantFacts | None = None
    endpoint: str | None = None  # an active deployment serving the node

    @property
    def depth(self) -> int:
        return len(self.path.split("/")) if self.path else 0
