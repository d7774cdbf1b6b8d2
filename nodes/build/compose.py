"""Apply adapter chains to a model: merged weights and the flattened single adapter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from hierarchy.chain import LoraFactors, effective_weight, flatten_chain, pad_rank
from nodes.errors import AdapterError
from nodes.store.adapters import AdapterWeights

__all__ = ["chain_by_module", "flatten_adapters", "merge_chain"]

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def chain_by_module(chain: Sequence[AdapterWeights]) -> dict[str, list[LoraFactors]]:
    """``{module name: [factors of each chain element that adapts it, top first]}``."""
    out: dict[str, list[LoraFactors]] = {}
    for adapter in chain:
        for module, factors in adapter.factors.items():
            out.setdefault(module, []).append(factors)
    return out


@torch.no_grad()
def merge_chain(model: ModuleT, chain: Sequence[AdapterWeights]) -> ModuleT:
    """Fold the chain into ``model``'s linear weights in place: W <- W0 + sum(s_i B_i A_i)."""
    modules = dict(model.named_modules())
    for name, factors in chain_by_module(chain).items():
        layer = modules.get(name)
        if layer is None or not isinstance(layer, torch.nn.Linear):
            raise AdapterError(f"the adapter targets {name}, which is not a linear layer of the base")
        layer.weight.copy_(effective_weight(layer.weight.data, factors))
    return model


def flatten_adapters(chain: Sequence[AdapterWeights]) -> AdapterWeights:
    """The chain as ONE adapter of rank sum(r_i), exact, with scale 1 (alpha = r).

    Modules adapted by only part of the chain get a smaller stacked rank; they
    are zero-padded to the common rank so the result is one plain PEFT adapter.
    """
    if not chain:
        raise AdapterError("cannot flatten an empty chain (the base has no adapter)")
    stacked = {name: flatten_chain(fs) for name, fs in chain_by_module(chain).items()}
    rank = max(f.rank for f in stacked.values())
    factors = {name: pad_rank(f, rank) for name, f in stacked.items()}
    targets = tuple(sorted({t for a in chain for t in a.target_modules}))
    return AdapterWeights(r=rank, alpha=float(rank), target_modules=targets, factors=factors)
