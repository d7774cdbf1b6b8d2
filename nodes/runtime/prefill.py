"""Prefill on the engine's model thread: how admitted prompts become running rows.

Three ways in, all exact (the same tokens as one whole prompt in one forward):

- a prompt whose block-aligned prefix is in the prefix cache (:mod:`nodes.runtime.prefix`, keyed by
  the chain's exact versions) continues from those keys and values, in a forward of its own;
- a prompt longer than ``Limits.prefill_chunk`` (beyond what the cache gave) is prefilled a chunk
  per scheduler step, between the running rows' decode steps, so that one long prompt does not
  freeze every other row (with no row decoding, the rest goes in one forward);
- the others share one left-padded forward (the echo rows with their prompt logprobs).

Each prefilled prompt offers its prefix to the cache, then joins the running batch (:meth:`_start`),
its KV row forked into one row per choice. :class:`Prefill` is the scheduler's half that does
this; the attributes it uses are the scheduler's (annotated below).
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nodes.errors import EngineError
from nodes.runtime.bank import AdapterBank
from nodes.runtime.jobs import Job, Row
from nodes.runtime.kv import BatchKV, left_pad_batch, positions
from nodes.runtime.logprobs import prompt_logprobs
from nodes.runtime.plan import BankBatch
from nodes.runtime.prefix import PrefixCache, PrefixHit, chain_key
from nodes.runtime.requests import Echo, FinishReason
from nodes.runtime.sampling import SamplingBatch

__all__ = ["PartialPrefill", "Prefill", "new_cache"]


class Prefill:
    """Prefill of admitted jobs (see the module docstring); mixed into the scheduler."""

    # The scheduler's state and methods this half uses.
    model: Any
    bank: AdapterBank
    prefix: PrefixCache
    pad_id: int
    vocab_size: int
    base_digest: str
    limits: Any
    counts: collections.Counter[str]
    running: list[Row]
    _kv: BatchKV | None
    _plan: BankBatch | None
    _partial: collections.deque[PartialPrefill]
    _fail: Callable[[Job, BaseException], None]
    _finish_row: Callable[..., None]
    _accept: Callable[[Sequence[Row], torch.Tensor, SamplingBatch], None]
    _emit: Callable[..., None]

    def _prefill(self, jobs: list[Job]) -> None:
        """Prompts with a cached prefix continue from it, one forward each; the rest share one forward."""
        fresh: list[Job] = []
        for job in jobs:
            hit = None
            if self.prefix.enabled and not job.params.echo:  # echo scores every prompt position: no reuse
                job.prefix_key = chain_key(self.base_digest, job.chain)
                hit = self.prefix.lookup(job.prefix_key, job.prompt_ids)
            chunk = self.limits.prefill_chunk
            if chunk and not job.params.echo and len(job.prompt_ids) - (hit.length if hit else 0) > chunk:
                self._partial.append(PartialPrefill(job, self._seeded_cache(hit), hit.length if hit else 0))
            elif hit is None:
                fresh.append(job)
            else:
                self._guarded([job], functools.partial(self._prefill_from, job, hit))
        if fresh:
            self._guarded(fresh, lambda: self._prefill_batch(fresh))

    def _guarded(self, jobs: list[Job], prefill: Callable[[], None]) -> None:
        try:
            prefill()
        except Exception as exc:  # only these newcomers fail; the running batch is untouched
            for job in jobs:
                self._fail(job, EngineError(f"prefill failed: {type(exc).__name__}: {exc}"))
            self._partial = collections.deque(p for p in self._partial if not p.job.finished)

    def _keep_prefixes(self, jobs: Sequence[Job], kv: BatchKV) -> None:
        """Offer each prompt's prefix to the prefix cache (row i's prompt is right-aligned in ``kv``)."""
        layers: list[Any] = list(kv.cache.layers)
        for i, job in enumerate(jobs):
            if job.prefix_key and self.prefix.wants(job.prompt_ids):
                start = kv.width - len(job.prompt_ids)
                keys = [layer.keys[i : i + 1, :, start:] for layer in layers]
                values = [layer.values[i : i + 1, :, start:] for layer in layers]
                self.prefix.store(job.prefix_key, job.prompt_ids, keys, values)

    def _seeded_cache(self, hit: PrefixHit | None) -> Any:
        cache = new_cache(self.model)
        if hit is not None:
            for layer, (keys, values) in enumerate(zip(hit.keys, hit.values, strict=True)):
                cache.update(keys, values, layer)  # concatenated into new tensors later: the entry stays intact
        return cache

    def _forward_one(self, job: Job, cache: Any, start: int, end: int) -> torch.Tensor:
        """Prompt tokens [start, end) of one job over its cache of the first ``start``; the last logits."""
        part = job.prompt_ids[start:end]
        with self.bank.use(self.bank.plan([job.keys], len(part))):
            out = self.model(
                input_ids=torch.tensor([part], dtype=torch.long),
                attention_mask=torch.ones((1, end), dtype=torch.long),
                position_ids=torch.arange(start, end).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.counts["prefill_batches"] += 1
        return out.logits[:, -1, :]

    def _prefill_from(self, job: Job, hit: PrefixHit) -> None:
        """Continue a prompt from its cached prefix: only the rest of it goes through the model."""
        cache = self._seeded_cache(hit)
        last = self._forward_one(job, cache, hit.length, len(job.prompt_ids))
        self._prefilled(job, cache, last)

    def _advance(self, partial: PartialPrefill) -> None:
        """The next chunk of a long prompt; the job joins the running rows after its last chunk."""
        # Chunks only protect rows that are decoding: with none, the rest goes in one forward.
        size = self.limits.prefill_chunk if self.running else len(partial.job.prompt_ids)
        end = min(partial.done + size, len(partial.job.prompt_ids))
        last = self._forward_one(partial.job, partial.cache, partial.done, end)
        partial.done = end
        if end == len(partial.job.prompt_ids):
            self._partial.popleft()
            self._prefilled(partial.job, partial.cache, last)

    def _prefilled(self, job: Job, cache: Any, last: torch.Tensor) -> None:
        self.counts["prompt_tokens"] += len(job.prompt_ids)
        kv = BatchKV(cache=cache, mask=torch.ones((1, len(job.prompt_ids)), dtype=torch.long))
        self._keep_prefixes([job], kv)  # a longer prompt extends what is cached (multi-turn chats)
        self._start([job], kv, last)

    def _prefill_batch(self, jobs: list[Job]) -> None:
        jobs.sort(key=lambda j: j.keys)  # rows sharing an adapter are contiguous (see nodes.runtime.plan)
        ids, mask = left_pad_batch([j.prompt_ids for j in jobs], self.pad_id)
        kv = BatchKV(cache=new_cache(self.model), mask=mask)
        plan = self.bank.plan([j.keys for j in jobs], ids.shape[1])
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
        with self.bank.use(plan):
            if any(j.params.echo for j in jobs):
                last = self._prefill_with_echo(jobs, inputs, kv)
            else:
                out = self.model(**inputs, past_key_values=kv.cache, use_cache=True, logits_to_keep=1)
                last = out.logits[:, -1, :]
        self.counts["prefill_batches"] += 1
        self.counts["prompt_tokens"] += sum(len(j.prompt_ids) for j in jobs)
        self._keep_prefixes(jobs, kv)
        self._start(jobs, kv, last)

    def _start(self, jobs: list[Job], kv: BatchKV, last: torch.Tensor) -> None:
        """Prefilled jobs (row i of ``kv`` and ``last``) join the running batch, one row per choice."""
        rows: list[Row] = []
        source: list[int] = []  # per row: its job's row in the prefill batch (its KV row to fork)
        for i, job in enumerate(jobs):
            if job.max_new == 0:  # echo only: scored, nothing to generate
                job.first_token_at = time.perf_counter()
                for row in job.rows:
                    self._finish_row(row, FinishReason.LENGTH)
                continue
            rows += job.rows
            source += [i] * len(job.rows)
        if not rows:
            return
        forked = len(source) != len(jobs)
        logits = last.index_select(0, torch.tensor(source)) if forked else last
        self._accept(rows, logits, SamplingBatch.build([r.sampler for r in rows], self.vocab_size))
        keep = [source[k] for k, row in enumerate(rows) if not row.finished]
        if not keep:
            return
        kv.keep(keep)  # repeated indices fork a prompt's KV into its choices' rows
        if self._kv is None or not self.running:
            self._kv = kv
        else:
            self._kv.merge(kv)
        self.running += [row for row in rows if not row.finished]
        self._plan = None

    def _prefill_with_echo(self, jobs: list[Job], inputs: dict[str, torch.Tensor], kv: BatchKV) -> torch.Tensor:
        """Decoder, then the head on every row's last position and on every position of echo rows only."""
        hidden = self.model.get_decoder()(**inputs, past_key_values=kv.cache, use_cache=True).last_hidden_state
        head = self.model.get_output_embeddings()
        width = hidden.shape[1]
        for i, job in enumerate(jobs):
            if not job.params.echo:
                continue
            prompt = job.prompt_ids
            records = None
            if job.params.logprobs:
                top = job.params.top_logprobs
                records = prompt_logprobs(head, hidden[i, width - len(prompt) : width - 1], prompt, top)
            logprobs = job.table.logprobs(records) if records is not None and job.table is not None else None
            job.echo = Echo(text=job.prompt_text, token_ids=tuple(prompt), logprobs=logprobs)
            if job.streaming:
                self._emit(job, None, "", (), echo=job.echo)
        return head(hidden[:, -1, :])


@dataclass
class PartialPrefill:
    """A long prompt being prefilled chunk by chunk: its cache holds the first ``done`` tokens."""

    job: Job
    cache: Any
    done: int


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
