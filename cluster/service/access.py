"""Who may use which node: public nodes for everyone, private nodes only for their owner.

Inference asks before every call, so answers are cached for a few seconds (the
registry is the source of truth; a node made private takes effect within the TTL). "No such
node" is cached for at most ``negative_ttl_s`` (1 s): a node a fine-tuning job just made
answers within a second of its registration.
The cache is bounded in entries and in the bytes of the ids it keeps (least recently
used go first), and ids over the node-id bounds never reach it or the registry.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cluster.errors import BadArgument, NodeNotVisible
from cluster.service.auth import Caller
from hierarchy.errors import InvalidNodePath
from hierarchy.ids import check_node_id_size

__all__ = ["NodeAccess", "NodeVisibility"]


@dataclass(frozen=True)
class NodeVisibility:
    node: str
    visibility: str  # public | private
    owner: str | None  # the owning tenant of a private node

    def visible_to(self, caller: Caller) -> bool:
        return self.visibility == "public" or (caller.tenant is not None and caller.tenant == self.owner)


def _check_size(node: str, field: str) -> None:
    try:
        check_node_id_size(node)
    except InvalidNodePath as exc:
        raise BadArgument(field, str(exc)) from None


class NodeAccess:
    """``lookup(node_id)`` returns a NodeVisibility, or None when the registry has no such node."""

    def __init__(
        self,
        lookup: Callable[[str], NodeVisibility | None],
        *,
        ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        max_entries: int = 10_000,
        max_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lookup = lookup
        self._ttl = ttl_s
        self._negative_ttl = min(ttl_s, negative_ttl_s)
        self._max_entries = max_entries
        self._max_bytes = max_bytes  # the ids' bytes: made-up ids must not grow the cache without bound
        self._clock = clock
        self._cache: OrderedDict[str, tuple[NodeVisibility | None, float]] = OrderedDict()
        self._bytes = 0

    @property
    def cached(self) -> tuple[int, int]:
        """(entries, bytes of their ids) held now."""
        return len(self._cache), self._bytes

    async def visibility(self, node: str, field: str = "node") -> NodeVisibility | None:
        """BadArgument naming ``field`` for an id over the bounds (before the cache or the registry)."""
        _check_size(node, field)
        now = self._clock()
        hit = self._cache.get(node)
        if hit is not None and hit[1] > now:
            self._cache.move_to_end(node)
            return hit[0]
        answer = await asyncio.to_thread(self._lookup, node)
        self._store(node, answer, now + (self._ttl if answer is not None else self._negative_ttl))
        return answer

    def _store(self, node: str, answer: NodeVisibility | None, expires: float) -> None:
        if node in self._cache:
            self._bytes -= len(node)
            del self._cache[node]
        self._cache[node] = (answer, expires)
        self._bytes += len(node)
        now = self._clock()
        while self._cache and (len(self._cache) > self._max_entries or self._bytes > self._max_bytes):
            old, _ = self._cache.popitem(last=False)
            self._bytes -= len(old)
        # Expired entries at the old end go too, so an idle cache does not keep what a burst left.
        while self._cache:
            old, (_, old_expires) = next(iter(self._cache.items()))
            if old_expires > now:
                break
            del self._cache[old]
            self._bytes -= len(old)

    async def check(self, node: str, caller: Caller) -> NodeVisibility:
        """The node's visibility if ``caller`` may use it; NodeNotVisible (same message) otherwise."""
        answer = await self.visibility(node)
        if answer is None or not answer.visible_to(caller):
            raise NodeNotVisible(node)
        return answer

    async def visible(self, node: str, caller: Caller) -> bool:
        answer = await self.visibility(node)
        return answer is not None and answer.visible_to(caller)

    def forget(self) -> None:
        self._cache.clear()
        self._bytes = 0

    def known_public(self, node: str) -> bool:
        """True when the last answer for ``node`` said public (no lookup: for labels, on the event loop)."""
        hit = self._cache.get(node)
        return hit is not None and hit[0] is not None and hit[0].visibility == "public"
