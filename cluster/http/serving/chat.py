"""POST /v1/chat/completions: an OpenAI chat request -> one GenerationRequest (messages, rendered by
the node's chat template in the engine) -> a ChatCompletion, or its chunks as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from cluster.errors import BadArgument
from cluster.http.common import (
    ApiContext,
    EventSource,
    MergedStreams,
    chat_logprobs,
    engine_format,
    new_id,
    sampling_params,
    until_disconnected,
    usage,
)
from cluster.http.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageParam,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
)
from cluster.service.admission import NodeRef
from cluster.service.auth import Caller
from nodes.runtime.requests import ChatMessage, GenerationRequest, GenerationResult, TokenChunk

__all__ = ["DEFAULT_MAX_TOKENS", "ChatServing"]

# Tokens per choice when neither max_completion_tokens nor max_tokens is given (OpenAI's default is
# the rest of the context window; a server shared by many tenants needs a bound).
DEFAULT_MAX_TOKENS = 256
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _content(i: int, message: ChatMessageParam) -> str:
    if message.content is None:
        if message.role != "assistant":
            raise BadArgument(f"messages[{i}].content", f"a {message.role} message needs content")
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content)  # text parts, as one turn


class ChatServing:
    """Translation between the OpenAI chat schema and the engine's values (see the module docstring)."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    @staticmethod
    def fields(body: ChatCompletionRequest | None) -> dict[str, str]:
        """Engine field -> this endpoint's parameter, for error bodies."""
        tokens = (
            "max_completion_tokens" if body is not None and body.max_completion_tokens is not None else "max_tokens"
        )
        return {
            "node": "model",
            "max_new_tokens": tokens,
            "response_format.schema": "response_format.json_schema.schema",
            "messages.role": "messages",
            "messages.content": "messages",
            "prompt": "messages",
        }

    def _request(self, body: ChatCompletionRequest, ref: NodeRef) -> GenerationRequest:
        if body.stream_options is not None and not body.stream:
            raise BadArgument("stream_options", "is only allowed with stream: true")
        tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(
            body,
            max_new_tokens=DEFAULT_MAX_TOKENS if tokens is None else tokens,
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
            response_format=engine_format(body.response_format),
        )
        messages = tuple(ChatMessage(role=_ROLES[m.role], content=_content(i, m)) for i, m in enumerate(body.messages))
        return GenerationRequest(node=ref.node, messages=messages, params=params, request_id=new_id("chatcmpl"))

    async def create(self, body: ChatCompletionRequest, caller: Caller, http: Request) -> Any:
        """A ChatCompletion, or an async iterator of SSE events (``stream``); errors are raised typed."""
        ref = NodeRef.parse(body.model, "model")
        trunk = await self.ctx.admission.admit(ref, caller)  # 404 before any other field is judged
        request = self._request(body, ref)
        common = {
            "id": request.request_id,
            "created": int(time.time()),
            "system_fingerprint": self.ctx.fingerprint(trunk),
        }
        if body.stream:
            streams = MergedStreams([trunk.stream(request)])
            await streams.start()  # errors at submission leave as a status, not as an event
            return EventSource(self._events(streams, ref, caller, body, common), streams.aclose)
        result = await until_disconnected(http, trunk.generate(request))
        if result is None:
            return None  # the client left; the engine has dropped the request
        await self.ctx.admission.check_answer(ref, result.node_version, caller)
        self._observe("chat", result)
        return self._completion(result, common)

    def _observe(self, how: str, result: GenerationResult) -> None:
        if self.ctx.observe is not None:
            u = result.usage
            self.ctx.observe(f"http/{how}", result.node, u.prompt_tokens, u.completion_tokens, result.timings.ttft_s)

    @staticmethod
    def _completion(result: GenerationResult, common: dict[str, Any]) -> ChatCompletion:
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=ChoiceLogprobs(content=chat_logprobs(c.logprobs)) if c.logprobs is not None else None,
                finish_reason=c.finish_reason.value,
            )
            for c in result.choices
        ]
        return ChatCompletion(
            **common,
            model=f"{result.node}@{result.node_version}",
            node=result.node,
            node_version=result.node_version,
            choices=choices,
            usage=usage([result]),
        )

    async def _events(
        self, streams: MergedStreams, ref: NodeRef, caller: Caller, body: ChatCompletionRequest, common: dict[str, Any]
    ) -> AsyncIterator[ChatCompletionChunk]:
        started: set[int] = set()
        try:
            async for _, chunk in streams:
                if chunk.index == 0:
                    await self.ctx.admission.check_answer(ref, chunk.node_version, caller)
                yield self._chunk(chunk, common, ref, role=chunk.choice not in started)
                started.add(chunk.choice)
                if chunk.usage is not None:
                    if self.ctx.observe is not None:
                        ttft = chunk.timings.ttft_s if chunk.timings else 0.0
                        u = chunk.usage
                        self.ctx.observe("http/chat-stream", ref.node, u.prompt_tokens, u.completion_tokens, ttft)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        last = self._chunk(chunk, common, ref, role=False)
                        yield last.model_copy(update={"choices": [], "usage": usage([chunk.usage])})
        finally:
            await streams.aclose()

    @staticmethod
    def _chunk(chunk: TokenChunk, common: dict[str, Any], ref: NodeRef, role: bool) -> ChatCompletionChunk:
        logprobs = ChoiceLogprobs(content=chat_logprobs(chunk.logprobs)) if chunk.logprobs is not None else None
        choice = ChunkChoice(
            index=chunk.choice,
            delta=Delta(role="assistant" if role else None, content=chunk.text),
            logprobs=logprobs,
            finish_reason=chunk.finish_reason.value if chunk.finish_reason is not None else None,
        )
        return ChatCompletionChunk(
            **common,
            model=f"{ref.node}@{chunk.node_version}",
            node=ref.node,
            node_version=chunk.node_version,
            choices=[choice],
        )
