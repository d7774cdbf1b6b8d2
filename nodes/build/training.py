"""Train one node's LoRA adapter over its parent's effective model, and measure perplexity.

The model is patched in place: every adapted ``nn.Linear`` becomes a
:class:`ChainLinear` that computes

    y = x W0^T + x A_anc^T B_anc^T + s * dropout(x) A^T B^T

where ``A_anc``/``B_anc`` are the node's ancestors flattened into one frozen
low-rank pair (exact: ``B_anc A_anc = sum_i s_i B_i A_i``, see hierarchy.chain)
and ``A``/``B`` are the node's own trainable factors. The saved adapter is the
plain PEFT factors (A, B, alpha / r), so the node's effective weight is exactly
``W0 + sum_i s_i B_i A_i`` over its chain. Switching the own term off gives the
parent's effective model, which is what perplexity, replay KL and the
forgetting guard compare against.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hierarchy.chain import LoraFactors, flatten_chain
from hierarchy.spec import GuardSettings, LoraSettings, TrainSettings
from nodes.build.compose import chain_by_module
from nodes.errors import AdapterError, BuildError
from nodes.store.adapters import AdapterWeights

__all__ = [
    "PRECISIONS",
    "ChainLinear",
    "ChainPatch",
    "TrainResult",
    "perplexity",
    "resolve_precision",
    "tokenize_text",
    "train_adapter",
]

PRECISIONS = ("auto", "fp32", "bf16")
# Bases smaller than this train in fp32 even when bf16 is available: no speed to gain.
_BF16_MIN_PARAMS = 20_000_000


def resolve_precision(precision: str, model: nn.Module) -> str:
    """``auto`` -> ``bf16`` autocast on CPUs with native bf16 for real-sized bases, else ``fp32``."""
    if precision not in PRECISIONS:
        raise BuildError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    n_params = sum(p.numel() for p in model.parameters())
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        native = False
    return "bf16" if native and n_params >= _BF16_MIN_PARAMS else "fp32"


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream, [n_tokens] int64 (documents joined by the EOS token)."""
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- the chain patch


class ChainLinear(nn.Module):
    """A frozen linear layer plus its ancestors' frozen low-rank term and an optional own LoRA."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.frozen_a: torch.Tensor | None = None  # [R_anc, in_features], ancestors' A stacked
        self.frozen_b: torch.Tensor | None = None  # [out_features, R_anc], ancestors' scale * B stacked
        self.lora_A: nn.Parameter | None = None  # [r, in_features]
        self.lora_B: nn.Parameter | None = None  # [out_features, r]
        self.scale = 1.0
        self.dropout: nn.Module = nn.Identity()
        self.own_enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some HF code inspects .weight (dtype, device)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.frozen_a is not None and self.frozen_b is not None:
            y = y + F.linear(F.linear(x, self.frozen_a.to(x.dtype)), self.frozen_b.to(x.dtype))
        if self.lora_A is not None and self.lora_B is not None and self.own_enabled:
            y = y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return y


class ChainPatch:
    """Replaces a model's adapted linear layers with :class:`ChainLinear`; ``remove()`` undoes it.

    ``chain`` holds the ancestors' adapters (applied, frozen); ``own`` (optional)
    adds a fresh trainable LoRA initialised from ``seed`` like PEFT (A Kaiming-uniform, B zero).
    """

    def __init__(
        self,
        model: nn.Module,
        chain: Sequence[AdapterWeights],
        own: LoraSettings | None = None,
        *,
        seed: int = 0,
    ):
        self.model = model
        self.own = own
        self._originals: dict[str, nn.Linear] = {}
        self.layers: dict[str, ChainLinear] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        modules = dict(model.named_modules())
        by_module = chain_by_module(chain)
        targets = set(by_module)
        if own is not None:
            targets |= {
                n for n, m in modules.items() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in own.target_modules
            }
        generator = torch.Generator().manual_seed(seed)
        try:
            for name in sorted(targets):
                layer = modules.get(name)
                if not isinstance(layer, nn.Linear):
                    raise AdapterError(f"the chain targets {name}, which is not a linear layer of the base")
                wrapped = ChainLinear(layer)
                if name in by_module:
                    flat = flatten_chain(by_module[name])
                    if flat.in_features != layer.in_features or flat.out_features != layer.out_features:
                        raise AdapterError(
                            f"adapter for {name} is {flat.out_features}x{flat.in_features}, "
                            f"the base layer is {layer.out_features}x{layer.in_features}"
                        )
                    wrapped.frozen_a = flat.A.to(layer.weight.dtype)
                    wrapped.frozen_b = flat.B.to(layer.weight.dtype)
                if own is not None and name.rsplit(".", 1)[-1] in own.target_modules:
                    a = torch.empty(own.r, layer.in_features)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                    wrapped.lora_A = nn.Parameter(a)
                    wrapped.lora_B = nn.Parameter(torch.zeros(layer.out_features, own.r))
                    wrapped.scale = own.scale
                    wrapped.dropout = nn.Dropout(own.dropout) if own.dropout > 0 else nn.Identity()
                self._swap(name, wrapped)
                self._originals[name] = layer
                self.layers[name] = wrapped
        except BaseException:
            self.remove()
            raise

    def _swap(self, name: str, module: nn.Module) -> None:
        parent_name, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, attr, module)

    def own_parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for layer in self.layers.values():
            if layer.lora_A is not None and layer.lora_B is not None:
                out.extend([layer.lora_A, layer.lora_B])
        return out

    def set_own_enabled(self, enabled: bool) -> None:
        """Off: the model is exactly the parent's effective model."""
        for layer in self.layers.values():
            layer.own_enabled = enabled

    def own_adapter(self) -> AdapterWeights:
        """The trained own factors as a PEFT-ready adapter (copies, detached)."""
        if self.own is None:
            raise AdapterError("this patch has no own adapter")
        factors = {
            name: LoraFactors(A=layer.lora_A.detach().clone(), B=layer.lora_B.detach().clone(), scale=self.own.scale)
            for name, layer in self.layers.items()
            if layer.lora_A is not None and layer.lora_B is not None
        }
        return AdapterWeights(
            r=self.own.r,
            alpha=self.own.alpha,
            target_modules=self.own.target_modules,
            factors=factors,
            dropout=self.own.dropout,
        )

    def remove(self) -> None:
        """Put the original linear layers back (idempotent)."""
        for name, layer in self._originals.items():
            self._swap(name, layer)
        self._originals.clear()
        self.layers.clear()

    def __enter__(self) -> ChainPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainResult:
    """What one node's training run did."""

    steps: int
    tokens: int  # training tokens seen (own + replay)
    first_loss: float  # mean loss over the first 10% of steps
    last_loss: float  # mean loss over the last 10% of steps
    seconds: float
    precision: str


def planned_steps(settings: TrainSettings, n_tokens: int) -> int:
    """``steps``, or ``ceil(epochs * tokens / tokens per step)`` when ``epochs`` is set."""
    if settings.epochs is None:
        return settings.steps
    per_step = settings.batch_size * settings.max_seq_len
    return max(1, math.ceil(settings.epochs * n_tokens / per_step))


def _lr_at(step: int, total: int, lr: float) -> float:
    # Linear warm-up over the first 10% (at most 10 steps), then linear decay to 10% of lr.
    warm = min(10, max(1, total // 10))
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return lr * (1.0 - 0.9 * frac)


def _windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """[len(starts), length] windows of ``stream`` (1-D) starting at ``starts``."""
    return torch.stack([stream[int(s) : int(s) + length] for s in starts])


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def train_adapter(
    model: nn.Module,
    patch: ChainPatch,
    own: torch.Tensor,
    replay: torch.Tensor | None,
    settings: TrainSettings,
    guard: GuardSettings,
    *,
    precision: str = "fp32",
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train ``patch``'s own LoRA on ``own`` tokens ([n]) with a ``guard.replay`` share of ``replay`` tokens.

    Loss: causal-LM cross-entropy on every row; plus ``guard.kl_weight`` x KL(child || parent)
    on the replayed rows (the parent is the same model with the own term switched off).
    Deterministic for a given ``settings.seed`` (data order, init, dropout).
    """
    length = settings.max_seq_len + 1  # inputs and next-token targets
    if own.numel() < length:
        raise BuildError(f"training text has {own.numel()} tokens, fewer than one sequence ({length})")
    if replay is not None and replay.numel() < length:
        replay = None  # too short to replay; the KL/replay guard is then off for this node
    total = planned_steps(settings, int(own.numel()))
    params = patch.own_parameters()
    if not params:
        raise BuildError("the node's LoRA adapts no layer of the base (check lora.target_modules)")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    data_rng = torch.Generator().manual_seed(settings.seed + 1)
    replay_share = guard.replay if replay is not None else 0.0
    losses: list[float] = []
    tokens = 0
    model.train()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 2)  # dropout
        for step in range(total):
            # Exact replay share over the run: rows so far = round(steps * batch * share).
            n_replay = round((step + 1) * settings.batch_size * replay_share) - round(
                step * settings.batch_size * replay_share
            )
            n_replay = min(n_replay, settings.batch_size - 1)
            n_own = settings.batch_size - n_replay
            rows = [_windows(own, torch.randint(0, own.numel() - length + 1, (n_own,), generator=data_rng), length)]
            if n_replay and replay is not None:
                starts = torch.randint(0, replay.numel() - length + 1, (n_replay,), generator=data_rng)
                rows.append(_windows(replay, starts, length))
            batch = torch.cat(rows)  # [batch_size, max_seq_len + 1]
            inputs, targets = batch[:, :-1], batch[:, 1:]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, settings.lr)
            with _autocast(precision):
                logits = model(input_ids=inputs, use_cache=False).logits.float()  # [B, T, vocab]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            if n_replay and guard.kl_weight > 0:
                loss = loss + guard.kl_weight * _kl_to_parent(model, patch, inputs[n_own:], logits[n_own:], precision)
            if not torch.isfinite(loss):
                raise BuildError(f"training diverged at step {step + 1} (loss {loss.item()}); lower training.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.item()))
            tokens += batch.numel() - batch.shape[0]
            if on_step is not None:
                on_step(step + 1, total, losses[-1])
    model.eval()
    k = max(1, total // 10)
    return TrainResult(
        steps=total,
        tokens=tokens,
        first_loss=sum(losses[:k]) / k,
        last_loss=sum(losses[-k:]) / k,
        seconds=time.perf_counter() - started,
        precision=precision,
    )


def _kl_to_parent(model, patch: ChainPatch, inputs, child_logits, precision: str) -> torch.Tensor:
    """KL(child || parent) per token, averaged, on the replayed rows."""
    patch.set_own_enabled(False)
    try:
        with torch.no_grad(), _autocast(precision):
            parent_logits = model(input_ids=inputs, use_cache=False).logits.float()
    finally:
        patch.set_own_enabled(True)
    child_log = F.log_softmax(child_logits, dim=-1)
    parent_log = F.log_softmax(parent_logits, dim=-1)
    return F.kl_div(parent_log, child_log, log_target=True, reduction="none").sum(-1).mean()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def perplexity(model: nn.Module, stream: torch.Tensor, seq_len: int, *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over ``stream`` ([n] tokens), in windows of ``seq_len`` predictions.

    Windows overlap by one token so every token but the first is predicted exactly once (fp32).
    """
    n = int(stream.numel())
    if n < 2:
        raise BuildError("evaluation text has fewer than 2 tokens")
    windows = [stream[i : i + seq_len + 1] for i in range(0, n - 1, seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    # Full-length windows batch together; the ragged last one runs alone.
    full = [w for w in windows if w.numel() == seq_len + 1]
    ragged = [w for w in windows if w.numel() != seq_len + 1]
    groups = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    groups += [w.unsqueeze(0) for w in ragged]
    for group in groups:  # [b, t + 1]
        logits = model(input_ids=group[:, :-1], use_cache=False).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), group[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += group[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
