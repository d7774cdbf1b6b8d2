"""Tiered adapter cache: active in the bank, host memory (LRU by bytes), disk (the built tree).

    disk (tree dir) --load + sha256 check--> host LRU --activate--> bank (active)
                    <------ dropped -------          <-- evicted --

- **active**: adapters registered in the :class:`~nodes.runtime.bank.AdapterBank`, at
  most ``max_active``. Adapters of in-flight requests are *pinned* (ref-counted)
  and never evicted; evicting an unpinned one moves it to the host tier.
- **host**: prepared adapters not active, least-recently used first out once
  their bytes exceed ``host_bytes``. On CPU the two tiers share one RAM, so an
  adapter lives in exactly one of them (moved, never copied).
- **disk**: every load re-hashes the node's files against node.json before the
  weights are read (:func:`nodes.store.adapters.read_adapter` with ``expected_sha256``).
  Each load is timed (read, verify, lay out for the bank): the total, and p50/p99 over the
  last :data:`LOAD_WINDOW` loads, are in :class:`CacheStats`.

``acquire``/``release`` are called from the engine's model thread; ``stats`` may
be called from any thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from nodes.errors import CacheFull, IntegrityError
from nodes.runtime.bank import AdapterBank, PreparedAdapter, prepare_adapter
from nodes.store.adapters import read_adapter
from nodes.store.tree import BuiltNode

__all__ = ["LOAD_WINDOW", "AdapterCache", "CacheStats"]

LOAD_WINDOW = 1024  # the most recent disk loads whose durations the percentiles cover


@dataclass(frozen=True)
class CacheStats:
    """Counters and sizes of the adapter cache (read by Admin.Status and Prometheus)."""

    active: int  # adapters in the bank
    active_limit: int
    active_bytes: int
    host: int  # adapters in host memory, not active
    host_bytes: int
    host_bytes_limit: int
    pinned: int  # active adapters used by in-flight requests
    loads: int  # disk -> host (each verified against node.json)
    integrity_failures: int  # loads refused because a file's sha256 changed
    hits_active: int  # already active when a request needed it
    hits_host: int  # promoted from host memory without touching disk
    evictions_active: int  # bank -> host
    evictions_host: int  # host -> dropped (disk only)
    load_seconds: float = 0.0  # summed over every load: read + sha256 check + layout for the bank
    load_p50_s: float = 0.0  # median duration of the last LOAD_WINDOW loads (0.0 before the first)
    load_p99_s: float = 0.0  # 99th percentile (nearest rank) of the same loads

    def as_dict(self) -> dict[str, int | float]:
        return dict(self.__dict__)


def _nearest_rank(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of ``ordered`` (ascending) by nearest rank; 0.0 when empty."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class AdapterCache:
    """Moves node adapters between disk, host memory and the bank; pins what requests use."""

    def __init__(self, bank: AdapterBank, *, max_active: int, host_bytes: int):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if host_bytes < 0:
            raise ValueError(f"host_bytes must be >= 0, got {host_bytes}")
        self._bank = bank
        self._shapes = bank.shapes
        self.max_active = max_active
        self.host_bytes_limit = host_bytes
        self._lock = threading.Lock()
        self._active: OrderedDict[str, PreparedAdapter] = OrderedDict()  # LRU order, most recent last
        self._host: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._counts = dict.fromkeys(
            ("loads", "integrity_failures", "hits_active", "hits_host", "evictions_active", "evictions_host"), 0
        )
        self._load_seconds = 0.0
        self._recent_loads: deque[float] = deque(maxlen=LOAD_WINDOW)  # seconds, oldest first

    # -- the engine's side ---------------------------------------------------
    def acquire(self, chain: Sequence[BuiltNode]) -> tuple[str, ...]:
        """Make every adapter of ``chain`` active and pin it; return their keys, top first.

        Raises :class:`CacheFull` when the bank has no room that is not pinned,
        and IntegrityError/AdapterError when an adapter cannot be loaded; in
        both cases nothing is pinned.
        """
        keys = tuple(node.cache_key for node in chain)
        with self._lock:
            missing = [k for k in keys if k not in self._active]
            evictable = sum(1 for k in self._active if not self._pins.get(k) and k not in keys)
            if len(missing) > self.max_active - len(self._active) + evictable:
                raise CacheFull(f"{len(missing)} adapters needed, all {self.max_active} active slots are pinned")
            self._counts["hits_active"] += len(keys) - len(missing)
        for node, key in zip(chain, keys, strict=False):
            if key in missing:
                self._activate(node, key, protect=keys)
        with self._lock:
            for key in keys:
                self._pins[key] = self._pins.get(key, 0) + 1
                self._active.move_to_end(key)
        return keys

    def release(self, keys: Sequence[str]) -> None:
        """Unpin adapters acquired for a request that has finished."""
        with self._lock:
            for key in keys:
                left = self._pins.get(key, 0) - 1
                if left > 0:
                    self._pins[key] = left
                else:
                    self._pins.pop(key, None)

    def _activate(self, node: BuiltNode, key: str, protect: tuple[str, ...]) -> None:
        with self._lock:
            adapter = self._host.pop(key, None)
            if adapter is not None:
                self._counts["hits_host"] += 1
        if adapter is None:
            adapter = self._load(node, key)  # disk I/O outside the lock
        with self._lock:
            while len(self._active) >= self.max_active:
                self._evict_one_active(protect)
            self._bank.add(adapter)
            self._active[key] = adapter

    def _load(self, node: BuiltNode, key: str) -> PreparedAdapter:
        started = time.perf_counter()
        try:
            weights = read_adapter(node.directory, expected_sha256=node.sha256, dtype=self._bank.dtype)
        except IntegrityError:
            with self._lock:
                self._counts["integrity_failures"] += 1
            raise
        adapter = prepare_adapter(key, weights, self._shapes, self._bank.dtype)
        seconds = time.perf_counter() - started
        with self._lock:
            self._counts["loads"] += 1
            self._load_seconds += seconds
            self._recent_loads.append(seconds)
        return adapter

    def _evict_one_active(self, protect: tuple[str, ...]) -> None:  # caller holds the lock
        for key in self._active:  # least recently used first
            if not self._pins.get(key) and key not in protect:
                adapter = self._active.pop(key)
                self._bank.remove(key)
                self._counts["evictions_active"] += 1
                self._host[key] = adapter
                self._shrink_host()
                return
        raise CacheFull(f"all {self.max_active} active adapters are pinned")

    def _shrink_host(self) -> None:  # caller holds the lock
        total = sum(a.nbytes for a in self._host.values())
        while self._host and total > self.host_bytes_limit:
            _, dropped = self._host.popitem(last=False)
            total -= dropped.nbytes
            self._counts["evictions_host"] += 1

    # -- observers -----------------------------------------------------------
    def tier_of(self, key: str) -> str:
        """ "active", "host" or "disk"."""
        with self._lock:
            return "active" if key in self._active else "host" if key in self._host else "disk"

    def pinned(self, key: str) -> int:
        with self._lock:
            return self._pins.get(key, 0)

    def stats(self) -> CacheStats:
        with self._lock:
            recent = sorted(self._recent_loads)
            return CacheStats(
                active=len(self._active),
                active_limit=self.max_active,
                active_bytes=sum(a.nbytes for a in self._active.values()),
                host=len(self._host),
                host_bytes=sum(a.nbytes for a in self._host.values()),
                host_bytes_limit=self.host_bytes_limit,
                pinned=len(self._pins),
                **self._counts,
                load_seconds=self._load_seconds,
                load_p50_s=_nearest_rank(recent, 0.5),
                load_p99_s=_nearest_rank(recent, 0.99),
            )
