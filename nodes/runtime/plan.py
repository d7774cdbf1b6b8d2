"""Per-forward batch metadata for the adapter bank: which rows each adapter touches.

A forward pass sees ``N = num_seqs * tokens_per_seq`` rows (one token each).
Each sequence has a *chain* of adapter keys (top first; empty for the base).
For every adapted linear layer the rows are grouped by adapter, so an adapter
shared by many sequences (a language node under 8 sub-domains) is applied
once, to all of its rows, with one gather and two small matmuls.

Adapters of the same rank and a similar row count are stacked into one
*bucket* and computed with two ``bmm`` calls. Each bucket has its own exact
rank (no padding of ranks); row counts are rounded up to a power of two inside
a bucket, and the padding rows read an all-zero row, so they add exact zeros.

The engine keeps its rows sorted by chain, which makes every adapter's rows
one contiguous range (rows sharing an ancestor share a chain prefix). Then no
gather is needed at all: slices and views of ``x`` and ``y``. Rows in any other
order still work through gather/scatter buckets.

Bucket kinds (see :class:`RowBucket`):

- ``FULL``: one adapter over every row: ``y += (x @ A^T) @ (sB)^T``.
- ``SLICE``: one adapter over the contiguous rows ``start:stop``: the same on slices.

  FULL and SLICE buckets over the same rows (a chain whose every element covers exactly those
  rows: one stream, or every row on one node) are fused by :func:`fuse_ranges` into one
  bucket of several keys whose factors are concatenated along rank: ``x @ [A_1; A_2]^T`` then
  ``@ [s_1 B_1, s_2 B_2]^T`` is the sum of the chain's terms in two matmuls, not two per element.
- ``RUN``: G >= 2 adapters with ``cap`` contiguous rows each, side by side:
  ``y[start:stop].view(G, cap, out).baddbmm_(bmm(x[start:stop].view(G, cap, in), A), B)``.
- ``SUBSET``: one adapter over scattered rows: gather, two matmuls, ``index_add``.
- ``STACKED``: G >= 2 adapters over scattered rows, ``cap`` rows each (padded
  to a power of two): gather into [G, cap, in], two ``bmm``, ``index_add`` back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["BankBatch", "BucketKind", "LayerBatch", "RowBucket", "StackedWeights", "fuse_ranges", "plan_buckets"]


class BucketKind(enum.Enum):
    FULL = "full"
    SLICE = "slice"
    RUN = "run"
    SUBSET = "subset"
    STACKED = "stacked"


@dataclass(frozen=True)
class RowBucket:
    """Adapters of one rank that are computed together, and the rows they touch."""

    kind: BucketKind
    keys: tuple[str, ...]  # G adapter keys, in stacking order
    rank: int  # r of every adapter in the bucket at this layer (a fused FULL/SLICE bucket: the sum of its ranks)
    capacity: int  # rows per adapter (after padding); N for FULL
    src_rows: torch.Tensor | None = None  # SUBSET/STACKED: [G * capacity] int64 rows of x to gather (N = the zero row)
    dst_rows: torch.Tensor | None = None  # SUBSET/STACKED: [G * capacity] int64 rows of y to add into (padding -> 0)
    needs_zero_row: bool = False  # some src_rows entries point at row N (padding)
    start: int = 0  # FULL/SLICE/RUN: first row
    stop: int = 0  # FULL/SLICE/RUN: one past the last row (G * capacity rows for RUN)


@dataclass(frozen=True)
class StackedWeights:
    """One bucket's factors at one layer, laid out for the matmuls."""

    bucket: RowBucket
    a: torch.Tensor  # FULL/SLICE/SUBSET: [in, r]; RUN/STACKED: [G, in, r]   (A transposed; fused: r = sum of ranks)
    b: torch.Tensor  # FULL/SLICE/SUBSET: [r, out]; RUN/STACKED: [G, r, out] (scale * B, transposed)


@dataclass(frozen=True)
class LayerBatch:
    """Everything one adapted linear layer needs for one forward."""

    weights: tuple[StackedWeights, ...]
    needs_zero_row: bool  # some bucket gathers padding rows: x gets an extra all-zero row N


@dataclass(frozen=True)
class BankBatch:
    """The bank's metadata for one forward pass (built once per batch composition).

    Rows are ordered sequence-major: row ``s * tokens_per_seq + t`` is token
    ``t`` of sequence ``s``, which is how ``x.reshape(-1, in)`` lays out a
    ``[num_seqs, tokens_per_seq, in]`` activation.
    """

    chains: tuple[tuple[str, ...], ...]  # per sequence: adapter keys, top of the chain first
    tokens_per_seq: int
    layers: Mapping[str, LayerBatch] = field(repr=False)  # layer name -> its buckets; absent = no adapter rows

    @property
    def num_seqs(self) -> int:
        return len(self.chains)

    @property
    def num_rows(self) -> int:
        return len(self.chains) * self.tokens_per_seq

    @property
    def adapter_keys(self) -> frozenset[str]:
        return frozenset(k for chain in self.chains for k in chain)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _expand(seqs: Sequence[int], tokens_per_seq: int) -> list[int]:
    return [s * tokens_per_seq + t for s in seqs for t in range(tokens_per_seq)]


def plan_buckets(
    users: Mapping[str, Sequence[int]],
    ranks: Mapping[str, int],
    num_seqs: int,
    tokens_per_seq: int,
) -> tuple[tuple[RowBucket, ...], bool]:
    """Group the adapters of one layer into buckets.

    ``users`` maps each adapter key to the (sorted) sequences whose chain holds
    it; ``ranks`` gives its rank at this layer. Returns the buckets and whether
    any of them reads the zero padding row.
    """
    n_rows = num_seqs * tokens_per_seq
    buckets: list[RowBucket] = []
    any_pad = False
    by_rank: dict[int, list[str]] = {}
    for key in sorted(users):
        by_rank.setdefault(ranks[key], []).append(key)
    for rank, keys in sorted(by_rank.items()):
        contiguous = [k for k in keys if _is_range(users[k])]
        scattered = [k for k in keys if not _is_range(users[k])]
        pieces = _contiguous_pieces(contiguous, users, rank, num_seqs, tokens_per_seq)
        # Slices cost ~2 kernel calls each; one gathered bucket ~4: keep whichever does fewer calls.
        classes = {_next_pow2(len(users[k])) for k in contiguous}
        if len(pieces) > 2 * len(classes) + 1:
            scattered, pieces = keys, []
        buckets += pieces
        gathered, pad = _gathered(scattered, users, rank, n_rows, tokens_per_seq)
        buckets += gathered
        any_pad = any_pad or pad
    return tuple(buckets), any_pad


def fuse_ranges(buckets: Sequence[RowBucket]) -> tuple[RowBucket, ...]:
    """FULL/SLICE buckets over the same rows (of any ranks) as one bucket each, factors concatenated."""
    ranges: dict[tuple[int, int], list[RowBucket]] = {}
    others: list[RowBucket] = []
    for bucket in buckets:
        if bucket.kind in (BucketKind.FULL, BucketKind.SLICE):
            ranges.setdefault((bucket.start, bucket.stop), []).append(bucket)
        else:
            others.append(bucket)
    fused = [
        group[0]
        if len(group) == 1
        else RowBucket(
            group[0].kind,
            tuple(k for b in group for k in b.keys),
            sum(b.rank for b in group),
            group[0].capacity,
            start=group[0].start,
            stop=group[0].stop,
        )
        for group in ranges.values()
    ]
    return (*fused, *others)


def _is_range(seqs: Sequence[int]) -> bool:
    return seqs[-1] - seqs[0] + 1 == len(seqs)


def _contiguous_pieces(keys, users, rank: int, num_seqs: int, tokens_per_seq: int) -> list[RowBucket]:
    """FULL/SLICE/RUN buckets for adapters whose sequences form one range each."""
    pieces: list[RowBucket] = []
    by_count: dict[int, list[str]] = {}
    for key in keys:
        by_count.setdefault(len(users[key]), []).append(key)
    for count, group in sorted(by_count.items()):
        group.sort(key=lambda k: users[k][0])
        run: list[str] = []
        for key in [*group, None]:
            if key is not None and run and users[key][0] == users[run[-1]][0] + count:
                run.append(key)
                continue
            if run:
                start, stop = users[run[0]][0] * tokens_per_seq, (users[run[-1]][0] + count) * tokens_per_seq
                if len(run) > 1:
                    kind = BucketKind.RUN
                else:
                    kind = BucketKind.FULL if count == num_seqs else BucketKind.SLICE
                pieces.append(RowBucket(kind, tuple(run), rank, count * tokens_per_seq, start=start, stop=stop))
            run = [key] if key is not None else []
    return pieces


def _gathered(keys, users, rank: int, n_rows: int, tokens_per_seq: int) -> tuple[list[RowBucket], bool]:
    """SUBSET/STACKED buckets: rows are gathered, padded to a power of two per adapter, scattered back."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(_next_pow2(len(users[key])), []).append(key)
    buckets: list[RowBucket] = []
    any_pad = False
    for cap, group in sorted(groups.items()):
        if len(group) == 1:
            rows = torch.tensor(_expand(users[group[0]], tokens_per_seq), dtype=torch.long)
            buckets.append(RowBucket(BucketKind.SUBSET, (group[0],), rank, len(rows), rows, rows))
            continue
        src: list[int] = []
        dst: list[int] = []
        pad = False
        for key in group:
            seqs = list(users[key])
            missing = (cap - len(seqs)) * tokens_per_seq
            src += _expand(seqs, tokens_per_seq) + [n_rows] * missing
            dst += _expand(seqs, tokens_per_seq) + [0] * missing
            pad = pad or missing > 0
        any_pad = any_pad or pad
        buckets.append(
            RowBucket(
                BucketKind.STACKED,
                tuple(group),
                rank,
                cap * tokens_per_seq,
                torch.tensor(src, dtype=torch.long),
                torch.tensor(dst, dtype=torch.long),
                needs_zero_row=pad,
            )
        )
    return buckets, any_pad
