"""Aggregating screened children's deltas into a candidate parent (imports torch).

Exact concatenation (as FLoRA / peft's ``cat``): for one layer, stacking the
children's A's along the rank axis and their weighted, scaled B's likewise gives

    [w_1 s_1 B_1 | ... | w_k s_k B_k] @ [A_1; ...; A_k] = sum_i w_i s_i B_i A_i

exactly, whatever the ranks (averaging A's and B's separately would not be the
average delta). The merged rank is sum(r_i); :func:`reduce_rank` brings it back
to the parent's rank by truncated SVD, computed from thin QRs of the factors
(never the dense out x in matrix) and returns the dropped singular values: the
Frobenius error is exactly sqrt(sum(tail^2)).

TIES (Yadav et al. 2023) when children disagree in sign: per layer, trim each
child's dense delta to its top ``density`` fraction by magnitude, elect each
entry's sign from the weighted sum of the trimmed deltas (ties -> +), and take
the weighted mean over the children whose trimmed entry is non-zero and has the
elected sign (0 where none does).

DARE (``dare``, ``dare_ties``) and projection away from the inputs the siblings and the parent
feed each layer (``project``) are in :mod:`hierarchy.updates.merges`.

    candidate parent = SVD_r(parent delta + eta * merge(children)),  r = the parent's rank
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hierarchy.chain import LoraFactors, pad_rank
from hierarchy.errors import AggregationError
from hierarchy.updates.merges import dare_merge

__all__ = [
    "INPUT_MAPPED",
    "MERGE_METHODS",
    "CandidateParent",
    "MergePolicy",
    "RankReduction",
    "WeightedDelta",
    "candidate_parent",
    "concat_merge",
    "reduce_rank",
    "sign_conflict",
    "ties_merge",
]


@dataclass(frozen=True)
class WeightedDelta:
    """One child's screened delta and its aggregation weight (0 drops it)."""

    delta: Mapping[str, LoraFactors] = field(repr=False)  # module -> factors
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight < 0:
            raise AggregationError(f"weight of {self.name or 'a child'} must be finite and >= 0, got {self.weight!r}")


def _weights(children: Sequence[WeightedDelta], normalize: bool) -> list[tuple[WeightedDelta, float]]:
    live = [c for c in children if c.weight > 0]
    if not live:
        raise AggregationError("no child delta has a positive weight: nothing to merge")
    modules = set(live[0].delta)
    for c in live[1:]:
        if set(c.delta) != modules:
            raise AggregationError(
                f"children adapt different layers: {sorted(modules ^ set(c.delta))} differ ({c.name or 'a child'})"
            )
    total = sum(c.weight for c in live) if normalize else 1.0
    return [(c, c.weight / total) for c in live]


def _check_layer(module: str, factors: Sequence[LoraFactors]) -> None:
    shapes = {(f.out_features, f.in_features) for f in factors}
    if len(shapes) != 1:
        raise AggregationError(f"layer {module}: children's deltas have different shapes {sorted(shapes)}")


def concat_merge(children: Sequence[WeightedDelta], normalize: bool = True) -> dict[str, LoraFactors]:
    """Per layer, one adapter of rank sum(r_i), scale 1, whose delta is exactly sum_i w_i s_i B_i A_i.

    With ``normalize`` the weights are divided by their sum (a weighted mean).
    """
    weighted = _weights(children, normalize)
    out: dict[str, LoraFactors] = {}
    for module in sorted(weighted[0][0].delta):
        parts = [(c.delta[module], w) for c, w in weighted]
        _check_layer(module, [f for f, _ in parts])
        a = torch.cat([f.A for f, _ in parts], dim=0)
        b = torch.cat([(w * f.scale) * f.B for f, w in parts], dim=1)
        out[module] = LoraFactors(A=a, B=b, scale=1.0)
    return out


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (at least one)."""
    if density >= 1.0:
        return t
    k = max(1, round(density * t.numel()))
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, largest=True).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(t.shape)


def _trimmed_stack(children: Sequence[tuple[WeightedDelta, float]], module: str, density: float) -> torch.Tensor:
    factors = [c.delta[module] for c, _ in children]
    _check_layer(module, factors)
    return torch.stack([_trim(f.delta().double(), density) for f in factors])  # [k, out, in]


def sign_conflict(children: Sequence[WeightedDelta], density: float = 0.2) -> float:
    """Share of overlapping entries on which children disagree in sign.

    An entry overlaps when two or more children's trimmed deltas are non-zero there.
    0.0: aligned children; about 0.5: unrelated ones; 1.0: opposed ones.
    """
    weighted = _weights(children, normalize=False)
    overlapping = conflicted = 0
    for module in sorted(weighted[0][0].delta):
        trimmed = _trimmed_stack(weighted, module, density)
        pos, neg = (trimmed > 0).any(dim=0), (trimmed < 0).any(dim=0)
        overlapping += int(((trimmed != 0).sum(dim=0) >= 2).sum())
        conflicted += int((pos & neg).sum())
    return conflicted / overlapping if overlapping else 0.0


def ties_merge(children: Sequence[WeightedDelta], density: float = 0.2) -> dict[str, torch.Tensor]:
    """TIES merge per layer: trim, elect sign (weighted total mass), weighted disjoint mean; dense [out, in]."""
    if not 0.0 < density <= 1.0:
        raise AggregationError(f"TIES density must be in (0, 1], got {density!r}")
    # Raw weights: the election's sign and the disjoint mean do not depend on the weights' sum,
    # and exact ties (sum == 0 -> '+') stay exact without a division.
    weighted = _weights(children, normalize=False)
    w = torch.tensor([wt for _, wt in weighted], dtype=torch.float64)
    out: dict[str, torch.Tensor] = {}
    for module in sorted(weighted[0][0].delta):
        trimmed = _trimmed_stack(weighted, module, density)  # [k, out, in]
        wv = w.view(-1, 1, 1)
        elected = torch.where((wv * trimmed).sum(dim=0) >= 0, 1.0, -1.0).to(torch.float64)  # [out, in]
        agree = (torch.sign(trimmed) == elected).to(torch.float64)  # zeros never agree
        mass = (agree * wv).sum(dim=0)
        merged = (agree * wv * trimmed).sum(dim=0) / torch.clamp(mass, min=torch.finfo(torch.float64).tiny)
        dtype = weighted[0][0].delta[module].B.dtype
        out[module] = torch.where(mass > 0, merged, torch.zeros_like(merged)).to(dtype)
    return out


@dataclass(frozen=True)
class RankReduction:
    """A delta reduced to ``rank`` by truncated SVD, with what was dropped."""

    factors: LoraFactors  # A [rank, in], B [out, rank]; scale as requested
    singular_values: torch.Tensor  # [min(out, in, R)] all singular values of the delta, descending
    tail: torch.Tensor  # [n - rank] the dropped ones (empty when nothing was dropped)
    error: float  # Frobenius norm of (delta - reduced) = sqrt(sum(tail^2))

    @property
    def spectral_error(self) -> float:
        return float(self.tail[0]) if self.tail.numel() else 0.0


def _svd_of(delta: LoraFactors | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [out, n], S [n], Vh [n, in] of the delta in float64; from thin QRs when it is factored."""
    if isinstance(delta, torch.Tensor):
        return torch.linalg.svd(delta.double(), full_matrices=False)  # type: ignore[no-any-return]  # torch._C._linalg has no stubs
    qb, rb = torch.linalg.qr(delta.scale * delta.B.double())  # [out, k], [k, R]
    qa, ra = torch.linalg.qr(delta.A.double().T)  # [in, k'], [k', R]
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core [k, k']
    return qb @ u, s, vh @ qa.T


def reduce_rank(delta: LoraFactors | torch.Tensor, rank: int, scale: float = 1.0) -> RankReduction:
    """Best rank-``rank`` approximation (Eckart-Young) as factors with ``scale`` (B is divided by it)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AggregationError(f"rank must be an integer >= 1, got {rank!r}")
    if not scale or not math.isfinite(scale):
        raise AggregationError(f"scale must be finite and non-zero, got {scale!r}")
    dtype = delta.dtype if isinstance(delta, torch.Tensor) else delta.B.dtype
    u, s, vh = _svd_of(delta)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    b = (u[:, :keep] * root) / scale  # [out, keep]
    a = root[:, None] * vh[:keep]  # [keep, in]
    tail = s[keep:]
    factors = pad_rank(LoraFactors(A=a.to(dtype), B=b.to(dtype), scale=scale), rank)
    return RankReduction(factors, s, tail, float(torch.sqrt((tail**2).sum())))


# auto: TIES on sign conflict, else concat; dare / dare_ties: DARE-pruned deltas (merges.py);
# project: concat, then each layer's increment projected away from the protected inputs;
# contrast: concat, then shrunk on the protected inputs and kept on the updating children's.
MERGE_METHODS = ("auto", "concat", "ties", "dare", "dare_ties", "project", "contrast")
INPUT_MAPPED = ("project", "contrast")  # methods that need per-layer input maps (see candidate_parent)


@dataclass(frozen=True)
class MergePolicy:
    """How a parent merges its children's screened deltas."""

    method: str = field(default="auto", metadata={"help": "one of " + ", ".join(MERGE_METHODS)})
    eta: float = field(default=1.0, metadata={"help": "server step: candidate = parent + eta * merge"})
    density: float = field(default=0.2, metadata={"help": "TIES: share of entries each child keeps"})
    conflict_threshold: float = field(
        default=0.3, metadata={"help": "auto: TIES above this sign-conflict share (see sign_conflict)"}
    )
    drop: float = field(default=0.5, metadata={"help": "DARE: share of each delta's entries dropped"})
    seed: int = field(default=0, metadata={"help": "DARE: seed of the drop masks"})
    energy: float = field(
        default=0.9, metadata={"help": "project: share of the protected inputs' energy the increment avoids"}
    )
    strength: float = field(default=4.0, metadata={"help": "contrast: weight of the protected inputs (>= 0)"})

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ValueError(f"method must be one of {', '.join(MERGE_METHODS)}, got {self.method!r}")
        if not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta) or self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if not 0.0 <= self.conflict_threshold <= 1.0:
            raise ValueError(f"conflict_threshold must be in [0, 1], got {self.conflict_threshold!r}")
        if isinstance(self.drop, bool) or not isinstance(self.drop, (int, float)) or not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {self.drop!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)) or not 0.0 < self.energy < 1.0:
            raise ValueError(f"energy must be in (0, 1), got {self.energy!r}")
        if (
            isinstance(self.strength, bool)
            or not isinstance(self.strength, (int, float))
            or not (math.isfinite(self.strength) and 0.0 <= self.strength <= 1e6)
        ):
            raise ValueError(f"strength must be in [0, 1e6], got {self.strength!r}")


@dataclass(frozen=True)
class CandidateParent:
    """The parent's next adapter: same layers, rank and scale as the current one."""

    factors: Mapping[str, LoraFactors] = field(repr=False)  # module -> A [r_p, in], B [out, r_p]
    method: str  # what was used ("auto" resolved to "concat" or "ties")
    conflict: float  # sign-conflict share that drove 'auto'
    truncation_error: Mapping[str, float]  # module -> Frobenius error of the rank reduction
    relative_error: float  # sqrt(sum err^2) / ||target||: how much the rank cap lost


def candidate_parent(
    parent: Mapping[str, LoraFactors],
    children: Sequence[WeightedDelta],
    policy: MergePolicy = MergePolicy(),
    input_maps: Mapping[str, torch.Tensor] | None = None,
) -> CandidateParent:
    """SVD_{r_p}(parent delta + eta * merge(children)) per layer, kept at the parent's rank and scale.

    ``input_maps`` (methods ``project``, ``contrast``): module -> [in, in] matrix M; the layer's
    merged increment becomes ``dW @ M`` (:func:`hierarchy.updates.merges.projector`,
    :func:`~hierarchy.updates.merges.contrast_map`); a layer without one is left as it is.
    """
    if set(parent) != set(children[0].delta if children else {}):
        raise AggregationError("children must adapt exactly the parent's layers")
    if policy.method in INPUT_MAPPED and input_maps is None:
        raise AggregationError(f"merge method {policy.method!r} needs per-layer input maps")
    conflict = sign_conflict(children, policy.density)
    method = policy.method
    if method == "auto":
        method = "ties" if conflict > policy.conflict_threshold else "concat"
    merged: Mapping[str, LoraFactors | torch.Tensor]
    if method == "ties":
        merged = ties_merge(children, policy.density)
    elif method in ("dare", "dare_ties"):
        pairs = [(c.delta, w) for c, w in _weights(children, normalize=True)]
        merged = dare_merge(pairs, policy.drop, policy.seed, elect_sign=method == "dare_ties")
    elif method in INPUT_MAPPED:
        assert input_maps is not None  # checked above
        merged = {
            m: (f.delta().double() @ input_maps[m].double() if m in input_maps else f.delta().double())
            for m, f in concat_merge(children).items()
        }
    else:
        merged = concat_merge(children)
    factors: dict[str, LoraFactors] = {}
    errors: dict[str, float] = {}
    lost = total = 0.0
    for module in sorted(parent):
        p, m = parent[module], merged[module]
        m_shape = (m.out_features, m.in_features) if isinstance(m, LoraFactors) else tuple(m.shape)
        if m_shape != (p.out_features, p.in_features):
            raise AggregationError(
                f"layer {module}: children's delta is {m_shape}, the parent's layer is "
                f"{(p.out_features, p.in_features)}"
            )
        if isinstance(m, LoraFactors):
            target: LoraFactors | torch.Tensor = LoraFactors(
                A=torch.cat([p.A, m.A.to(p.A.dtype)], dim=0),
                B=torch.cat([p.scale * p.B, policy.eta * m.B.to(p.B.dtype)], dim=1),
                scale=1.0,
            )
        else:
            target = p.delta() + policy.eta * m.to(p.B.dtype)
        reduced = reduce_rank(target, p.rank, p.scale)
        factors[module], errors[module] = reduced.factors, reduced.error
        lost += reduced.error**2
        total += float((reduced.singular_values**2).sum())
    return CandidateParent(factors, method, conflict, errors, math.sqrt(lost / total) if total else 0.0)
