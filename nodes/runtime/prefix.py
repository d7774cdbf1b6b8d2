"""Prompt-prefix KV reuse, keyed by the exact chain of adapter versions and the exact tokens.

After a prompt is prefilled, the keys and values of its longest block-aligned prefix (at least
one token short of the prompt, so a reuse always computes the logits of its own last token)
are kept, indexed under every block boundary it covers: a later prompt that starts with the
same blocks, for the same chain, reuses the longest of them and prefills only the rest. The
key holds every adapter of the chain with its version and file digests (and the base), so a
prefix computed under ``en/medical@2`` is never reused for ``@3`` or for a sibling. The stored
tokens are compared on every hit (a hash collision cannot serve a wrong prefix). Entries are
evicted least recently used past ``max_bytes``. Model thread only: no locking.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["PrefixCache", "PrefixHit", "PrefixStats", "chain_key"]


def chain_key(base_digest: str, chain: Sequence[object]) -> str:
    """What a cached prefix was computed under: the base and each adapter's key, version and files."""
    parts = [base_digest]
    for node in chain:
        files = sorted(dict(getattr(node, "sha256", {}) or {}).items())
        parts.append(f"{getattr(node, 'cache_key', node)}@{getattr(node, 'version', '')}:{files}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class _Entry:
    chain: str
    tokens: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer [1, kv_heads, P, head_dim]
    values: list[torch.Tensor]
    nbytes: int
    index: list[tuple[str, bytes]] = field(default_factory=list)  # the boundary keys that point here


@dataclass(frozen=True)
class PrefixHit:
    """The reusable first ``length`` tokens' keys and values (views; never written to)."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass(frozen=True)
class PrefixStats:
    hits: int
    misses: int
    tokens_reused: int
    entries: int
    bytes: int
    max_bytes: int
    evictions: int


class PrefixCache:
    """LRU of prefix KV entries, bounded by bytes (see the module docstring)."""

    def __init__(self, max_bytes: int, block: int = 32):
        self.max_bytes = max_bytes
        self.block = block
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._index: dict[tuple[str, bytes], int] = {}
        self._next = 0
        self._bytes = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _boundaries(self, tokens: Sequence[int]) -> list[tuple[int, bytes]]:
        """(length, digest of tokens[:length]) at every block boundary short of the last token."""
        out = []
        digest = hashlib.blake2b(digest_size=16)
        usable = (len(tokens) - 1) // self.block * self.block
        for end in range(self.block, usable + 1, self.block):
            digest.update(torch.tensor(tokens[end - self.block : end], dtype=torch.int64).numpy().tobytes())
            out.append((end, digest.copy().digest()))
        return out

    def lookup(self, chain: str, tokens: Sequence[int]) -> PrefixHit | None:
        if not self.enabled:
            return None
        for length, digest in reversed(self._boundaries(tokens)):
            slot = self._index.get((chain, digest))
            entry = self._entries.get(slot) if slot is not None else None
            if entry is None or entry.chain != chain or entry.tokens[:length] != tuple(tokens[:length]):
                continue
            self._entries.move_to_end(slot)  # type: ignore[arg-type]
            self.hits += 1
            self.tokens_reused += length
            return PrefixHit(length, [k[:, :, :length] for k in entry.keys], [v[:, :, :length] for v in entry.values])
        self.misses += 1
        return None

    def wants(self, tokens: Sequence[int]) -> bool:
        """Whether a prompt this long has a block to keep."""
        return self.enabled and (len(tokens) - 1) // self.block >= 1

    def store(self, chain: str, tokens: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the block-aligned prefix of a prefilled prompt; ``keys``/``values`` cover at least it."""
        bounds = self._boundaries(tokens)
        if not self.enabled or not bounds:
            return
        length, last = bounds[-1]
        held = self._index.get((chain, last))
        if held is not None and held in self._entries and self._entries[held].tokens == tuple(tokens[:length]):
            self._entries.move_to_end(held)
            return
        # Own copies: the views would pin the whole batch's cache tensors.
        k = [t[:, :, :length].clone() for t in keys]
        v = [t[:, :, :length].clone() for t in values]
        nbytes = sum(t.numel() * t.element_size() for t in (*k, *v))
        if nbytes > self.max_bytes:
            return
        slot, self._next = self._next, self._next + 1
        entry = _Entry(chain, tuple(tokens[:length]), k, v, nbytes)
        for _, digest in bounds:
            self._index[(chain, digest)] = slot  # the newest entry answers for every boundary it covers
            entry.index.append((chain, digest))
        self._entries[slot] = entry
        self._bytes += nbytes
        while self._bytes > self.max_bytes and self._entries:
            old_slot, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.evictions += 1
            for key in old.index:
                if self._index.get(key) == old_slot:
                    del self._index[key]

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self._bytes = 0

    def stats(self) -> PrefixStats:
        return PrefixStats(
            self.hits, self.misses, self.tokens_reused, len(self._entries), self._bytes, self.max_bytes, self.evictions
        )
