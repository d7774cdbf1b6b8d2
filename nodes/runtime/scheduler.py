"""Iteration-level batching on the engine's model thread.

Each iteration: drop cancelled and expired requests, admit waiting requests
(bounded by batch size, tokens in flight and free adapter slots), prefill the
newcomers in one left-padded forward, then run one decode step for every
running row. Requests join and leave between steps; the bank plan is rebuilt
only when the batch's composition changes.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from nodes.errors import (
    AdapterError,
    CacheFull,
    DeadlineExceeded,
    EngineClosed,
    EngineError,
    InvalidRequest,
    NodesError,
    QueueFull,
    RequestCancelled,
)
from nodes.runtime.bank import AdapterBank
from nodes.runtime.cache import AdapterCache
from nodes.runtime.kv import BatchKV, left_pad_batch, positions
from nodes.runtime.requests import FinishReason, GenerationRequest, GenerationResult, Timings, TokenChunk, Usage
from nodes.runtime.sampling import choose_tokens, make_generator
from nodes.runtime.textstream import TextStream
from nodes.store.tree import BuiltNode

__all__ = ["Job", "Limits", "Scheduler", "Sink"]


class Sink(Protocol):
    """Where a job's events go: TokenChunk (streaming only), then a GenerationResult or an exception."""

    def put(self, item: object) -> bool:  # False: nobody listens any more
        ...


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_tokens_in_flight: int
    max_queue: int
    max_prefill_tokens: int


@dataclass(eq=False)
class Job:
    """One request inside the engine (mutable; owned by the model thread once queued)."""

    request: GenerationRequest
    prompt_ids: list[int]
    chain: tuple[BuiltNode, ...]
    node_version: int
    max_new: int  # max_new_tokens capped by the context
    sink: Sink
    streaming: bool
    tokenizer: object = field(repr=False)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by any thread; honoured at the next step
    # model-thread state
    keys: tuple[str, ...] = ()
    generated: list[int] = field(default_factory=list)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    chunks: int = 0
    finished: bool = False

    def __post_init__(self) -> None:
        self.params = self.request.params
        self.generator = make_generator(self.params)
        # Text is decoded per token only when someone reads it as it comes (streaming) or stop strings need it.
        self.text = TextStream(self.tokenizer, self.params.stop, incremental=self.streaming or bool(self.params.stop))

    @property
    def budget(self) -> int:
        """KV slots this job may need: prompt plus every token it may generate."""
        return len(self.prompt_ids) + self.max_new


class Scheduler:
    def __init__(
        self, model, bank: AdapterBank, cache: AdapterCache, limits: Limits, eos_ids: Sequence[int], pad_id: int
    ):
        self.model = model
        self.bank = bank
        self.cache = cache
        self.limits = limits
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = pad_id
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._in_flight: dict[str, Job] = {}  # request id -> job, from submit until finished
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._closing = False
        self.running: list[Job] = []
        self._kv: BatchKV | None = None
        self._plan = None
        self.tokens_in_flight = 0
        self.counts = collections.Counter()

    # -- any thread ----------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down; send the request to another replica")
            if job.request.request_id in self._in_flight:
                raise InvalidRequest(
                    "request_id", f"{job.request.request_id!r} is already in flight; ids must be unique"
                )
            if len(self._waiting) >= self.limits.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting (the bound is {self.limits.max_queue}); retry later"
                )
            self._waiting.append(job)
            self._in_flight[job.request.request_id] = job
            self.counts["submitted"] += 1
            self._cond.notify()

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
        return sum(1 for job in self.running if not job.finished)

    # -- the model thread ----------------------------------------------------
    def run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closing and not self._waiting and not self.running and not self._calls:
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

    def _iteration(self) -> bool:
        """One scheduling step; False when it could do nothing (e.g. every adapter slot is pinned)."""
        self._run_calls()
        self._reap()
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:  # only the newcomers fail; the running batch is untouched
                for job in admitted:
                    self._fail(job, EngineError(f"prefill failed: {type(exc).__name__}: {exc}"))
        if self.running:
            self._decode()
        return bool(admitted or self.running)

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
                error = None
                if job.cancelled:
                    error = RequestCancelled(f"request {job.request.request_id} was cancelled while queued")
                elif job.request.deadline is not None and now >= job.request.deadline:
                    error = DeadlineExceeded(f"request {job.request.request_id} passed its deadline while queued")
                if error is not None:
                    self._waiting.remove(job)
                    self._fail(job, error)
        for job in list(self.running):
            if job.cancelled:
                self._finish(job, FinishReason.CANCELLED)
            elif job.request.deadline is not None and now >= job.request.deadline:
                self._finish(job, FinishReason.DEADLINE)
        self._compact()

    def _admit(self) -> list[Job]:
        admitted: list[Job] = []
        width = 0
        while True:
            with self._cond:
                if not self._waiting:
                    break
                job = self._waiting[0]
            if len(self.running) + len(admitted) >= self.limits.max_batch_size:
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
                    self._waiting.popleft()
                if not isinstance(exc, NodesError):
                    exc = AdapterError(f"cannot load the adapters of {job.request.node}: {type(exc).__name__}: {exc}")
                self._fail(job, exc)
                continue
            with self._cond:
                self._waiting.popleft()
            job.scheduled_at = time.perf_counter()
            self.tokens_in_flight += job.budget
            admitted.append(job)
            width = new_width
        return admitted

    def _prefill(self, jobs: list[Job]) -> None:
        jobs.sort(key=lambda j: j.keys)  # rows sharing an adapter are contiguous (see nodes.runtime.plan)
        ids, mask = left_pad_batch([j.prompt_ids for j in jobs], self.pad_id)
        kv = BatchKV(cache=_new_cache(self.model), mask=mask)
        plan = self.bank.plan([j.keys for j in jobs], ids.shape[1])
        with self.bank.use(plan):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions(mask),
                past_key_values=kv.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.counts["prefill_batches"] += 1
        self.counts["prompt_tokens"] += sum(len(j.prompt_ids) for j in jobs)
        self._accept(jobs, out.logits[:, -1, :])
        keep = [i for i, j in enumerate(jobs) if not j.finished]
        if not keep:
            return
        kv.keep(keep)
        if self._kv is None or not self.running:
            self._kv = kv
        else:
            self._kv.merge(kv)
        self.running += [jobs[i] for i in keep]
        self._plan = None

    def _decode(self) -> None:
        if self._plan is None:
            self._sort_running()
            self._plan = self.bank.plan([j.keys for j in self.running], 1)
        ids = torch.tensor([[j.generated[-1]] for j in self.running], dtype=torch.long)
        step_mask, pos = self._kv.step_inputs()
        with self.bank.use(self._plan):
            out = self.model(
                input_ids=ids,
                attention_mask=step_mask,
                position_ids=pos,
                past_key_values=self._kv.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._kv.after_step(step_mask)
        self.counts["decode_steps"] += 1
        self._accept(self.running, out.logits[:, -1, :])
        self._compact()

    def _accept(self, jobs: Sequence[Job], logits: torch.Tensor) -> None:
        """Sample one token per job and deliver it; finished jobs are marked (removed by _compact)."""
        tokens = choose_tokens(logits, [j.params for j in jobs], [j.generator for j in jobs])
        now = time.perf_counter()
        for job, token in zip(jobs, tokens, strict=False):
            if job.first_token_at is None:
                job.first_token_at = now
            if token in self.eos_ids and not job.params.ignore_eos:
                self._finish(job, FinishReason.STOP)
                continue
            job.generated.append(token)
            self.counts["tokens_generated"] += 1
            text = job.text.push(token)
            if job.text.stopped:
                self._finish(job, FinishReason.STOP, last_token=token, last_text=text)
            elif len(job.generated) >= job.max_new:
                self._finish(job, FinishReason.LENGTH, last_token=token, last_text=text)
            elif job.streaming:
                self._emit(job, text, (token,))

    def _compact(self) -> None:
        """Drop finished rows from the running batch and its KV cache."""
        keep = [i for i, j in enumerate(self.running) if not j.finished]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        self._plan = None
        if not self.running:
            self._kv = None
            self.bank.drop_stacks()  # idle: hold no stacked copies of adapters
        else:
            self._kv.keep(keep)

    def _sort_running(self) -> None:
        """Order rows by chain so that every adapter's rows form one contiguous range."""
        order = sorted(range(len(self.running)), key=lambda i: self.running[i].keys)
        if order != list(range(len(self.running))):
            self._kv.keep(order)
            self.running = [self.running[i] for i in order]

    # -- delivering ----------------------------------------------------------
    def _emit(
        self, job: Job, text: str, token_ids: tuple[int, ...], finish: FinishReason | None = None, **extra
    ) -> None:
        chunk = TokenChunk(
            request_id=job.request.request_id,
            text=text,
            token_ids=token_ids,
            index=job.chunks,
            finish_reason=finish,
            node_version=job.node_version,
            **extra,
        )
        job.chunks += 1
        if not job.sink.put(chunk):
            job.cancelled = True  # the listener is gone (client disconnected)

    def _finish(self, job: Job, reason: FinishReason, last_token: int | None = None, last_text: str = "") -> None:
        if job.finished:
            return
        job.finished = True
        now = time.perf_counter()
        usage = Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=len(job.generated))
        timings = Timings(
            queue_s=(job.scheduled_at or now) - job.arrived,
            ttft_s=(job.first_token_at or now) - job.arrived,
            total_s=now - job.arrived,
        )
        tail = last_text + job.text.flush()
        result = GenerationResult(
            request_id=job.request.request_id,
            node=job.request.node,
            node_version=job.node_version,
            text=job.text.text,
            token_ids=tuple(job.generated),
            finish_reason=reason,
            usage=usage,
            timings=timings,
        )
        # Book-keeping first, so that a caller who sees the end also sees the freed slot in stats().
        self._release(job)
        self.counts["completed" if reason in (FinishReason.STOP, FinishReason.LENGTH) else reason.value] += 1
        if job.streaming:
            ids = (last_token,) if last_token is not None else ()
            self._emit(job, tail, ids, reason, usage=usage, timings=timings)
        job.sink.put(result)

    def _fail(self, job: Job, error: BaseException) -> None:
        if job.finished:
            return
        job.finished = True
        self._release(job)
        self.counts["failed"] += 1
        job.sink.put(error)

    def _release(self, job: Job) -> None:
        with self._cond:
            self._in_flight.pop(job.request.request_id, None)
        if job.scheduled_at is not None and job.keys is not None:
            self.cache.release(job.keys)
            self.tokens_in_flight -= job.budget
            job.keys = ()

    def _fail_running(self, error: BaseException) -> None:
        for job in self.running:
            self._fail(job, error)
        self.running, self._kv, self._plan = [], None, None

    def _drain(self, error: BaseException) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            calls, self._calls = list(self._calls), collections.deque()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for job in waiting:
            self._fail(job, error)
        self._fail_running(error)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
