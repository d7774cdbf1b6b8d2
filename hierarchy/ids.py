"""Node paths, node ids and levels: the tree's addressing scheme."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from hierarchy.clip import clip
from hierarchy.errors import InvalidNodePath

__all__ = [
    "MAX_NODE_ID_BYTES",
    "MAX_NODE_ID_SEGMENTS",
    "SEGMENT_PATTERN",
    "Level",
    "NodeId",
    "NodePath",
    "check_node_id_size",
]

# Lower-case ASCII, digits, '-' and '_'; must start with a letter or digit. Kept
# strict because paths become directory names, URLs and database keys.
SEGMENT_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
_SEGMENT_RE = re.compile(rf"^{SEGMENT_PATTERN}$")


class Level(enum.Enum):
    """Depth class of a node. Deeper levels must sit under shallower ones."""

    BASE = "base"
    LANGUAGE = "language"
    DOMAIN = "domain"
    SUBDOMAIN = "subdomain"

    @property
    def rank(self) -> int:
        return _LEVEL_RANK[self]

    @classmethod
    def parse(cls, value: str) -> Level:
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(level.value for level in cls)
            raise ValueError(f"unknown level {value!r} (expected one of: {names})") from None


_LEVEL_RANK = {Level.BASE: 0, Level.LANGUAGE: 1, Level.DOMAIN: 2, Level.SUBDOMAIN: 3}

# Bounds of a node id, checked before anything else looks at one (requests carry ids from anyone).
MAX_NODE_ID_BYTES = 256
# Levels only go deeper (base, language, domain, subdomain): the tree name plus three path segments.
MAX_NODE_ID_SEGMENTS = len(_LEVEL_RANK)


def check_node_id_size(text: str) -> None:
    """InvalidNodePath for an id over MAX_NODE_ID_BYTES or MAX_NODE_ID_SEGMENTS (the message quotes only its start)."""
    # Characters never outnumber UTF-8 bytes: a long string is refused without encoding it.
    if len(text) > MAX_NODE_ID_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_NODE_ID_BYTES:
        raise InvalidNodePath(f"node id {clip(text)} is longer than {MAX_NODE_ID_BYTES} bytes")
    if text.strip("/").count("/") + 1 > MAX_NODE_ID_SEGMENTS:
        raise InvalidNodePath(
            f"node id {clip(text)} has more than {MAX_NODE_ID_SEGMENTS} segments (tree/language/domain/subdomain)"
        )


@dataclass(frozen=True, order=True)
class NodePath:
    """A node's path below the base, e.g. ``en/medical/radiology``; ``""`` is the base."""

    value: str

    def __post_init__(self) -> None:
        if self.value == "":
            return
        for segment in self.value.split("/"):
            if not _SEGMENT_RE.match(segment):
                raise InvalidNodePath(
                    f"bad path {clip(self.value)}: segment {clip(segment)} must match {SEGMENT_PATTERN} "
                    "(lower-case letters, digits, '-', '_')"
                )

    @classmethod
    def root(cls) -> NodePath:
        return cls("")

    @property
    def is_root(self) -> bool:
        return self.value == ""

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.value.split("/")) if self.value else ()

    @property
    def depth(self) -> int:
        return len(self.segments)

    @property
    def name(self) -> str:
        return self.segments[-1] if self.segments else ""

    @property
    def parent(self) -> NodePath:
        if self.is_root:
            raise InvalidNodePath("the base has no parent")
        return NodePath("/".join(self.segments[:-1]))

    def ancestors(self) -> tuple[NodePath, ...]:
        """Paths from the first child of the base down to this node's parent."""
        segs = self.segments
        return tuple(NodePath("/".join(segs[:i])) for i in range(1, len(segs)))

    def lineage(self) -> tuple[NodePath, ...]:
        """Non-root paths from the top of the chain down to (and including) this node."""
        return (*self.ancestors(), self) if not self.is_root else ()

    def child(self, segment: str) -> NodePath:
        return NodePath(f"{self.value}/{segment}" if self.value else segment)

    def is_ancestor_of(self, other: NodePath) -> bool:
        if self.is_root:
            return not other.is_root
        return other.value.startswith(self.value + "/")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, order=True)
class NodeId:
    """A node's global id: ``<tree>/<path>``; the base of tree ``demo`` is just ``demo``."""

    tree: str
    path: NodePath

    def __post_init__(self) -> None:
        if not _SEGMENT_RE.match(self.tree):
            raise InvalidNodePath(f"bad tree name {clip(self.tree)}: must match {SEGMENT_PATTERN}")

    @classmethod
    def parse(cls, text: str) -> NodeId:
        text = str(text)
        check_node_id_size(text)
        text = text.strip().strip("/")
        if not text:
            raise InvalidNodePath("empty node id")
        tree, _, rest = text.partition("/")
        return cls(tree, NodePath(rest))

    @property
    def is_base(self) -> bool:
        return self.path.is_root

    @property
    def parent(self) -> NodeId:
        return NodeId(self.tree, self.path.parent)

    def __str__(self) -> str:
        return f"{self.tree}/{self.path}" if self.path.value else self.tree
