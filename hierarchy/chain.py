"""Exact adapter-chain math on tensors (no I/O).

A node's effective weight for one adapted linear layer is

    W_eff = W0 + sum_i scale_i * B_i @ A_i          over the node's chain,

and a chain flattens *exactly* into one adapter of rank sum(r_i) by stacking the
A's along the rank axis and the scaled B's along the rank axis:

    B_cat @ A_cat = [s_1 B_1 | ... | s_k B_k] @ [A_1; ...; A_k] = sum_i s_i B_i A_i.

This module imports torch; the SDK must not import it (see hierarchy/__init__).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hierarchy.errors import ChainError

__all__ = ["LoraFactors", "compose_delta", "effective_weight", "flatten_chain", "pad_rank", "refit_over"]


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's low-rank factors for one linear layer."""

    A: torch.Tensor  # [r, in_features]
    B: torch.Tensor  # [out_features, r]
    scale: float  # alpha / r (or 1.0 for a flattened adapter whose B is pre-scaled)

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise ChainError(f"A and B must be 2-D, got {tuple(self.A.shape)} and {tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise ChainError(f"rank mismatch: A is {tuple(self.A.shape)}, B is {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> torch.Tensor:
        """scale * B @ A: [out_features, in_features]."""
        return self.scale * (self.B @ self.A)


def _check_same_layer(chain: Sequence[LoraFactors]) -> None:
    if not chain:
        raise ChainError("empty chain")
    shape = (chain[0].out_features, chain[0].in_features)
    for i, f in enumerate(chain):
        if (f.out_features, f.in_features) != shape:
            raise ChainError(f"chain element {i} adapts a {f.out_features}x{f.in_features} layer, expected {shape}")


def compose_delta(chain: Sequence[LoraFactors]) -> torch.Tensor:
    """sum_i scale_i * B_i @ A_i: the chain's total weight delta, [out, in]."""
    _check_same_layer(chain)
    total = chain[0].delta()
    for factors in chain[1:]:
        total = total + factors.delta()
    return total


def effective_weight(w0: torch.Tensor, chain: Sequence[LoraFactors]) -> torch.Tensor:
    """W0 + compose_delta(chain); ``w0`` is [out, in] as stored by nn.Linear."""
    if not chain:
        return w0.clone()
    delta = compose_delta(chain)
    if tuple(delta.shape) != tuple(w0.shape):
        raise ChainError(f"chain delta {tuple(delta.shape)} does not fit weight {tuple(w0.shape)}")
    return w0 + delta.to(w0.dtype)


def flatten_chain(chain: Sequence[LoraFactors]) -> LoraFactors:
    """One adapter of rank sum(r_i) and scale 1.0 whose delta equals the chain's exactly."""
    _check_same_layer(chain)
    a = torch.cat([f.A for f in chain], dim=0)
    b = torch.cat([f.scale * f.B for f in chain], dim=1)
    return LoraFactors(A=a, B=b, scale=1.0)


def pad_rank(factors: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad to ``rank``; the delta is unchanged (zero rows of A meet zero columns of B)."""
    if rank < factors.rank:
        raise ChainError(f"cannot pad rank {factors.rank} down to {rank}")
    extra = rank - factors.rank
    if extra == 0:
        return factors
    a = torch.cat([factors.A, factors.A.new_zeros(extra, factors.in_features)], dim=0)
    b = torch.cat([factors.B, factors.B.new_zeros(factors.out_features, extra)], dim=1)
    return LoraFactors(A=a, B=b, scale=factors.scale)


def refit_over(
    own: LoraFactors, old: Sequence[LoraFactors], new: Sequence[LoraFactors], rank: int
) -> tuple[LoraFactors, float]:
    """``own`` re-expressed over a changed parent chain: the best rank-``rank`` factors (SVD, scale
    ``own.scale``) of ``own.delta() + delta(old) - delta(new)``, so that ``new`` plus the result
    gives the effective weight ``old`` plus ``own`` gave, up to the truncated tail. Returns the
    factors and the relative error of the fit (Frobenius norm of what the rank cut left out, over
    the norm of the target; 0.0 when the target is zero).

    ``old`` or ``new`` may be empty (the parent did not, or no longer, adapts this layer).
    """
    if rank < 1:
        raise ChainError(f"rank must be >= 1, got {rank}")
    for factors in (*old, *new):
        if (factors.out_features, factors.in_features) != (own.out_features, own.in_features):
            raise ChainError(
                f"a parent chain adapts a {factors.out_features}x{factors.in_features} layer, "
                f"the own adapter a {own.out_features}x{own.in_features} one"
            )
    target = own.delta().double()
    if old:
        target = target + compose_delta(old).double()
    if new:
        target = target - compose_delta(new).double()
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    k = min(rank, int(s.numel()))
    total = float(torch.linalg.vector_norm(s))
    error = float(torch.linalg.vector_norm(s[k:])) / total if total > 0 else 0.0
    # Balanced factors (sqrt of the singular values on each side), unscaled by own.scale.
    root = (s[:k] / own.scale).sqrt()
    a = root[:, None] * vh[:k]
    b = u[:, :k] * root[None, :]
    if k < rank:  # a layer narrower than the rank: zero-pad, the delta is unchanged
        return pad_rank(LoraFactors(A=a.to(own.A.dtype), B=b.to(own.B.dtype), scale=own.scale), rank), error
    return LoraFactors(A=a.to(own.A.dtype), B=b.to(own.B.dtype), scale=own.scale), error
