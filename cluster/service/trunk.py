"""A trunk: one base model and the engine serving every node of its tree, seen from the server.

The server talks to trunks only through :class:`Trunk`, so the Ray application can
later put a remote trunk behind the same shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from nodes.errors import NodesError
from nodes.runtime.engine import Engine
from nodes.runtime.requests import GenerationRequest, GenerationResult, TokenChunk

__all__ = ["CacheSnapshot", "EngineTrunk", "Trunk", "TrunkSnapshot", "TrunkView"]


@dataclass(frozen=True)
class CacheSnapshot:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    active: int = 0  # adapters in the engine's bank
    host: int = 0  # adapters in the host-memory tier
    host_bytes: int = 0


@dataclass(frozen=True)
class TrunkSnapshot:
    """What a trunk is doing now (Admin.Status and the metrics read this)."""

    tree: str
    base_digest: str
    loaded_adapters: tuple[str, ...]  # node ids whose adapters are resident
    queue_depth: int
    running: int
    max_batch: int
    cache: CacheSnapshot


class Trunk(Protocol):
    """What the servicers need from a trunk."""

    @property
    def tree(self) -> str: ...

    @property
    def base_digest(self) -> str: ...

    def serves(self, node: str) -> bool: ...

    def served_version(self, node: str) -> int | None:
        """The version of ``node`` served now (0: the base); None when this trunk cannot tell cheaply."""
        ...

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]: ...

    def snapshot(self) -> TrunkSnapshot: ...

    async def close(self) -> None: ...


class TrunkView:
    """A trunk seen through a wrapper (a tenant's limits, response recording): delegates everything;
    subclasses override what they add to."""

    def __init__(self, trunk: Trunk):
        self.trunk = trunk

    @property
    def tree(self) -> str:
        return self.trunk.tree

    @property
    def base_digest(self) -> str:
        return self.trunk.base_digest

    def serves(self, node: str) -> bool:
        return self.trunk.serves(node)

    def served_version(self, node: str) -> int | None:
        return self.trunk.served_version(node)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.trunk.generate(request)

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        return self.trunk.stream(request)

    def snapshot(self) -> TrunkSnapshot:
        return self.trunk.snapshot()

    async def close(self) -> None:
        await self.trunk.close()


class EngineTrunk:
    """A trunk served by an in-process :class:`nodes.runtime.engine.Engine`.

    It serves what the engine's tree serves now: a node a fine-tuning job added (or one an
    operator retired) counts from the snapshot switch on."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._ids_of: tuple[object, frozenset[str]] = (None, frozenset())  # (tree, its node ids)

    def _ids(self) -> frozenset[str]:
        tree = self.engine.tree  # one reference read: the tree served now
        seen, ids = self._ids_of
        if seen is not tree:
            ids = frozenset(str(n.node_id) for n in tree.nodes)
            self._ids_of = (tree, ids)
        return ids

    @property
    def tree(self) -> str:
        return self.engine.tree.name

    @property
    def base_digest(self) -> str:
        return self.engine.tree.base_digest

    def serves(self, node: str) -> bool:
        if node == self.tree or node in self._ids():
            return True
        # A node the registry knows (the access check came first) but not this tree: a snapshot
        # another process wrote may serve it (one stat when nothing changed).
        return self.engine.refresh() and node in self._ids()

    def served_version(self, node: str) -> int | None:
        self.engine.refresh()  # one stat: a snapshot another process wrote counts from now
        try:
            chain = self.engine.tree.chain(node)
        except NodesError:  # not in the snapshot served now: the request itself will say so
            return None
        return chain[-1].version if chain else 0

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.engine.generate(request)

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        return self.engine.stream(request)

    def snapshot(self) -> TrunkSnapshot:
        stats = self.engine.stats()
        c = stats.cache
        cache = self.engine.cache
        # Keys from the tree served now: a snapshot names each stored version by its own key.
        loaded = tuple(str(n.node_id) for n in self.engine.tree.nodes if cache.tier_of(n.cache_key) == "active")
        return TrunkSnapshot(
            tree=self.tree,
            base_digest=self.engine.tree.base_digest,
            loaded_adapters=loaded,
            queue_depth=stats.queue_depth,
            running=stats.active_requests,
            max_batch=stats.max_batch_size,
            cache=CacheSnapshot(
                hits=c.hits_active + c.hits_host,
                misses=c.loads + c.integrity_failures,  # every miss goes to disk
                loads=c.loads,
                evictions=c.evictions_active + c.evictions_host,
                active=c.active,
                host=c.host,
                host_bytes=c.host_bytes,
            ),
        )

    async def close(self) -> None:
        await self.engine.aclose()
