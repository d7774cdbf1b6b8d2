"""POST /v1/completions: an OpenAI (legacy) completion request -> one GenerationRequest per prompt
-> a Completion, or its chunks as server-sent events.

``prompt`` is a string or a list of strings (each its own engine request, run together; choice
``i * n + j`` is prompt i's choice j). ``echo`` puts the prompt before each choice's text, and with
``logprobs`` its tokens' log-probabilities first (the first token has none): a harness scores a
continuation with ``max_tokens: 0, echo: true, logprobs: 0``. Logprobs take OpenAI's legacy shape:
``tokens``, ``token_logprobs``, ``top_logprobs`` (token text -> logprob) and ``text_offset`` (each
token's character offset in the choice's text, counted over the tokens' exact bytes).
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request

from cluster.errors import BadArgument
from cluster.http.common import (
    ApiContext,
    EventSource,
    MergedStreams,
    finite,
    new_id,
    sampling_params,
    until_disconnected,
    usage,
)
from cluster.http.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from cluster.service.admission import NodeRef
from cluster.service.auth import Caller
from cluster.service.responses import RecordingTrunk
from cluster.service.trunk import Trunk
from nodes.runtime.requests import GenerationRequest, GenerationResult, TokenLogprob
from nodes.runtime.requests import Usage as EngineUsage

__all__ = ["DEFAULT_MAX_TOKENS", "MAX_PROMPTS", "CompletionServing", "legacy_logprobs"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 64  # prompts in one request (each is an engine request; n choices each)


class _Offsets:
    """Character offsets of consecutive tokens in one choice's text, from their exact bytes.

    A token that completes a character split over tokens starts where that character starts;
    bytes that never form a character become U+FFFD, and the token after them starts after it.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def next(self, token_bytes: bytes) -> int:
        pending = self._decoder.getstate()[0]  # bytes of a character not complete yet
        out = self._decoder.decode(token_bytes)
        offset = self._chars
        if pending:
            broken = pending.decode("utf-8", errors="replace")
            alone = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(token_bytes)
            if out == broken + alone:  # the pending bytes were no character: this token starts after them
                offset += len(broken)
        self._chars += len(out)
        return offset


def legacy_logprobs(entries: Sequence[TokenLogprob], offsets: _Offsets) -> CompletionLogprobs:
    """OpenAI's legacy logprobs shape for consecutive tokens of one choice."""
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[None if e.logprob is None else finite(e.logprob) for e in entries],
        top_logprobs=[{t.token: finite(t.logprob) for t in e.top} if e.logprob is not None else None for e in entries],
        text_offset=[offsets.next(e.token_bytes) for e in entries],
    )


class CompletionServing:
    """Translation between the OpenAI completions schema and the engine's values."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @staticmethod
    def fields(body: CompletionRequest | None) -> dict[str, str]:
        return {"node": "model", "max_new_tokens": "max_tokens", "top_logprobs": "logprobs"}

    @staticmethod
    def _prompts(body: CompletionRequest) -> list[str]:
        prompt = body.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise BadArgument("prompt", "must not be empty")
        if not all(isinstance(p, str) for p in prompt):
            raise BadArgument("prompt", "token-id prompts are not supported here: send the text")
        if len(prompt) > MAX_PROMPTS:
            raise BadArgument("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
        return [str(p) for p in prompt]

    def _requests(self, body: CompletionRequest, ref: NodeRef) -> tuple[str, list[GenerationRequest]]:
        if body.stream_options is not None and not body.stream:
            raise BadArgument("stream_options", "is only allowed with stream: true")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise BadArgument("best_of", "only best_of equal to n is supported (no extra candidates are ranked)")
        params = sampling_params(
            body,
            max_new_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
            echo=bool(body.echo),
        )
        prompts = self._prompts(body)
        response_id = new_id("cmpl")
        ids = [response_id] if len(prompts) == 1 else [f"{response_id}-{i}" for i in range(len(prompts))]
        requests = [
            GenerationRequest(node=ref.node, prompt=p, params=params, request_id=r)
            for p, r in zip(prompts, ids, strict=True)
        ]
        return response_id, requests

    async def create(self, body: CompletionRequest, caller: Caller, http: Request) -> Any:
        ref = NodeRef.parse(body.model, "model")
        trunk = await self.ctx.admission.admit(ref, caller)
        response_id, requests = self._requests(body, ref)
        common = {"id": response_id, "created": int(time.time()), "system_fingerprint": self.ctx.fingerprint(trunk)}
        if body.stream:
            streams = MergedStreams([trunk.stream(r) for r in requests])
            await streams.start()
            events = self._events(streams, ref, caller, body, common, self._whole(trunk, requests))
            return EventSource(events, streams.aclose)
        results = await until_disconnected(http, self._generate(trunk, requests))
        if results is None:
            return None
        for result in results:
            await self.ctx.admission.check_answer(ref, result.node_version, caller)
            if self.ctx.observe is not None:
                u = result.usage
                self.ctx.observe(
                    "http/completion", result.node, u.prompt_tokens, u.completion_tokens, result.timings.ttft_s
                )
        record = self._whole(trunk, requests)
        if record is not None:
            await record(results[0].node_version)
        return self._completion(results, common, body.logprobs is not None)

    @staticmethod
    def _whole(trunk: Trunk, requests: list[GenerationRequest]) -> Callable[[int], Awaitable[None]] | None:
        """Records a multi-prompt completion's own id (each prompt's part is ``{id}-{i}``, recorded by the
        trunk with its texts): feedback may name the whole answer or one prompt's part."""
        if len(requests) < 2 or not isinstance(trunk, RecordingTrunk):
            return None
        response_id, node = requests[0].request_id.rpartition("-")[0], requests[0].node
        return lambda version: trunk.record(response_id, node, version)

    @staticmethod
    async def _generate(trunk: Trunk, requests: list[GenerationRequest]) -> list[GenerationResult]:
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the others
                tasks = [group.create_task(trunk.generate(r)) for r in requests]
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        return [t.result() for t in tasks]

    @staticmethod
    def _completion(results: list[GenerationResult], common: dict[str, Any], logprobs: bool) -> Completion:
        choices = []
        n = len(results[0].choices)
        for i, result in enumerate(results):
            echo = result.echo
            for c in result.choices:
                text = (echo.text if echo is not None else "") + c.text
                entries = (*(echo.logprobs or ()), *(c.logprobs or ())) if echo is not None else (c.logprobs or ())
                choices.append(
                    CompletionChoice(
                        index=i * n + c.index,
                        text=text,
                        logprobs=legacy_logprobs(entries, _Offsets()) if logprobs else None,
                        finish_reason=c.finish_reason.value,
                    )
                )
        first = results[0]
        return Completion(
            **common,
            model=f"{first.node}@{first.node_version}",
            node=first.node,
            node_version=first.node_version,
            choices=choices,
            usage=usage(results),
        )

    async def _events(
        self,
        streams: MergedStreams,
        ref: NodeRef,
        caller: Caller,
        body: CompletionRequest,
        common: dict[str, Any],
        record: Callable[[int], Awaitable[None]] | None = None,
    ) -> AsyncIterator[Completion]:
        n = body.n or 1
        logprobs = body.logprobs is not None
        offsets: dict[int, _Offsets] = {}
        totals: list[EngineUsage] = []
        version = 0
        try:
            async for i, chunk in streams:
                if chunk.index == 0:
                    await self.ctx.admission.check_answer(ref, chunk.node_version, caller)
                version = chunk.node_version
                if chunk.echo is not None:  # every choice of this prompt starts with the prompt
                    entries = chunk.echo.logprobs or ()
                    for j in range(n):
                        index = i * n + j
                        lp = legacy_logprobs(entries, offsets.setdefault(index, _Offsets())) if logprobs else None
                        choice = CompletionChoice(index=index, text=chunk.echo.text, logprobs=lp, finish_reason=None)
                        yield _answer(common, ref, version, [choice])
                    continue
                index = i * n + chunk.choice
                lp = legacy_logprobs(chunk.logprobs or (), offsets.setdefault(index, _Offsets())) if logprobs else None
                reason = chunk.finish_reason.value if chunk.finish_reason is not None else None
                yield _answer(
                    common,
                    ref,
                    version,
                    [CompletionChoice(index=index, text=chunk.text, logprobs=lp, finish_reason=reason)],
                )
                if chunk.usage is not None:
                    totals.append(chunk.usage)
                    if self.ctx.observe is not None:
                        u, ttft = chunk.usage, chunk.timings.ttft_s if chunk.timings else 0.0
                        self.ctx.observe("http/completion-stream", ref.node, u.prompt_tokens, u.completion_tokens, ttft)
            if record is not None:
                await record(version)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _answer(common, ref, version, []).model_copy(update={"usage": usage(totals)})
        finally:
            await streams.aclose()


def _answer(common: dict[str, Any], ref: NodeRef, version: int, choices: list[CompletionChoice]) -> Completion:
    return Completion(**common, model=f"{ref.node}@{version}", node=ref.node, node_version=version, choices=choices)
