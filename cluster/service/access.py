"""Who may use which node: public nodes for everyone, private nodes only for their owner.

Inference asks before every call, so answers are cached for a few seconds (the
registry is the source of truth; a node made private takes effect within the TTL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.errors import NodeNotVisible
from cluster.service.auth import Caller

__all__ = ["NodeAccess", "NodeVisibility"]


@dataclass(frozen=True)
class NodeVisibility:
    node: str
    visibility: str  # public | private
    owner: str | None  # the owning tenant of a private node

    def visible_to(self, caller: Caller) -> bool:
        return self.visibility == "public" or (caller.tenant is not None and caller.tenant == self.owner)


class NodeAccess:
    """``lookup(node_id)`` returns a NodeVisibility, or None when the registry has no such node."""

    def __init__(
        self,
        lookup: Callable[[str], NodeVisibility | None],
        *,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lookup = lookup
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[NodeVisibility | None, float]] = {}

    async def visibility(self, node: str) -> NodeVisibility | None:
        now = self._clock()
        hit = self._cache.get(node)
        if hit is not None and hit[1] > now:
            return hit[0]
        answer = await asyncio.to_thread(self._lookup, node)
        if len(self._cache) > 100_000:  # made-up ids must not grow the cache without bound
            self._cache.clear()
        self._cache[node] = (answer, now + self._ttl)
        return answer

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

    def known_public(self, node: str) -> bool:
        """True when the last answer for ``node`` said public (no lookup: for labels, on the event loop)."""
        hit = self._cache.get(node)
        return hit is not None and hit[0] is not None and hit[0].visibility == "public"
