"""Per-row next-token choice: greedy rows by argmax, sampled rows with their own settings and RNG."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from nodes.runtime.requests import SamplingParams

__all__ = ["choose_tokens", "make_generator"]


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A request's own RNG (seeded when ``params.seed`` is set); None for greedy decoding."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def _filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of logits [V]."""
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p  # keep the token that crosses p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    return scores


def choose_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The next token of every row; ``logits`` is [B, V], one row per sequence."""
    chosen = logits.argmax(dim=-1).tolist()  # greedy for every row at once; sampled rows are replaced below
    for row, (p, gen) in enumerate(zip(params, generators, strict=False)):
        if p.greedy:
            continue
        scores = _filtered_logits(logits[row], p).nan_to_num(nan=float("-inf"))
        if not torch.isfinite(scores).any():  # a broken row (NaN logits) must not fail the whole batch
            continue
        probs = torch.softmax(scores, dim=-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return chosen
