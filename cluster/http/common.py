"""What both generation endpoints share: the context they run in, sampling parameters, logprobs,
stopping early when the client goes away, and one merged stream over several engine streams.

Translation only: every value is checked by the engine's own types (SamplingParams,
ResponseFormat), whose errors name the engine's field; each endpoint maps those names back to its
own (``max_new_tokens`` -> ``max_tokens``) when the error leaves as an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from cluster.errors import BadArgument
from cluster.http.protocol import ResponseFormat, TokenLogprob, TopLogprob, Usage
from cluster.service.admission import Admission
from cluster.service.trunk import Trunk
from nodes.runtime import requests as engine
from nodes.runtime.requests import GenerationResult, SamplingParams, TokenChunk

__all__ = [
    "UNLIKELY",
    "ApiContext",
    "EventSource",
    "MergedStreams",
    "chat_logprobs",
    "engine_format",
    "finite",
    "new_id",
    "sampling_params",
    "until_disconnected",
    "usage",
]

T = TypeVar("T")

# OpenAI's stand-in for a log-probability too small to write (-inf does not exist in JSON).
UNLIKELY = -9999.0

# Hook for metrics: (method, node, prompt_tokens, completion_tokens, ttft_s).
GenerationObserver = Callable[[str, str, int, int, float], None]


@dataclass(frozen=True)
class ApiContext:
    """What the endpoints call: the shared admission (access, trunks, version pins) and metrics."""

    admission: Admission
    server_version: str
    observe: GenerationObserver | None = None

    def fingerprint(self, trunk: Trunk) -> str:
        """OpenAI's ``system_fingerprint``: changes with the server's code or the trunk's base model."""
        digest = hashlib.sha256(f"{self.server_version}:{trunk.base_digest}".encode()).hexdigest()
        return f"fp_{digest[:12]}"


@dataclass(frozen=True)
class EventSource:
    """A streamed answer: its events, and how to stop the engine streams behind them.

    ``close`` is separate from the iterator because a response may end (a client that left)
    before the iterator ever started, and an unstarted generator's ``finally`` never runs.
    """

    events: AsyncIterator[BaseModel]
    close: Callable[[], Awaitable[None]]


def new_id(prefix: str) -> str:
    """A response id; the engine request gets the same id (``chatcmpl-...``), so feedback finds it."""
    return f"{prefix}-{uuid.uuid4().hex}"


def engine_format(value: ResponseFormat | None) -> engine.ResponseFormat | None:
    if value is None or value.type == "text":
        return None
    if value.type == "json_object":
        if value.json_schema is not None:
            raise BadArgument("response_format.json_schema", "only response_format.type json_schema takes one")
        return engine.ResponseFormat(kind="json_object")
    if value.json_schema is None or value.json_schema.schema_ is None:
        raise BadArgument("response_format.json_schema.schema", "json_schema needs a schema")
    schema = json.dumps(value.json_schema.schema_)
    return engine.ResponseFormat(kind="json_schema", schema=schema)  # InvalidRequest names the field


def sampling_params(
    body: Any,
    *,
    max_new_tokens: int,
    logprobs: bool = False,
    top_logprobs: int = 0,
    echo: bool = False,
    response_format: engine.ResponseFormat | None = None,
) -> SamplingParams:
    """The engine's parameters for the fields both endpoints share (its checks name engine fields)."""
    stop: Sequence[str] = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else body.stop
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "stop": tuple(stop),
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "echo": echo,
        "response_format": response_format,
        "logit_bias": dict(body.logit_bias or {}),
    }
    for name in ("top_p", "seed", "n", "presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None:
            kwargs[name] = value
    if kwargs["temperature"] > 2.0:
        raise BadArgument("temperature", f"must be in [0, 2], got {kwargs['temperature']!r}")
    return SamplingParams(**kwargs)


def usage(results: Sequence[GenerationResult | engine.Usage]) -> Usage:
    items = [r.usage if isinstance(r, GenerationResult) else r for r in results]
    prompt = sum(u.prompt_tokens for u in items)
    completion = sum(u.completion_tokens for u in items)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finite(value: float | None) -> float:
    """A logprob JSON can carry: -inf (or a missing value) becomes OpenAI's UNLIKELY."""
    return UNLIKELY if value is None else max(value, UNLIKELY)


def chat_logprobs(entries: Sequence[engine.TokenLogprob]) -> list[TokenLogprob]:
    """Chat's shape: one entry per token, each with its top alternatives and exact bytes."""
    return [
        TokenLogprob(
            token=e.token,
            bytes=list(e.token_bytes),
            logprob=finite(e.logprob),
            top_logprobs=[
                TopLogprob(token=t.token, bytes=list(t.token_bytes), logprob=finite(t.logprob)) for t in e.top
            ],
        )
        for e in entries
    ]


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled: the engine frees the rows) if the client leaves first.

    Call once the body has been read: the next ASGI message is then the disconnect.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return None


_END = object()


class MergedStreams:
    """Several engine streams as one: ``(stream index, chunk)`` in arrival order.

    ``await start()`` runs until every stream has produced its first chunk, so errors raised at
    submission (a full queue, a bad schema) are raised there, before a response starts; later
    errors are raised from the iteration. Leaving (``aclose``) cancels the streams still running.
    """

    def __init__(self, streams: Sequence[AsyncIterator[TokenChunk]]):
        self._streams = list(streams)
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._buffer: list[tuple[int, TokenChunk]] = []
        self._open = len(self._streams)

    async def _pump(self, i: int, stream: AsyncIterator[TokenChunk]) -> None:
        try:
            async for chunk in stream:
                await self._queue.put((i, chunk))
            await self._queue.put((i, _END))
        except Exception as exc:
            await self._queue.put((i, exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # the engine (or the replica) cancels the request if it still runs

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self._streams)]
        waiting = set(range(len(self._streams)))
        try:
            while waiting:
                i, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                waiting.discard(i)
                if item is _END:
                    self._open -= 1
                else:
                    self._buffer.append((i, item))  # type: ignore[arg-type]
        except BaseException:
            await self.aclose()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, TokenChunk]]:
        for entry in self._buffer:
            yield entry
        self._buffer.clear()
        while self._open:
            i, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                self._open -= 1
                continue
            yield i, item  # type: ignore[misc]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
