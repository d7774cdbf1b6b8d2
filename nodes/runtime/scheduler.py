"""Iteration-level batching on the engine's model thread.

Each iteration: drop cancelled and expired requests, admit waiting requests
(in the fair order of :mod:`nodes.runtime.fair`: deficit round robin over tenants, each within
its own limits; bounded by batch size, tokens in flight and free adapter slots), prefill the
newcomers (:mod:`nodes.runtime.prefill`: from a cached prefix, in chunks between decode steps,
or together in one left-padded forward), then run one decode step for every
running row (while several tenants have rows, each decodes at most ``step_rows`` of them per
step: :mod:`nodes.runtime.parking`). Requests join and leave between steps; the bank plan and the
sampling batch (which rows use which sampling feature) are rebuilt only when
the batch's composition changes.

A request with ``n`` choices is prefilled once, in one row; that row's KV is then
forked into n rows (one per choice). A prefill that holds ``echo`` requests runs the
decoder and the output head apart, so that those prompts' logprobs come from the same
forward while the other rows still get only their last position's logits.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from nodes.errors import (
    AdapterError,
    CacheFull,
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    InvalidRequest,
    NodesError,
    RequestCancelled,
    TenantOverLimit,
)
from nodes.runtime.bank import AdapterBank
from nodes.runtime.cache import AdapterCache
from nodes.runtime.fair import FairQueue
from nodes.runtime.jobs import Job, Row, Sink
from nodes.runtime.kv import BatchKV
from nodes.runtime.logprobs import LogprobRecord
from nodes.runtime.parking import Parking
from nodes.runtime.plan import BankBatch
from nodes.runtime.prefill import PartialPrefill, Prefill
from nodes.runtime.prefix import PrefixCache
from nodes.runtime.requests import FinishReason, TenantLimits
from nodes.runtime.sampling import SamplingBatch, next_tokens

__all__ = ["Job", "Limits", "Scheduler", "Sink"]


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_tokens_in_flight: int
    max_queue: int
    max_prefill_tokens: int
    tenant: TenantLimits = field(default_factory=TenantLimits)  # a tenant's share when its request carries no limits
    step_rows: int | None = None  # a tenant's rows per decode step while other tenants have rows (None: all)
    contended_running: int | None = None  # a tenant's requests admitted while other tenants are present (None: its max)
    prefill_chunk: int = 0  # a longer prompt is prefilled this many tokens per step, between decode steps (0: whole)


class Scheduler(Prefill):
    def __init__(
        self,
        model,
        bank: AdapterBank,
        cache: AdapterCache,
        limits: Limits,
        eos_ids: Sequence[int],
        pad_id: int,
        vocab_size: int,
        prefix: PrefixCache | None = None,
        base_digest: str = "",
    ):
        self.model = model
        self.prefix = prefix or PrefixCache(0)  # max_bytes 0: off
        self.base_digest = base_digest
        self.bank = bank
        self.cache = cache
        self.limits = limits
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self._cond = threading.Condition()
        self._waiting = FairQueue(limits.max_queue, limits.tenant, limits.contended_running)
        self._in_flight: dict[str, Job] = {}  # request id -> job, from submit until finished
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._closing = False
        self.running: list[Row] = []
        self._partial: collections.deque[PartialPrefill] = collections.deque()  # long prompts being prefilled in chunks
        self._kv: BatchKV | None = None
        self.parking = Parking(limits.step_rows)  # rows over their tenant's share of a step, waiting aside
        self._plan: BankBatch | None = None  # the bank's plan for the running rows; None when their composition changed
        self._sampling: SamplingBatch | None = None  # rebuilt with the plan
        self.tokens_in_flight = 0
        self.counts: collections.Counter[str] = collections.Counter()

    # -- any thread ----------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down; send the request to another replica")
            if job.request.request_id in self._in_flight:
                raise InvalidRequest(
                    "request_id", f"{job.request.request_id!r} is already in flight; ids must be unique"
                )
            try:
                evicted = self._waiting.push(job)
            except Exception:
                self.counts["rejected"] += 1
                raise
            self._in_flight[job.request.request_id] = job
            self.counts["submitted"] += 1
            self._cond.notify()
        if evicted is not None:  # a heavier tenant's newest request made room for this one
            self.counts["rejected"] += 1
            self._fail(
                evicted,
                TenantOverLimit("the queue is full and your tenant holds the most of it; retry later", 1.0),
            )

    def check_room(self, tenant: str | None, limits: TenantLimits | None) -> None:
        """Refuse a tenant at its own queue bound before its request is tokenized (cheap under a flood)."""
        with self._cond:
            try:
                self._waiting.check(tenant, limits)
            except TenantOverLimit:
                self.counts["rejected"] += 1
                raise

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the model thread between two steps (it owns the bank and the cache)."""
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def cancel(self, request_id: str) -> bool:
        with self._cond:
            job = self._in_flight.get(request_id)
            if job is None or job.finished:
                return False
            job.cancelled = True
            self._cond.notify()
            return True

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        rows = {id(row.job) for row in (*self.running, *self.parking.rows) if not row.finished}
        return len(rows) + len(self._partial)

    # -- the model thread ----------------------------------------------------
    def run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closing and self._idle():
                        self._cond.wait()
                    if self._closing:
                        break
                try:
                    progressed = self._iteration()
                except Exception as exc:  # a failed forward fails the batch, not the engine
                    self._fail_running(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                    progressed = True
                if not progressed:  # nothing could be admitted and nothing runs: wait, do not spin
                    with self._cond:
                        self._cond.wait(timeout=0.05)
        self._drain(EngineClosed("the engine was closed before the request finished"))

    def _idle(self) -> bool:
        return not self._waiting and not self.running and not self.parking and not self._partial and not self._calls

    def _iteration(self) -> bool:
        """One scheduling step; False when it could do nothing (e.g. every adapter slot is pinned)."""
        self._run_calls()
        self._reap()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)  # a failed prefill fails its newcomers only
        if self._partial:  # one chunk of one long prompt, then the running rows' step: they never wait long
            partial = self._partial[0]
            self._guarded([partial.job], functools.partial(self._advance, partial))
        self.running, self._kv, moved = self.parking.balance(self.running, self._kv)
        if moved:
            self._plan = None
        if self.running:
            self._decode()
        return bool(admitted or self.running or self._partial)

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # delivered to the caller
                    future.set_exception(exc)

    def _reap(self) -> None:
        now = time.time()
        with self._cond:
            for job in list(self._waiting):
                error: EngineError | None = None
                if job.cancelled:
                    error = RequestCancelled(f"request {job.request.request_id} was cancelled while queued")
                elif job.request.deadline is not None and now >= job.request.deadline:
                    error = DeadlineExceeded(f"request {job.request.request_id} passed its deadline while queued")
                if error is not None:
                    self._waiting.pop(job, admitted=False)
                    self._fail(job, error)
        for partial in list(self._partial):  # admitted, not yet running: no token was sent
            job = partial.job
            if job.cancelled or (job.request.deadline is not None and now >= job.request.deadline):
                self._partial.remove(partial)
                reason = FinishReason.CANCELLED if job.cancelled else FinishReason.DEADLINE
                for row in job.rows:
                    self._finish_row(row, reason)
        for row in [*self.running, *self.parking.rows]:  # parked rows end here too (parking drops them)
            job = row.job
            if job.cancelled:
                self._finish_row(row, FinishReason.CANCELLED)
            elif job.request.deadline is not None and now >= job.request.deadline:
                self._finish_row(row, FinishReason.DEADLINE)
        self._compact()

    def _admit(self) -> list[Job]:
        admitted: list[Job] = []
        rows = len(self.running) + len(self.parking)  # parked rows come back to the batch
        width = 0
        with self._cond:
            self._waiting.begin_round()
        while True:
            with self._cond:
                head = self._waiting.peek()
                if head is None:
                    break
                job = head
            if rows + len(job.rows) > self.limits.max_batch_size:
                break
            busy = self.running or admitted
            if busy and self.tokens_in_flight + job.budget > self.limits.max_tokens_in_flight:
                break
            new_width = max(width, len(job.prompt_ids))
            if admitted and new_width * (len(admitted) + 1) > self.limits.max_prefill_tokens:
                break
            try:
                job.keys = self.cache.acquire(job.chain)
            except CacheFull:
                break  # wait for a running request to release its adapters
            except Exception as exc:  # e.g. an adapter file changed on disk: this request fails, others go on
                with self._cond:
                    self._waiting.pop(job, admitted=False)
                if not isinstance(exc, NodesError):
                    exc = AdapterError(f"cannot load the adapters of {job.request.node}: {type(exc).__name__}: {exc}")
                self._fail(job, exc)
                continue
            with self._cond:
                self._waiting.pop(job, admitted=True)
            job.scheduled_at = time.perf_counter()
            self.tokens_in_flight += job.budget
            admitted.append(job)
            rows += len(job.rows)
            width = new_width
        return admitted

    def _decode(self) -> None:
        kv = self._running_kv()
        if self._plan is None or self._sampling is None:
            self._sort_running()
            self._plan = self.bank.plan([r.keys for r in self.running], 1)
            self._sampling = SamplingBatch.build([r.sampler for r in self.running], self.vocab_size)
        ids = torch.tensor([[r.generated[-1]] for r in self.running], dtype=torch.long)
        step_mask, pos = kv.step_inputs()
        with self.bank.use(self._plan):
            out = self.model(
                input_ids=ids,
                attention_mask=step_mask,
                position_ids=pos,
                past_key_values=kv.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        kv.after_step(step_mask)
        self.counts["decode_steps"] += 1
        self._accept(self.running, out.logits[:, -1, :], self._sampling)
        self._compact()

    def _accept(self, rows: Sequence[Row], logits: torch.Tensor, sampling: SamplingBatch) -> None:
        """Choose one token per row and deliver it; finished rows are marked (removed by _compact)."""
        tokens, records = next_tokens(logits, sampling)
        now = time.perf_counter()
        for k, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            job = row.job
            if job.first_token_at is None:
                job.first_token_at = now
            grammar = row.sampler.grammar
            if token in self.eos_ids and (not job.params.ignore_eos or grammar is not None):
                self._finish_row(row, FinishReason.STOP)
                continue
            if grammar is not None and grammar.error is not None:
                self._fail(job, EngineError(f"structured output failed: {grammar.error}"))
                continue
            row.generated.append(token)
            record = records[k] if records is not None else None
            if record is not None and row.logprobs is not None:
                row.logprobs.append(record)
            self.counts["tokens_generated"] += 1
            text = row.text.push(token)
            if row.text.stopped or (grammar is not None and grammar.done):
                self._finish_row(row, FinishReason.STOP, token, text, record)
            elif len(row.generated) >= job.max_new:
                self._finish_row(row, FinishReason.LENGTH, token, text, record)
            elif job.streaming:
                self._emit(job, row, text, (token,), (record,) if record is not None else ())

    def _compact(self) -> None:
        """Drop finished rows from the running batch and its KV cache."""
        keep = [i for i, row in enumerate(self.running) if not row.finished]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        self._plan = None
        if not self.running:
            self._kv = None
            self.bank.drop_stacks()  # idle: hold no stacked copies of adapters
        else:
            self._running_kv().keep(keep)

    def _sort_running(self) -> None:
        """Order rows by chain so that every adapter's rows form one contiguous range."""
        order = sorted(range(len(self.running)), key=lambda i: self.running[i].keys)
        if order != list(range(len(self.running))):
            self._running_kv().keep(order)
            self.running = [self.running[i] for i in order]

    def _running_kv(self) -> BatchKV:
        if self._kv is None:  # never while rows run: _prefill sets it, _compact clears it with the last row
            raise EngineError("the running batch has no KV cache")
        return self._kv

    # -- delivering ----------------------------------------------------------
    def _emit(
        self,
        job: Job,
        row: Row | None,
        text: str,
        token_ids: tuple[int, ...],
        records: Sequence[LogprobRecord] = (),
        **extra,
    ) -> None:
        if not job.sink.put(job.chunk(row, text, token_ids, records, **extra)):
            job.cancelled = True  # the listener is gone (client disconnected)

    def _finish_row(
        self,
        row: Row,
        reason: FinishReason,
        last_token: int | None = None,
        last_text: str = "",
        record: LogprobRecord | None = None,
    ) -> None:
        """End one choice; the job ends with its last open row (result, usage, freed slots)."""
        if row.finished:
            return
        row.finished = True
        row.finish_reason = reason
        job = row.job
        tail = last_text + row.text.flush()
        done = job.open_rows == 0
        now = time.perf_counter()
        if done:
            # Book-keeping first, so that a caller who sees the end also sees the freed slot in stats().
            job.finished = True
            self._release(job)
            self.counts["completed" if reason in (FinishReason.STOP, FinishReason.LENGTH) else reason.value] += 1
        if job.streaming:
            ids = (last_token,) if last_token is not None else ()
            extra = {"usage": job.usage(), "timings": job.timings(now)} if done else {}
            records = (record,) if record is not None else ()
            self._emit(job, row, tail, ids, records, finish_reason=reason, **extra)
        if done:
            job.sink.put(job.result(now))

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.finished:
            return
        job.finished = True
        for row in job.rows:
            row.finished = True
        self._release(job)
        self.counts["failed"] += 1
        job.sink.put(error)

    def _release(self, job: Job) -> None:
        with self._cond:
            self._in_flight.pop(job.request.request_id, None)
            if job.scheduled_at is not None:
                self._waiting.finished(job)
        if job.scheduled_at is not None and job.keys is not None:
            self.cache.release(job.keys)
            self.tokens_in_flight -= job.budget
            job.keys = ()

    def _fail_running(self, error: BaseException) -> None:
        self.running, self._kv = self.parking.unpark_all(self.running, self._kv)
        for row in self.running:
            self._fail(row.job, error)
        for partial in self._partial:
            self._fail(partial.job, error)
        self.running, self._kv, self._plan, self._sampling = [], None, None, None
        self._partial.clear()

    def _drain(self, error: BaseException) -> None:
        with self._cond:
            waiting = self._waiting.drain()
            calls, self._calls = list(self._calls), collections.deque()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for job in waiting:
            self._fail(job, error)
        self._fail_running(error)
