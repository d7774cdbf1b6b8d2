"""Per-row next-token choice for a mixed batch: each row its own settings, RNG and state.

A row may be greedy or sampled (temperature, top-k, top-p, its own seeded generator), carry
presence/frequency penalties, a logit bias, a grammar (structured output) and ask for logprobs.
The scheduler builds a :class:`SamplingBatch` whenever the batch's rows change; it records which
rows use which feature, so that a step whose rows are all plain greedy is one ``argmax``, as it
was before these features existed, and every feature touches only the rows that use it:

- logits that change (bias, penalties, grammar) or are sampled are copied out for those rows only;
- penalties: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence`` over the row's own
  generated tokens; the term of every penalised row is one [Q, V] tensor, computed when the batch
  changes and then updated at the one token each row picks, so a step subtracts it in one pass;
- grammar rows: one bitmask fill per row (llguidance), one masked fill for all of them;
- logprobs: one ``log_softmax`` + ``topk`` over the raw logits of the rows that asked.

When every row is processed the logits are worked on in place (no copy, no second argmax).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nodes.runtime.grammar import RowGrammar, apply_bitmask, bitmask_words
from nodes.runtime.logprobs import LogprobRecord, step_logprobs
from nodes.runtime.requests import SamplingParams

__all__ = [
    "Constraints",
    "Penalties",
    "RowSampler",
    "SamplingBatch",
    "choice_seed",
    "make_generator",
    "next_tokens",
    "penalised_scores",
]


def choice_seed(seed: int, choice: int) -> int:
    """Choice 0 keeps the request's seed (n=1 behaves as before); choice i gets a seed of its own."""
    if choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def make_generator(params: SamplingParams, choice: int = 0) -> torch.Generator | None:
    """A row's own RNG (seeded when ``params.seed`` is set); None for greedy decoding."""
    if params.greedy:
        return None
    seed = choice_seed(params.seed, choice) if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def penalised_scores(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: ``logits - counts * frequency - (counts > 0) * presence`` ([Q, V]; [Q, 1] each)."""
    return logits - (counts * frequency + (counts > 0).to(counts.dtype) * presence)


class RowSampler:
    """One row's decoding settings and state (owned by the model thread)."""

    def __init__(self, params: SamplingParams, choice: int, vocab_size: int, grammar: RowGrammar | None = None):
        self.params = params
        self.generator = make_generator(params, choice)
        self.grammar = grammar
        # Generated-token counts [V]; a view into the batch's [Q, V] tensor once batched.
        self.counts: torch.Tensor | None = torch.zeros(vocab_size) if params.penalised else None
        self.top = params.top_logprobs if params.logprobs else -1  # -1: no logprobs
        self.processed = bool(params.penalised or params.logit_bias or grammar is not None or not params.greedy)
        self.plain = not self.processed and self.top < 0


def _index(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


@dataclass
class Penalties:
    """The penalised rows of a batch (positions are among its processed rows)."""

    positions: torch.Tensor  # [Q] int64
    counts: torch.Tensor  # [Q, V] generated-token counts; each row's `counts` is a view of its line
    frequency: torch.Tensor  # [Q, 1]
    presence: torch.Tensor  # [Q, 1]
    # [Q, V] what to subtract: penalised_scores' term, built once, then updated at the one token a row picks
    penalty: torch.Tensor
    lines: torch.Tensor  # [Q] int64 arange, for the per-step updates


@dataclass
class Constraints:
    """The constrained rows of a batch (positions are among its processed rows)."""

    positions: tuple[int, ...]  # G positions
    grammars: tuple[RowGrammar, ...]  # G matchers
    bitmask: torch.Tensor  # [G, W] int32 allowed-token bits, refilled every step


@dataclass
class SamplingBatch:
    """Which rows of a batch use which feature (built when the batch's rows change)."""

    rows: tuple[RowSampler, ...]
    plain: bool  # every row is greedy without any feature: one argmax
    processed: torch.Tensor | None = None  # [P] rows whose logits change or are sampled
    processed_rows: tuple[RowSampler, ...] = ()  # [P] their samplers
    everything: bool = False  # every row is processed (no copy-out, no argmax of the raw logits)
    sampled_pos: tuple[int, ...] = ()  # positions in `processed` that sample (the others take the argmax)
    bias: torch.Tensor | None = None  # [P, V] additive logit bias (zero lines for rows without)
    penalties: Penalties | None = None
    constraints: Constraints | None = None
    logprob_rows: torch.Tensor | None = None  # [L] rows that want logprobs
    tops: tuple[int, ...] = ()  # [L] alternatives each of them wants

    @classmethod
    def build(cls, rows: Sequence[RowSampler], vocab_size: int) -> SamplingBatch:
        rows = tuple(rows)
        batch = cls(rows=rows, plain=all(r.plain for r in rows))
        if batch.plain:
            return batch
        proc = [i for i, r in enumerate(rows) if r.processed]
        if proc:
            subset = tuple(rows[i] for i in proc)
            batch.processed = _index(proc)
            batch.processed_rows = subset
            batch.everything = len(proc) == len(rows)
            batch.sampled_pos = tuple(p for p, r in enumerate(subset) if not r.params.greedy)
            if any(r.params.logit_bias for r in subset):
                batch.bias = torch.zeros(len(subset), vocab_size)
                for p, r in enumerate(subset):
                    for token, value in r.params.logit_bias:
                        batch.bias[p, token] = value
            batch.penalties = _penalties(subset)
            constrained = [(p, r.grammar) for p, r in enumerate(subset) if r.grammar is not None]
            if constrained:
                batch.constraints = Constraints(
                    positions=tuple(p for p, _ in constrained),
                    grammars=tuple(g for _, g in constrained),
                    bitmask=torch.zeros(len(constrained), bitmask_words(vocab_size), dtype=torch.int32),
                )
        wants = [i for i, r in enumerate(rows) if r.top >= 0]
        if wants:
            batch.logprob_rows = _index(wants)
            batch.tops = tuple(rows[i].top for i in wants)
        return batch


def _penalties(subset: Sequence[RowSampler]) -> Penalties | None:
    lines = [(p, r, r.counts) for p, r in enumerate(subset) if r.counts is not None]
    if not lines:
        return None
    counts = torch.stack([c for _, _, c in lines])
    for q, (_, row, _) in enumerate(lines):
        row.counts = counts[q]  # the row keeps its counts across batches through this view
    frequency = torch.tensor([[r.params.frequency_penalty] for _, r, _ in lines])
    presence = torch.tensor([[r.params.presence_penalty] for _, r, _ in lines])
    return Penalties(
        positions=_index([p for p, _, _ in lines]),
        counts=counts,
        frequency=frequency,
        presence=presence,
        penalty=counts * frequency + (counts > 0).to(counts.dtype) * presence,
        lines=torch.arange(len(lines)),
    )


def _count(pen: Penalties, chosen: torch.Tensor) -> None:
    """Count each penalised row's new token and update its penalty at that token only.

    ``count * frequency + presence`` for a count > 0 is, bit for bit, penalised_scores' term.
    """
    pen.counts.index_put_((pen.lines, chosen), torch.ones(len(chosen)), accumulate=True)
    counts = pen.counts[pen.lines, chosen]
    pen.penalty[pen.lines, chosen] = counts * pen.frequency[:, 0] + pen.presence[:, 0]


def _filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of scores [V]."""
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


def _processed_tokens(logits: torch.Tensor, batch: SamplingBatch, processed: torch.Tensor) -> torch.Tensor:
    """The chosen tokens [P] of the processed rows: bias, penalties, grammar, then argmax or a sample."""
    if batch.everything:  # every row: work on the logits themselves, unless logprobs still need them raw
        scores = logits.float()
        if batch.logprob_rows is not None and scores.data_ptr() == logits.data_ptr():
            scores = scores.clone()
    else:
        scores = logits.index_select(0, processed).float()  # a copy: the raw logits stay for logprobs
    if batch.bias is not None:
        scores += batch.bias
    pen = batch.penalties
    if pen is not None:  # scores - penalty, in place (penalised_scores' formula, kept up to date per row)
        scores.index_add_(0, pen.positions, pen.penalty, alpha=-1.0)
    con = batch.constraints
    if con is not None:
        for g, grammar in enumerate(con.grammars):
            grammar.fill(con.bitmask, g)
        apply_bitmask(scores, con.positions, con.bitmask)
    picks = scores.argmax(dim=-1)
    for p in batch.sampled_pos:
        row = batch.processed_rows[p]
        filtered = _filtered_logits(scores[p], row.params).nan_to_num(nan=float("-inf"))
        if not torch.isfinite(filtered).any():  # a broken row (NaN logits) must not fail the whole batch
            continue
        picks[p] = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=row.generator)[0]
    return picks


def next_tokens(logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[int], list[LogprobRecord | None] | None]:
    """Every row's next token (``logits`` [B, V], raw), and logprob records for the rows that asked.

    ``logits`` may be changed in place when every row is processed and none wants logprobs.
    """
    logits = logits.float()  # a bf16/int8 model's logits: sample and score in fp32 (a no-op for fp32)
    if batch.plain:
        return logits.argmax(dim=-1).tolist(), None
    if batch.processed is None:
        tokens = logits.argmax(dim=-1)
    else:
        picks = _processed_tokens(logits, batch, batch.processed)
        if batch.everything:
            tokens = picks
        else:
            tokens = logits.argmax(dim=-1)
            tokens.index_copy_(0, batch.processed, picks)
        if batch.penalties is not None:
            _count(batch.penalties, picks.index_select(0, batch.penalties.positions))
        if batch.constraints is not None:
            picked = picks.tolist()
            for p, grammar in zip(batch.constraints.positions, batch.constraints.grammars, strict=True):
                grammar.consume(picked[p])
    records: list[LogprobRecord | None] | None = None
    if batch.logprob_rows is not None:
        every = len(batch.tops) == len(batch.rows)
        rows = None if every else batch.logprob_rows
        chosen = tokens if every else tokens.index_select(0, batch.logprob_rows)
        found = step_logprobs(logits, rows, chosen, batch.tops)
        records = [None] * len(batch.rows)
        for i, record in zip(batch.logprob_rows.tolist(), found, strict=True):
            records[i] = record
    return tokens.tolist(), records
