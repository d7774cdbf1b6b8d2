"""The adapter bank: one base model in memory, many adapter chains in one batch.

Every linear layer that some active adapter adapts is wrapped in a
:class:`BankLinear`. Its forward computes the base product ``x W0^T`` once for
the whole batch, then adds each adapter's low-rank term only to the rows whose
chain contains that adapter (see :mod:`nodes.runtime.plan` for the grouping). A
row's output is therefore ``x (W0 + sum_i s_i B_i A_i)^T`` over its own chain,
the same function as the merged model of its node (:func:`nodes.build.compose.merge_chain`).

The bank never copies the base weights and never merges anything into them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from nodes.errors import AdapterError
from nodes.runtime.plan import BankBatch, BucketKind, LayerBatch, StackedWeights, fuse_ranges, plan_buckets
from nodes.store.adapters import AdapterWeights

__all__ = ["AdapterBank", "BankLinear", "PreparedAdapter", "PreparedFactors", "prepare_adapter"]


@dataclass(frozen=True)
class PreparedFactors:
    """One adapter's factors for one layer, laid out for ``x @ a_t @ b_t``."""

    a_t: torch.Tensor  # [in_features, r]: A transposed, contiguous
    b_t: torch.Tensor  # [r, out_features]: (scale * B) transposed, contiguous

    @property
    def rank(self) -> int:
        return int(self.a_t.shape[1])


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter ready for the bank (also the form the host cache keeps)."""

    key: str  # the node path, e.g. "en/medical"
    modules: Mapping[str, PreparedFactors]  # base module name -> factors
    nbytes: int

    @classmethod
    def build(cls, key: str, modules: Mapping[str, PreparedFactors]) -> PreparedAdapter:
        nbytes = sum(
            f.a_t.numel() * f.a_t.element_size() + f.b_t.numel() * f.b_t.element_size() for f in modules.values()
        )
        return cls(key=key, modules=dict(modules), nbytes=nbytes)


def prepare_adapter(
    key: str, adapter: AdapterWeights, shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype
) -> PreparedAdapter:
    """Check ``adapter`` fits the base (``shapes``: module -> (in, out)) and lay it out for the bank.

    All factors of the adapter live in ONE buffer (views per module): one allocation
    per adapter keeps a cache of thousands of small adapters compact in memory.
    """
    for name, f in adapter.factors.items():
        shape = shapes.get(name)
        if shape is None:
            raise AdapterError(f"adapter {key!r} targets {name}, which is not a linear layer of the base")
        if (f.in_features, f.out_features) != shape:
            raise AdapterError(
                f"adapter {key!r}: {name} is {f.out_features}x{f.in_features}, the base layer is {shape[1]}x{shape[0]}"
            )
    total = sum(f.A.numel() + f.B.numel() for f in adapter.factors.values())
    buffer = torch.empty(total, dtype=dtype)
    modules: dict[str, PreparedFactors] = {}
    offset = 0
    for name, f in adapter.factors.items():
        a_t = buffer[offset : offset + f.A.numel()].view(f.in_features, f.rank)
        offset += f.A.numel()
        b_t = buffer[offset : offset + f.B.numel()].view(f.rank, f.out_features)
        offset += f.B.numel()
        a_t.copy_(f.A.detach().t())
        b_t.copy_((f.B.detach().to(torch.float64) * f.scale).t())
        modules[name] = PreparedFactors(a_t=a_t, b_t=b_t)
    return PreparedAdapter.build(key, modules)


class BankLinear(torch.nn.Module):
    """A base ``nn.Linear`` plus the low-rank terms of the current batch's adapters."""

    _bank: AdapterBank  # set with object.__setattr__ (see __init__)
    _base_forward: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, name: str, base: torch.nn.Linear, bank: AdapterBank):
        super().__init__()
        self.name = name
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        object.__setattr__(self, "_bank", bank)  # not a submodule: avoid a reference cycle in the module tree
        # The base's own forward (F.linear, or an int8 layer's kernel), without Module.__call__'s hooks.
        object.__setattr__(self, "_base_forward", base.forward)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the layer still finds the base weight
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        batch = self._bank.batch
        if batch is None:
            return y
        layer = batch.layers.get(self.name)
        if layer is None:
            return y
        if x.shape[:-1].numel() != batch.num_rows:
            raise AdapterError(
                f"{self.name}: {x.shape[:-1].numel()} rows in the forward, the bank batch has {batch.num_rows}"
            )
        dtype = self._bank.dtype
        if y.dtype != dtype:  # a bf16/int8 base: the low-rank terms in the adapters' fp32 (AdapterBank.dtype)
            wide = y.to(dtype)
            # These small products on one thread: after the base's bf16 kernels (oneDNN), a rank-8
            # product on 2 OpenMP threads waited ~40 us for the second one to wake (bf16 engine at
            # 16 rows, 2 threads: 83 -> 190 tokens/s). Only the model thread calls this.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                apply_layer(layer, x.reshape(-1, self.in_features).to(dtype), wide.view(-1, self.out_features))
            finally:
                torch.set_num_threads(threads)
            return wide.to(y.dtype)
        apply_layer(layer, x.reshape(-1, self.in_features), y.view(-1, self.out_features))
        return y


def apply_layer(layer: LayerBatch, x: torch.Tensor, y: torch.Tensor) -> None:
    """Add every bucket's low-rank terms to ``y`` ([N, out]) in place; ``x`` is [N, in]."""
    src = F.pad(x, (0, 0, 0, 1)) if layer.needs_zero_row else x  # row N is all zeros: padding adds exact zeros
    for w in layer.weights:
        bucket = w.bucket
        kind = bucket.kind
        if kind is BucketKind.FULL:
            y.addmm_(x @ w.a, w.b)
        elif kind is BucketKind.SLICE:
            s = slice(bucket.start, bucket.stop)
            y[s].addmm_(x[s] @ w.a, w.b)
        elif kind is BucketKind.RUN:
            s, groups = slice(bucket.start, bucket.stop), len(bucket.keys)
            h = torch.bmm(x[s].view(groups, bucket.capacity, -1), w.a)
            y[s].view(groups, bucket.capacity, -1).baddbmm_(h, w.b)
        elif kind is BucketKind.SUBSET:
            src_rows, dst_rows = cast(torch.Tensor, bucket.src_rows), cast(torch.Tensor, bucket.dst_rows)
            y.index_add_(0, dst_rows, (src.index_select(0, src_rows) @ w.a) @ w.b)
        else:
            src_rows, dst_rows = cast(torch.Tensor, bucket.src_rows), cast(torch.Tensor, bucket.dst_rows)
            xg = src.index_select(0, src_rows).view(len(bucket.keys), bucket.capacity, -1)
            y.index_add_(0, dst_rows, torch.bmm(torch.bmm(xg, w.a), w.b).view(-1, y.shape[1]))


class AdapterBank:
    """The active adapters of one base model and the wrapped layers that apply them.

    Not thread-safe: the engine's model thread owns it. ``add``/``remove``
    change what is active; ``plan`` builds a :class:`BankBatch` for a batch
    composition; ``use(batch)`` makes the model's forward apply it.
    """

    def __init__(self, model: torch.nn.Module):
        if any(isinstance(m, BankLinear) for m in model.modules()):
            raise AdapterError("this model already has an adapter bank (one bank per model; unwrap the other first)")
        self.model = model
        self.batch: BankBatch | None = None
        self._linears: dict[str, torch.nn.Linear] = {
            name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        self._wrapped: dict[str, BankLinear] = {}
        self._adapters: dict[str, PreparedAdapter] = {}
        # Stacks of the last plan, reused by the next one (the prefill plan and the decode plan of the
        # same rows, or a batch that lost one row, share most buckets). Holds nothing else.
        self._stacks: dict[tuple[str, BucketKind, tuple[str, ...]], StackedWeights] = {}
        first = next(iter(model.parameters()))
        # Adapters are kept (and their low-rank products run) in fp32 under a bf16/fp16 base: on
        # CPU a rank-8 product in bf16 took 10x an fp32 one (oneDNN's per-call cost at these
        # shapes), and the sum of a chain's deltas keeps fp32's precision.
        self.dtype = torch.float32 if first.dtype in (torch.bfloat16, torch.float16) else first.dtype

    # -- what the base offers -------------------------------------------------
    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{module name: (in_features, out_features)}`` for every linear layer of the base."""
        return {name: (m.in_features, m.out_features) for name, m in self._linears.items()}

    # -- active adapters -------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._adapters.values())

    def add(self, adapter: PreparedAdapter) -> None:
        for name in adapter.modules:
            if name not in self._linears:
                raise AdapterError(f"adapter {adapter.key!r} targets {name}, which is not a linear layer of the base")
        for name in adapter.modules:
            self._wrap(name)
        self._adapters[adapter.key] = adapter

    def remove(self, key: str) -> PreparedAdapter:
        if self.batch is not None and key in self.batch.adapter_keys:
            raise AdapterError(f"adapter {key!r} is in use by the current batch")
        self._stacks = {m: w for m, w in self._stacks.items() if key not in m[2]}
        return self._adapters.pop(key)

    def _wrap(self, name: str) -> None:
        if name in self._wrapped:
            return
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        wrapper = BankLinear(name, self._linears[name], self)
        setattr(parent, child, wrapper)
        self._wrapped[name] = wrapper

    def unwrap(self) -> None:
        """Put the plain ``nn.Linear`` layers back (the model is the base again)."""
        for name, wrapper in self._wrapped.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, wrapper.base)
        self._wrapped.clear()
        self._adapters.clear()
        self._stacks.clear()
        self.batch = None

    # -- per-forward metadata --------------------------------------------------
    def plan(self, chains: Sequence[Sequence[str]], tokens_per_seq: int) -> BankBatch:
        """Metadata for a forward over ``len(chains)`` sequences of ``tokens_per_seq`` tokens each."""
        seqs: tuple[tuple[str, ...], ...] = tuple(tuple(c) for c in chains)
        users: dict[str, list[int]] = {}
        for seq, chain in enumerate(seqs):
            for key in chain:
                if key not in self._adapters:
                    raise AdapterError(f"adapter {key!r} is not active in the bank")
                users.setdefault(key, []).append(seq)
        layers: dict[str, LayerBatch] = {}
        shared: dict[tuple, tuple] = {}  # layer signature -> buckets (layers of one kind share row plans)
        stacks: dict[tuple[str, BucketKind, tuple[str, ...]], StackedWeights] = {}
        for name in self._wrapped:
            present = {k: self._adapters[k].modules[name] for k in users if name in self._adapters[k].modules}
            if not present:
                continue
            signature = tuple(sorted((k, f.rank) for k, f in present.items()))
            if signature not in shared:
                buckets, needs_zero_row = plan_buckets(
                    {k: users[k] for k in present}, {k: f.rank for k, f in present.items()}, len(seqs), tokens_per_seq
                )
                shared[signature] = fuse_ranges(buckets), needs_zero_row
            buckets, needs_zero_row = shared[signature]
            weights = []
            for bucket in buckets:
                memo = (name, bucket.kind, bucket.keys)
                previous = stacks.get(memo) or self._stacks.get(memo)
                stacked = _stack(bucket, present, previous)
                stacks[memo] = stacked
                weights.append(stacked)
            layers[name] = LayerBatch(weights=tuple(weights), needs_zero_row=needs_zero_row)
        self._stacks = stacks
        return BankBatch(chains=seqs, tokens_per_seq=tokens_per_seq, layers=layers)

    def drop_stacks(self) -> None:
        """Forget the stacked weights kept for the next plan (the engine calls this when idle)."""
        self._stacks = {}

    @contextlib.contextmanager
    def use(self, batch: BankBatch | None) -> Iterator[None]:
        """Apply ``batch`` in every forward inside the block (None: the base alone)."""
        previous, self.batch = self.batch, batch
        try:
            yield
        finally:
            self.batch = previous


def _stack(bucket, present: Mapping[str, PreparedFactors], previous: StackedWeights | None) -> StackedWeights:
    if len(bucket.keys) == 1:
        f = present[bucket.keys[0]]
        return StackedWeights(bucket=bucket, a=f.a_t, b=f.b_t)
    if previous is not None:  # same adapters in the same order at this layer: the same tensors
        return StackedWeights(bucket=bucket, a=previous.a, b=previous.b)
    if bucket.kind in (BucketKind.FULL, BucketKind.SLICE):  # fused over the same rows: concatenated along rank
        return StackedWeights(
            bucket=bucket,
            a=torch.cat([present[k].a_t for k in bucket.keys], dim=1),
            b=torch.cat([present[k].b_t for k in bucket.keys], dim=0),
        )
    return StackedWeights(
        bucket=bucket,
        a=torch.stack([present[k].a_t for k in bucket.keys]),
        b=torch.stack([present[k].b_t for k in bucket.keys]),
    )
