"""Re-fit a node's adapter so its effective model matches teachers' next-token distributions.

    result = distill(model, ancestors, own, [Target(tokens, teacher_chain, 1.0), Target(tokens, None, 0.5)], settings)

The student is ``ancestors`` (frozen) plus the node's own adapter, trainable from ``own``. Each
target is a token stream and either a *teacher* chain (loss: KL(teacher || student) per token,
the teacher's distribution computed by the same base with the teacher's chain in place of the
student's, no gradients) or None (loss: the student's own next-token cross-entropy). Used for

- **rebasing** a child over its parent's new version: ancestors = the new parent chain, own = the
  child's adapter, targets = (child's text, old effective chain) + (child's text, LM);
- **consolidating** a merged candidate parent: ancestors = the grand-parent chain, own = the
  candidate, targets = (updating children's texts, the merged candidate's chain) + (the parent's
  and siblings' texts, the parent's current chain): learn the update, forget nothing else.

Deterministic for a given ``settings.seed`` (data order).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hierarchy.chain import flatten_chain, refit_over
from hierarchy.spec import TrainSettings
from nodes.build.compose import chain_by_module
from nodes.build.finetune import FineTuneResult, load_own, lora_settings_of
from nodes.build.training import ChainLinear, ChainPatch, TrainResult
from nodes.errors import AdapterError, BuildError
from nodes.store.adapters import AdapterWeights

__all__ = ["Target", "distill", "refit_adapter"]


@dataclass(frozen=True)
class Target:
    """One stream to fit: towards ``teacher``'s distributions (a chain), or its own text when None."""

    tokens: torch.Tensor  # [n] token ids
    teacher: Sequence[AdapterWeights] | None
    weight: float = 1.0
    # Frozen adapters added to the student's chain for this stream only (a sibling's own adapter
    # over a parent being consolidated: its effective model is what must not move).
    around: Sequence[AdapterWeights] = ()


def refit_adapter(
    own: AdapterWeights, old: Sequence[AdapterWeights], new: Sequence[AdapterWeights]
) -> tuple[AdapterWeights, float]:
    """``own`` (trained over the chain ``old``) re-expressed over the chain ``new`` at its own rank,
    layer by layer (hierarchy.chain.refit_over): the start of a rebase. The chains are additive in
    weight space, so the fit is exact up to what the rank cut leaves out; the distillation that
    follows corrects that and what the own layers cannot carry (a parent's change in a layer the
    child does not adapt). Returns the adapter and the largest relative error of a layer's fit."""
    old_by, new_by = chain_by_module(old), chain_by_module(new)
    factors, worst = {}, 0.0
    for name, mine in own.factors.items():
        factors[name], error = refit_over(mine, old_by.get(name, []), new_by.get(name, []), own.r)
        worst = max(worst, error)
    return AdapterWeights(own.r, own.alpha, own.target_modules, factors, own.dropout), worst


Frozen = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


def _frozen_of(patch: ChainPatch, chain: Sequence[AdapterWeights]) -> Frozen:
    by_module = chain_by_module(chain)
    outside = sorted(set(by_module) - set(patch.layers))
    if outside:
        raise AdapterError(f"the teacher adapts {outside[:3]}, which the student's chain does not")
    out: Frozen = {}
    for name, layer in patch.layers.items():
        if name in by_module:
            flat = flatten_chain(by_module[name])
            out[name] = (flat.A.to(layer.weight.dtype), flat.B.to(layer.weight.dtype))
        else:
            out[name] = (None, None)
    return out


def _set_frozen(patch: ChainPatch, frozen: Frozen) -> None:
    layers: dict[str, ChainLinear] = patch.layers
    for n, layer in layers.items():
        layer.frozen_a, layer.frozen_b = frozen[n]


@torch.no_grad()
def _teacher_logits(model, patch: ChainPatch, frozen: Frozen, inputs: torch.Tensor) -> torch.Tensor:
    """The teacher chain's logits: its factors in place of the frozen ones, the own term off."""
    _set_frozen(patch, frozen)
    patch.set_own_enabled(False)
    try:
        return model(input_ids=inputs, use_cache=False).logits.float()
    finally:
        patch.set_own_enabled(True)


def distill(
    model: torch.nn.Module,
    ancestors: Sequence[AdapterWeights],
    own: AdapterWeights,
    targets: Sequence[Target],
    settings: TrainSettings,
) -> FineTuneResult:
    """Train ``own`` over the frozen ``ancestors`` on ``targets`` (see the module docstring)."""
    length = settings.max_seq_len + 1
    live = [t for t in targets if t.weight > 0]
    if not live:
        raise BuildError("nothing to distill: every target has weight 0")
    for t in live:
        if t.tokens.numel() < length:
            raise BuildError(f"a distillation text has {t.tokens.numel()} tokens, fewer than one sequence ({length})")
    rows = max(1, settings.batch_size // len(live))
    generator = torch.Generator().manual_seed(settings.seed + 1)
    losses: list[float] = []
    started = time.perf_counter()
    with ChainPatch(model, list(ancestors), lora_settings_of(own), seed=settings.seed) as patch:
        load_own(patch, own)
        teachers = [None if t.teacher is None else _frozen_of(patch, t.teacher) for t in live]
        students = [_frozen_of(patch, [*ancestors, *t.around]) for t in live]
        params = patch.own_parameters()
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        model.train()
        for step in range(settings.steps):
            total = torch.zeros(())
            for target, frozen, student_frozen in zip(live, teachers, students, strict=True):
                starts = torch.randint(0, target.tokens.numel() - length + 1, (rows,), generator=generator)
                batch = torch.stack([target.tokens[int(s) : int(s) + length] for s in starts])
                inputs = batch[:, :-1]
                # The teacher first (it swaps the frozen factors), then the student's own frozen chain.
                teacher_logits = None if frozen is None else _teacher_logits(model, patch, frozen, inputs)
                _set_frozen(patch, student_frozen)
                logits = model(input_ids=inputs, use_cache=False).logits.float()
                if teacher_logits is None:
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
                else:
                    teacher = F.log_softmax(teacher_logits, dim=-1)
                    student = F.log_softmax(logits, dim=-1)
                    loss = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
                total = total + target.weight * loss
            if not torch.isfinite(total):
                raise BuildError(f"distillation diverged at step {step + 1} (loss {total.item()}); lower its lr")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(total.item()))
        model.eval()
        _set_frozen(patch, _frozen_of(patch, ancestors))
        trained = patch.own_adapter()
    k = max(1, len(losses) // 10)
    n_tokens = settings.steps * rows * len(live) * settings.max_seq_len
    result = TrainResult(
        settings.steps, n_tokens, sum(losses[:k]) / k, sum(losses[-k:]) / k, time.perf_counter() - started, "fp32"
    )
    return FineTuneResult(trained, result)
