"""A request inside the engine (:class:`Job`) and its ``n`` rows in the batch (:class:`Row`).

A job is admitted, prefilled and finished as one: its prompt is prefilled once in one batch
row, then that row's KV is forked into the job's n rows (one per choice). Each row decodes with
its own sampler (seed, penalties, grammar, logprobs) and finishes on its own; the job ends when
its last row does, and its result lists every choice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nodes.runtime.grammar import RowGrammar
from nodes.runtime.logprobs import LogprobRecord, TokenTable
from nodes.runtime.requests import (
    Choice,
    Echo,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Timings,
    TokenChunk,
    Usage,
)
from nodes.runtime.sampling import RowSampler
from nodes.runtime.textstream import TextStream
from nodes.store.tree import BuiltNode

__all__ = ["Job", "Row", "Sink"]


class Sink(Protocol):
    """Where a job's events go: TokenChunk (streaming only), then a GenerationResult or an exception."""

    def put(self, item: object) -> bool:  # False: nobody listens any more
        ...


class Row:
    """One choice of a job: a row of the running batch (model thread only)."""

    def __init__(self, job: Job, choice: int, grammar: RowGrammar | None):
        self.job = job
        self.choice = choice
        params = job.request.params
        self.sampler = RowSampler(params, choice, job.vocab_size, grammar)
        # Text is decoded per token only when someone reads it as it comes (streaming) or stop strings need it.
        self.text = TextStream(job.tokenizer, params.stop, incremental=job.streaming or bool(params.stop))
        self.generated: list[int] = []
        self.logprobs: list[LogprobRecord] | None = [] if params.logprobs else None
        self.finished = False
        self.finish_reason: FinishReason | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return self.job.keys

    def choice_value(self, table: TokenTable | None) -> Choice:
        return Choice(
            index=self.choice,
            text=self.text.text,
            token_ids=tuple(self.generated),
            finish_reason=self.finish_reason or FinishReason.STOP,
            logprobs=table.logprobs(self.logprobs) if table is not None and self.logprobs is not None else None,
        )


@dataclass(eq=False)
class Job:
    """One request inside the engine (mutable; owned by the model thread once queued)."""

    request: GenerationRequest
    prompt_ids: list[int]
    chain: tuple[BuiltNode, ...]
    node_version: int
    max_new: int  # max_new_tokens capped by the context (0: echo only)
    sink: Sink
    streaming: bool
    tokenizer: object = field(repr=False)
    vocab_size: int = 0  # width of the model's logits
    prompt_text: str = ""  # the text the prompt ids came from (echo returns it)
    grammars: Sequence[RowGrammar] | None = field(default=None, repr=False)  # one per choice, constrained only
    table: TokenTable | None = field(default=None, repr=False)  # token text/bytes, for logprobs
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by any thread; honoured at the next step
    # model-thread state
    keys: tuple[str, ...] = ()
    scheduled_at: float | None = None
    first_token_at: float | None = None
    chunks: int = 0
    finished: bool = False
    echo: Echo | None = None  # set at prefill when echo was asked
    prefix_key: str = ""  # the chain's key in the prefix cache (set at prefill when the cache is on)

    def __post_init__(self) -> None:
        self.params = self.request.params
        grammars: Sequence[RowGrammar | None] = self.grammars or [None] * self.params.n
        self.rows = [Row(self, i, grammars[i]) for i in range(self.params.n)]

    @property
    def budget(self) -> int:
        """KV slots this job may need: prompt plus every token it may generate, in each of its rows."""
        return self.params.n * (len(self.prompt_ids) + self.max_new)

    @property
    def open_rows(self) -> int:
        return sum(1 for r in self.rows if not r.finished)

    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=sum(len(r.generated) for r in self.rows))

    def timings(self, now: float) -> Timings:
        return Timings(
            queue_s=(self.scheduled_at or now) - self.arrived,
            ttft_s=(self.first_token_at or now) - self.arrived,
            total_s=now - self.arrived,
        )

    def result(self, now: float) -> GenerationResult:
        choices = tuple(r.choice_value(self.table) for r in self.rows)
        first = choices[0]
        return GenerationResult(
            request_id=self.request.request_id,
            node=self.request.node,
            node_version=self.node_version,
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            usage=self.usage(),
            timings=self.timings(now),
            logprobs=first.logprobs,
            choices=choices,
            echo=self.echo,
        )

    def chunk(
        self,
        row: Row | None,
        text: str,
        token_ids: tuple[int, ...],
        records: Sequence[LogprobRecord] = (),
        **extra,
    ) -> TokenChunk:
        """The next chunk of this job's stream (``row`` None: the echo chunk, before any token)."""
        logprobs = None
        if row is not None and row.logprobs is not None and self.table is not None:
            logprobs = self.table.logprobs(records)
        chunk = TokenChunk(
            request_id=self.request.request_id,
            text=text,
            token_ids=token_ids,
            index=self.chunks,
            node_version=self.node_version,
            choice=row.choice if row is not None else 0,
            logprobs=logprobs,
            **extra,
        )
        self.chunks += 1
        return chunk
