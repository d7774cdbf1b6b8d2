"""Fine-tune one node's adapter on local data, continuing from its current weights.

    result = fine_tune(model, ancestors, current, tokens, TrainSettings(steps=20, lr=3e-3))
    result.adapter                       # the node's next adapter: same rank, alpha and layers
    increment(current, result.adapter)   # exactly (new - current), as low-rank factors per layer

The ancestors are applied and frozen (:class:`nodes.build.training.ChainPatch`); the node's own
factors start from its current A and B instead of a fresh initialisation, so the increment is
exactly what the local data taught it. This is what a hospital runs for `treelm update make`
and what a parent runs on its clean probe text to get its own *reference* increment (the
direction an honest update should roughly share; see cluster.updates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hierarchy.chain import LoraFactors
from hierarchy.spec import GuardSettings, LoraSettings, TrainSettings
from nodes.build.training import ChainPatch, TrainResult, perplexity, train_adapter
from nodes.errors import AdapterError, BuildError
from nodes.store.adapters import AdapterWeights

__all__ = ["FineTuneResult", "chain_perplexity", "fine_tune", "increment", "load_own", "lora_settings_of"]

_NO_GUARD = GuardSettings(replay=0.0, kl_weight=0.0)


@dataclass(frozen=True)
class FineTuneResult:
    """A fine-tuned adapter and how the run went."""

    adapter: AdapterWeights
    train: TrainResult


def lora_settings_of(adapter: AdapterWeights) -> LoraSettings:
    """The LoRA settings that recreate ``adapter``'s shape (rank, alpha, adapted layer kinds)."""
    ranks = {f.rank for f in adapter.factors.values()}
    if ranks != {adapter.r}:
        raise AdapterError(f"adapter has per-layer ranks {sorted(ranks)}; fine-tuning needs one rank {adapter.r}")
    kinds = tuple(sorted({m.rsplit(".", 1)[-1] for m in adapter.factors}))
    return LoraSettings(r=adapter.r, alpha=adapter.alpha, dropout=0.0, target_modules=kinds)


def load_own(patch: ChainPatch, current: AdapterWeights) -> None:
    own = {name for name, layer in patch.layers.items() if layer.lora_A is not None}
    if own != set(current.factors):
        raise AdapterError(
            f"the node's adapter adapts {sorted(current.factors)}, its layer kinds select {sorted(own)} in this base"
        )
    with torch.no_grad():
        for name, factors in current.factors.items():
            layer = patch.layers[name]
            assert layer.lora_A is not None and layer.lora_B is not None  # an own layer (checked above)
            layer.lora_A.copy_(factors.A.to(layer.lora_A.dtype))
            layer.lora_B.copy_(factors.B.to(layer.lora_B.dtype))


def fine_tune(
    model: torch.nn.Module,
    ancestors: Sequence[AdapterWeights],
    current: AdapterWeights,
    tokens: torch.Tensor,
    settings: TrainSettings,
) -> FineTuneResult:
    """Continue training ``current`` over the frozen ``ancestors`` on ``tokens`` ([n] token ids).

    ``model`` is patched only for the duration of the call. Deterministic for a given seed.
    """
    if tokens.numel() < settings.max_seq_len + 1:
        raise BuildError(
            f"the training text has {tokens.numel()} tokens, fewer than one sequence of "
            f"{settings.max_seq_len + 1}; add text or lower max_seq_len"
        )
    with ChainPatch(model, list(ancestors), lora_settings_of(current), seed=settings.seed) as patch:
        load_own(patch, current)
        result = train_adapter(model, patch, tokens, None, settings, _NO_GUARD)
        trained = patch.own_adapter()
    model.eval()
    return FineTuneResult(trained, result)


def increment(current: AdapterWeights, new: AdapterWeights) -> dict[str, LoraFactors]:
    """``new - current`` per layer, exactly, as factors of rank r_new + r_current (scale 1).

    [s' B' | -s B] @ [A'; A] = s' B' A' - s B A: nothing is approximated.
    """
    if set(current.factors) != set(new.factors):
        raise AdapterError(f"the new adapter adapts {sorted(new.factors)}, the current one {sorted(current.factors)}")
    out: dict[str, LoraFactors] = {}
    for module in sorted(new.factors):
        n, c = new.factors[module], current.factors[module]
        if (n.out_features, n.in_features) != (c.out_features, c.in_features):
            raise AdapterError(
                f"layer {module} is {n.out_features}x{n.in_features} in the new adapter, "
                f"{c.out_features}x{c.in_features} in the current one"
            )
        a = torch.cat([n.A, c.A.to(n.A.dtype)], dim=0)
        b = torch.cat([n.scale * n.B, -c.scale * c.B.to(n.B.dtype)], dim=1)
        out[module] = LoraFactors(A=a, B=b, scale=1.0)
    return out


@torch.no_grad()
def chain_perplexity(
    model: torch.nn.Module, chain: Sequence[AdapterWeights], tokens: torch.Tensor, seq_len: int
) -> float:
    """Perplexity of ``tokens`` under the base with ``chain`` applied (exact W0 + sum s_i B_i A_i)."""
    if not chain:
        return perplexity(model, tokens, seq_len)
    with ChainPatch(model, list(chain)):
        return perplexity(model, tokens, seq_len)
