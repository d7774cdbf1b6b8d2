"""Between wire messages and the engine's values; protos go no further than the servicers."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from google.protobuf import struct_pb2

from cluster.service.trunk import TrunkSnapshot
from nodes.runtime.requests import (
    ChatMessage,
    Choice,
    Echo,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ResponseFormat,
    SamplingParams,
    Timings,
    TokenChunk,
    TokenLogprob,
    Usage,
)
from protos.treelm.v1 import admin_pb2, inference_pb2, registry_pb2
from registry.matching import MatchResult
from registry.records import NodeRecord, VersionRecord

__all__ = [
    "chunk_to_proto",
    "engine_request",
    "match_to_proto",
    "node_to_proto",
    "result_to_proto",
    "snapshot_to_proto",
    "version_to_proto",
]

_FINISH = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: inference_pb2.FINISH_REASON_DEADLINE,
}


_OPTIONAL_PARAMS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "echo",
)


def _params(msg: inference_pb2.SamplingParams) -> SamplingParams:
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL_PARAMS if msg.HasField(name)}
    kwargs["stop"] = tuple(msg.stop)
    kwargs["logit_bias"] = dict(msg.logit_bias)
    if msg.HasField("response_format"):
        fmt = msg.response_format
        kwargs["response_format"] = ResponseFormat(kind=fmt.type or "text", schema=fmt.json_schema or None)
    return SamplingParams(**kwargs)  # raises InvalidRequest naming the field


def engine_request(
    msg: inference_pb2.GenerateRequest, time_remaining: float | None, node: str | None = None
) -> GenerationRequest:
    """The engine request for a wire request; the call's gRPC deadline becomes its deadline.

    ``node``: the node id to ask the engine for (the request's, without a pinned version).
    """
    messages = None
    if msg.messages:
        messages = tuple(ChatMessage(role=m.role, content=m.content) for m in msg.messages)
    prompt = msg.prompt if msg.HasField("prompt") else None
    deadline = None if time_remaining is None else time.time() + time_remaining
    request = GenerationRequest(
        node=node or msg.node, prompt=prompt, messages=messages, params=_params(msg.params), deadline=deadline
    )
    return replace(request, request_id=msg.request_id) if msg.request_id else request


def _usage(usage: Usage) -> inference_pb2.Usage:
    return inference_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _timings(timings: Timings) -> inference_pb2.Timings:
    return inference_pb2.Timings(queue_s=timings.queue_s, ttft_s=timings.ttft_s, total_s=timings.total_s)


def _token_logprob(entry: TokenLogprob) -> inference_pb2.TokenLogprob:
    msg = inference_pb2.TokenLogprob(
        token_id=entry.token_id,
        token=entry.token,
        token_bytes=entry.token_bytes,
        top=[_token_logprob(alt) for alt in entry.top],
    )
    if entry.logprob is not None:
        msg.logprob = entry.logprob
    return msg


def _logprobs(entries: tuple[TokenLogprob, ...]) -> inference_pb2.Logprobs:
    return inference_pb2.Logprobs(tokens=[_token_logprob(e) for e in entries])


def _echo(echo: Echo) -> inference_pb2.Echo:
    msg = inference_pb2.Echo(text=echo.text, token_ids=echo.token_ids)
    if echo.logprobs is not None:
        msg.logprobs.CopyFrom(_logprobs(echo.logprobs))
    return msg


def _choice(choice: Choice) -> inference_pb2.Choice:
    msg = inference_pb2.Choice(
        index=choice.index, text=choice.text, token_ids=choice.token_ids, finish_reason=_FINISH[choice.finish_reason]
    )
    if choice.logprobs is not None:
        msg.logprobs.CopyFrom(_logprobs(choice.logprobs))
    return msg


def result_to_proto(result: GenerationResult) -> inference_pb2.GenerateResponse:
    msg = inference_pb2.GenerateResponse(
        request_id=result.request_id,
        node=result.node,
        node_version=result.node_version,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=_FINISH[result.finish_reason],
        usage=_usage(result.usage),
        timings=_timings(result.timings),
        choices=[_choice(c) for c in result.choices],
    )
    if result.logprobs is not None:
        msg.logprobs.CopyFrom(_logprobs(result.logprobs))
    if result.echo is not None:
        msg.echo.CopyFrom(_echo(result.echo))
    return msg


def chunk_to_proto(chunk: TokenChunk, node: str) -> inference_pb2.GenerateChunk:
    msg = inference_pb2.GenerateChunk(
        request_id=chunk.request_id,
        node=node,
        node_version=chunk.node_version,
        index=chunk.index,
        text=chunk.text,
        token_ids=chunk.token_ids,
        choice=chunk.choice,
    )
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        msg.usage.CopyFrom(_usage(chunk.usage))
    if chunk.timings is not None:
        msg.timings.CopyFrom(_timings(chunk.timings))
    if chunk.logprobs is not None:
        msg.logprobs.CopyFrom(_logprobs(chunk.logprobs))
    if chunk.echo is not None:
        msg.echo.CopyFrom(_echo(chunk.echo))
    return msg


def snapshot_to_proto(snap: TrunkSnapshot, visible_adapters: tuple[str, ...]) -> admin_pb2.Trunk:
    c = snap.cache
    return admin_pb2.Trunk(
        tree=snap.tree,
        base_digest=snap.base_digest,
        loaded_adapters=visible_adapters,
        queue_depth=snap.queue_depth,
        running=snap.running,
        max_batch=snap.max_batch,
        cache=admin_pb2.AdapterCacheCounters(
            hits=c.hits,
            misses=c.misses,
            loads=c.loads,
            evictions=c.evictions,
            active=c.active,
            host=c.host,
            host_bytes=c.host_bytes,
        ),
    )


def node_to_proto(record: NodeRecord, aliases: Mapping[str, int] | None = None) -> registry_pb2.Node:
    if aliases is None:
        aliases = {k: v for k, v in (("stable", record.stable_version), ("candidate", record.candidate_version)) if v}
    return registry_pb2.Node(
        id=record.node_id,
        tree=record.tree,
        path=record.path,
        level=record.level,
        parent=record.parent or "",
        language=record.language or "",
        domain=record.domain or "",
        subdomain=record.subdomain or "",
        tags=record.tags,
        visibility=record.visibility,
        owner=record.owner or "",
        aliases=dict(aliases),
    )


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update({str(k): v for k, v in values.items()})
    return out


def version_to_proto(record: VersionRecord) -> registry_pb2.NodeVersion:
    msg = registry_pb2.NodeVersion(
        node=record.node_id,
        version=record.version,
        parent_version=record.parent_version or 0,
        status=record.status,
        manifest_digest=record.manifest_digest,
        aliases=record.aliases,
    )
    if record.metrics:
        msg.metrics.CopyFrom(_struct(record.metrics))
    msg.created_at.FromDatetime(record.created_at)
    return msg


def match_to_proto(result: MatchResult) -> registry_pb2.MatchResponse:
    reply = registry_pb2.MatchResponse()
    for c in result.candidates:
        candidate = reply.candidates.add(
            node=c.node_id,
            version=c.version,
            variant=c.variant,
            fit=c.fit,
            memory_bytes=c.memory_bytes,
            score=c.score,
            reasons=c.reasons,
        )
        if c.tokens_per_second is not None:
            candidate.tokens_per_s = c.tokens_per_second
    for s in result.suggestions:
        reply.suggestions.add(
            kind=s.kind,
            message=s.message,
            node=s.node_id or "",
            variant=s.variant or "",
            context=s.context or 0,
            fit=s.fit or "",
        )
    return reply
