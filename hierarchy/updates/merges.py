"""Sibling-safe merges beside concat and TIES (imports torch): DARE and subspace projection.

DARE (Yu et al. 2024, "Language Models are Super Mario"; peft's ``dare_linear`` / ``dare_ties``):
each child's dense delta keeps every entry with probability ``1 - drop`` and is rescaled by
``1 / (1 - drop)``, so its expectation is unchanged while most entries vanish. The mask is drawn
from a generator seeded by ``seed`` and the layer's position in sorted order: the same inputs give
the same candidate on every machine. ``dare_ties`` elects signs over the DARE-pruned deltas.

Projection (orthogonal-subspace / gradient-projection style, Saha et al. 2021 "GPM"): a layer's
merged increment dW is applied to inputs x as dW x. When ``U`` [in, k] is an orthonormal basis of
the inputs the protected nodes (the siblings, the parent) feed that layer, ``dW (I - U U^T)``
leaves their outputs of that layer unchanged and keeps what the update does on other inputs.
The basis comes from the caller (the model runtime collects activations; this module does no I/O).

Contrast (a least-squares merge in the spirit of RegMean, Jin et al. 2023): with C_u the inputs'
covariance on the updating child's text and C_s the protected nodes', the layer increment

    dW' = argmin ||(dW' - dW) X_u||^2 + strength * ||dW' X_s||^2 = dW C_u (C_u + strength C_s)^-1

keeps what the update does on its own inputs and shrinks it on the protected ones; where the
two share directions it is a step of 1 / (1 + strength) there, elsewhere a full step.
Both are applied as ``dW @ M`` with the [in, in] map M from :func:`projector` or :func:`contrast_map`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hierarchy.chain import LoraFactors
from hierarchy.errors import AggregationError

__all__ = ["contrast_map", "dare_merge", "input_basis", "project_away", "projector"]


def _dare(delta: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    if drop <= 0.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) >= drop
    return torch.where(keep, delta / (1.0 - drop), torch.zeros_like(delta))


def dare_merge(
    children: Sequence[tuple[Mapping[str, LoraFactors], float]],
    drop: float,
    seed: int,
    *,
    elect_sign: bool = False,
) -> dict[str, torch.Tensor]:
    """DARE per layer over ``(delta, normalized weight)`` pairs; dense [out, in] float64.

    Without ``elect_sign``: the weighted sum of the rescaled deltas (``dare_linear``). With it:
    the TIES election over them (``dare_ties``): entries whose sign disagrees with the weighted
    total are dropped, and the agreeing ones are averaged by weight.
    """
    if not 0.0 <= drop < 1.0:
        raise AggregationError(f"DARE drop must be in [0, 1), got {drop!r}")
    modules = sorted(children[0][0])
    out: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        stack = []
        for child, (delta, _) in enumerate(children):
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + index * 1009 + child)
            stack.append(_dare(delta[module].delta().double(), drop, generator))
        pruned = torch.stack(stack)  # [k, out, in]
        w = torch.tensor([wt for _, wt in children], dtype=torch.float64).view(-1, 1, 1)
        if not elect_sign:
            out[module] = (w * pruned).sum(dim=0)
            continue
        elected = torch.where((w * pruned).sum(dim=0) >= 0, 1.0, -1.0).to(torch.float64)
        agree = (torch.sign(pruned) == elected).to(torch.float64)
        mass = (agree * w).sum(dim=0)
        merged = (agree * w * pruned).sum(dim=0) / torch.clamp(mass, min=torch.finfo(torch.float64).tiny)
        out[module] = torch.where(mass > 0, merged, torch.zeros_like(merged))
    return out


def input_basis(covariance: torch.Tensor, energy: float) -> torch.Tensor:
    """Orthonormal basis [in, k] of the top eigen-directions of an input covariance ``sum x x^T``
    that hold ``energy`` of its trace (k >= 1, the smallest such k)."""
    if not 0.0 < energy < 1.0:
        raise AggregationError(f"projection energy must be in (0, 1), got {energy!r}")
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise AggregationError(f"a covariance must be square, got shape {tuple(covariance.shape)}")
    ascending: tuple[torch.Tensor, torch.Tensor] = torch.linalg.eigh(covariance.double())  # no stubs
    values, vectors = ascending[0].flip(0).clamp(min=0.0), ascending[1].flip(1)
    total = float(values.sum())
    if total <= 0.0:
        return vectors[:, :0]
    k = int(torch.searchsorted(torch.cumsum(values, 0) / total, torch.tensor(energy, dtype=torch.float64))) + 1
    return vectors[:, : min(k, values.numel())]


def project_away(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``delta (I - U U^T)``: the increment with no effect on inputs in span(U) ([out, in], U [in, k])."""
    if basis.ndim != 2 or basis.shape[0] != delta.shape[1]:
        raise AggregationError(f"basis {tuple(basis.shape)} does not match a delta of {tuple(delta.shape)}")
    if basis.shape[1] == 0:
        return delta
    u = basis.to(torch.float64)
    d = delta.double()
    return d - (d @ u) @ u.T


def projector(protect_cov: torch.Tensor, energy: float) -> torch.Tensor:
    """I - U U^T for the basis U of ``protect_cov`` holding ``energy`` (see :func:`input_basis`)."""
    u = input_basis(protect_cov, energy)
    return torch.eye(u.shape[0], dtype=torch.float64) - u @ u.T


def contrast_map(keep_cov: torch.Tensor, protect_cov: torch.Tensor, strength: float) -> torch.Tensor:
    """C_u (C_u + strength C_s + ridge)^-1 (see the module docstring); [in, in] float64.

    The ridge (1e-6 of the mean eigenvalue) keeps the inverse finite where neither text has energy."""
    if keep_cov.shape != protect_cov.shape or keep_cov.ndim != 2 or keep_cov.shape[0] != keep_cov.shape[1]:
        raise AggregationError(f"covariances {tuple(keep_cov.shape)} and {tuple(protect_cov.shape)} must be square")
    if not strength >= 0.0:
        raise AggregationError(f"contrast strength must be >= 0, got {strength!r}")
    cu, cs = keep_cov.double(), protect_cov.double()
    n = cu.shape[0]
    ridge = 1e-6 * float(torch.trace(cu + strength * cs)) / n + 1e-12
    system = cu + strength * cs + ridge * torch.eye(n, dtype=torch.float64)
    # M = C_u S^-1  <=>  S^T M^T = C_u^T (S is symmetric)
    solved: torch.Tensor = torch.linalg.solve(system, cu)  # torch._C._linalg has no stubs
    return solved.T
