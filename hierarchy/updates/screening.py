"""Screening a child's delta before its parent absorbs it (imports torch).

A delta is ``{module: LoraFactors}`` (or a dense ``[out, in]`` tensor per module);
its size is the Frobenius norm of ``sum scale * B @ A`` over all layers, computed
from the factors without building the dense matrices. In order:

    non-finite   any NaN/inf                                      -> rejected
    floor        norm < max(min_norm, min_relative x median)      -> rejected (near-zero, a free-rider)
    ceiling      norm > max_relative x median (max_norm before    -> rejected, or clipped to the ceiling
                 there is enough history)                            when on_too_large="clip"
    direction    cosine(delta, parent's reference) < min_cosine   -> weight 0 (e.g. a sign-flipped update)

``median`` is over the norms the parent accepted before (TrustState.accepted_norms).
Nothing here mutates its inputs; :func:`scale_delta` returns a new mapping.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

import torch

from hierarchy.chain import LoraFactors
from hierarchy.errors import ScreeningRejected

__all__ = [
    "Delta",
    "ScreenPolicy",
    "ScreenResult",
    "Verdict",
    "delta_cosine",
    "delta_inner",
    "delta_norm",
    "scale_delta",
    "screen_update",
]

# module name -> factors (scale * B @ A) or a dense delta [out_features, in_features]
Delta = Mapping[str, LoraFactors | torch.Tensor]


class Verdict(str, enum.Enum):
    ACCEPTED = "accepted"
    CLIPPED = "clipped"  # accepted after scaling down to the ceiling
    NON_FINITE = "non_finite"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    OPPOSED = "opposed"  # points against the parent's direction: weight 0


@dataclass(frozen=True)
class ScreenPolicy:
    """Bounds for a delta's size and direction (per parent)."""

    min_norm: float = field(default=1e-6, metadata={"help": "absolute floor of the delta's Frobenius norm"})
    min_relative: float = field(default=0.01, metadata={"help": "floor as a fraction of the median accepted norm"})
    max_relative: float = field(default=10.0, metadata={"help": "ceiling as a multiple of the median accepted norm"})
    max_norm: float | None = field(default=None, metadata={"help": "absolute ceiling while history is short"})
    on_too_large: str = field(default="reject", metadata={"help": "'reject' or 'clip' a delta above the ceiling"})
    min_cosine: float = field(default=0.0, metadata={"help": "cosine with the parent's reference below this: weight 0"})
    min_history: int = field(default=3, metadata={"help": "accepted norms needed before the median is used"})

    def __post_init__(self) -> None:
        for name in ("min_norm", "min_relative"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.max_relative, (int, float)) or not self.max_relative > 1.0:
            raise ValueError(f"max_relative must be > 1, got {self.max_relative!r}")
        if self.max_norm is not None and not self.max_norm > self.min_norm:
            raise ValueError(f"max_norm must be > min_norm, got {self.max_norm!r}")
        if self.on_too_large not in ("reject", "clip"):
            raise ValueError(f"on_too_large must be 'reject' or 'clip', got {self.on_too_large!r}")
        if not isinstance(self.min_cosine, (int, float)) or not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if isinstance(self.min_history, bool) or not isinstance(self.min_history, int) or self.min_history < 1:
            raise ValueError(f"min_history must be an integer >= 1, got {self.min_history!r}")


@dataclass(frozen=True)
class ScreenResult:
    """The verdict on one delta, with the figures behind it."""

    verdict: Verdict
    weight: float  # the delta's weight in aggregation: 0.0 when rejected
    norm: float  # Frobenius norm of the delta as submitted
    clip_factor: float  # multiply the delta by this before merging (1.0 unless clipped)
    cosine: float | None  # against the parent's reference direction; None without one
    floor: float
    ceiling: float | None
    median: float | None  # median accepted norm used, None while history is short
    reason: str

    @property
    def accepted(self) -> bool:
        return self.weight > 0.0

    @property
    def merged_norm(self) -> float:
        """The norm that enters the parent (and the accepted-norm history)."""
        return self.norm * self.clip_factor

    def raise_if_rejected(self) -> ScreenResult:
        if not self.accepted:
            raise ScreeningRejected(f"update rejected by screening: {self.reason}", result=self)
        return self


def _inner(x: LoraFactors | torch.Tensor, y: LoraFactors | torch.Tensor) -> float:
    """Frobenius inner product <x, y> in float64, without materialising low-rank products."""
    if isinstance(x, LoraFactors):
        if isinstance(y, LoraFactors):
            # tr((s1 B1 A1)' s2 B2 A2) = s1 s2 sum((B1' B2) * (A1 A2')): r1 x r2 work, not out x in
            gram_b = x.B.double().T @ y.B.double()
            gram_a = x.A.double() @ y.A.double().T
            return float(x.scale) * float(y.scale) * float((gram_b * gram_a).sum())
        return _dense_factors_inner(y, x)
    if isinstance(y, LoraFactors):
        return _dense_factors_inner(x, y)
    return float((x.double() * y.double()).sum())


def _dense_factors_inner(dense: torch.Tensor, f: LoraFactors) -> float:
    """<D, sBA> = s sum(B * (D A')), without materialising BA."""
    return float(f.scale) * float((f.B.double() * (dense.double() @ f.A.double().T)).sum())


def delta_inner(x: Delta, y: Delta) -> float:
    """Sum over shared modules of the per-layer Frobenius inner products."""
    return sum(_inner(x[m], y[m]) for m in sorted(set(x) & set(y)))


def delta_norm(delta: Delta) -> float:
    return math.sqrt(max(sum(_inner(v, v) for v in delta.values()), 0.0))


def delta_cosine(x: Delta, y: Delta) -> float | None:
    """Cosine of two deltas (None when either is zero)."""
    nx, ny = delta_norm(x), delta_norm(y)
    if nx == 0.0 or ny == 0.0:
        return None
    return max(-1.0, min(1.0, delta_inner(x, y) / (nx * ny)))


@overload
def scale_delta(delta: Mapping[str, LoraFactors], factor: float) -> dict[str, LoraFactors]: ...
@overload
def scale_delta(delta: Delta, factor: float) -> dict[str, LoraFactors | torch.Tensor]: ...
def scale_delta(delta: Delta, factor: float) -> Delta:
    """A new delta equal to ``factor`` x ``delta`` (B is scaled, A and the stored scale kept)."""
    return {
        m: LoraFactors(A=v.A, B=v.B * factor, scale=v.scale) if isinstance(v, LoraFactors) else v * factor
        for m, v in delta.items()
    }


def _finite(delta: Delta) -> bool:
    for v in delta.values():
        tensors = (v.A, v.B) if isinstance(v, LoraFactors) else (v,)
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            return False
    return True


def screen_update(
    delta: Delta,
    *,
    accepted_norms: Sequence[float] = (),
    reference: Delta | None = None,
    policy: ScreenPolicy = ScreenPolicy(),
) -> ScreenResult:
    """Screen one delta against the parent's accepted norms and reference direction."""
    median = statistics.median(accepted_norms) if len(accepted_norms) >= policy.min_history else None
    floor = max(policy.min_norm, policy.min_relative * median) if median is not None else policy.min_norm
    ceiling = policy.max_relative * median if median is not None else policy.max_norm

    def result(
        verdict: Verdict, weight: float, norm: float, clip: float, cos: float | None, reason: str
    ) -> ScreenResult:
        return ScreenResult(verdict, weight, norm, clip, cos, floor, ceiling, median, reason)

    if not delta or not _finite(delta):
        return result(Verdict.NON_FINITE, 0.0, math.nan, 1.0, None, "the delta is empty or holds NaN/inf values")
    norm = delta_norm(delta)
    cos = delta_cosine(delta, reference) if reference is not None else None
    if norm < floor:
        return result(
            Verdict.TOO_SMALL,
            0.0,
            norm,
            1.0,
            cos,
            f"delta norm {norm:.3g} is below the floor {floor:.3g} (a near-zero update)",
        )
    clip, verdict, note = 1.0, Verdict.ACCEPTED, ""
    if ceiling is not None and norm > ceiling:
        where = f"{policy.max_relative:g} x median {median:.3g}" if median is not None else "max_norm"
        if policy.on_too_large == "reject":
            return result(
                Verdict.TOO_LARGE,
                0.0,
                norm,
                1.0,
                cos,
                f"delta norm {norm:.3g} exceeds the ceiling {ceiling:.3g} ({where})",
            )
        clip, verdict = ceiling / norm, Verdict.CLIPPED
        note = f"; clipped from norm {norm:.3g} to the ceiling {ceiling:.3g} ({where})"
    if cos is not None and cos < policy.min_cosine:
        return result(
            Verdict.OPPOSED,
            0.0,
            norm,
            clip,
            cos,
            f"cosine {cos:.3f} with the parent's reference direction is below {policy.min_cosine:g}"
            " (the update points against the parent)",
        )
    return result(
        verdict,
        1.0,
        norm,
        clip,
        cos,
        f"norm {norm:.3g} within [{floor:.3g}, {'inf' if ceiling is None else format(ceiling, '.3g')}]" + note,
    )
