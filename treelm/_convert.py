"""Between the SDK's values and the wire messages: the only place that touches protos."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from protos.treelm.v1 import admin_pb2, inference_pb2, registry_pb2
from treelm._errors import InvalidRequest
from treelm._types import (
    AdapterCacheCounters,
    ChatMessage,
    Choice,
    Chunk,
    Echo,
    FinishReason,
    MatchCandidate,
    MatchResult,
    MatchSuggestion,
    Node,
    NodeVersion,
    Result,
    ServerStatus,
    Timings,
    TokenLogprob,
    TrunkStatus,
    Usage,
)

__all__ = [
    "chunk_from_proto",
    "generate_request",
    "match_from_proto",
    "match_request",
    "node_from_proto",
    "result_from_proto",
    "status_from_proto",
    "version_from_proto",
]

MessageLike = ChatMessage | Mapping[str, str] | Sequence[str]

_FINISH = {
    inference_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    inference_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    inference_pb2.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    inference_pb2.FINISH_REASON_DEADLINE: FinishReason.DEADLINE,
}


def _message(item: MessageLike, i: int) -> inference_pb2.ChatMessage:
    role: str | None
    content: str | None
    if isinstance(item, ChatMessage):
        role, content = item.role, item.content
    elif isinstance(item, Mapping):
        role, content = item.get("role"), item.get("content")
    elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
        role, content = item
    else:
        raise InvalidRequest(f"messages[{i}]: expected {{'role', 'content'}} or (role, content)", field="messages")
    if not isinstance(role, str) or not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}]: role and content must be strings", field="messages")
    return inference_pb2.ChatMessage(role=role, content=content)


def generate_request(
    node: str,
    prompt: str | None,
    messages: Iterable[MessageLike] | None,
    params: Mapping[str, Any],
    request_id: str | None,
) -> inference_pb2.GenerateRequest:
    """Build the wire request; type errors become ``InvalidRequest`` naming the field."""
    if not isinstance(node, str):
        raise InvalidRequest(f"node: must be a node id string, got {type(node).__name__}", field="node")
    req = inference_pb2.GenerateRequest(node=node, request_id=request_id or "")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt: must be a string, got {type(prompt).__name__}", field="prompt")
        req.prompt = prompt
    if messages is not None:
        req.messages.extend(_message(m, i) for i, m in enumerate(messages))
    for name, value in params.items():
        if value is None:
            continue
        if name not in _PARAM_FIELDS:
            raise InvalidRequest(f"{name}: unknown parameter (expected one of {', '.join(_PARAM_FIELDS)})", field=name)
        try:
            if name == "stop":
                stops = [value] if isinstance(value, str) else list(value)
                req.params.stop.extend(stops)
            elif name == "logit_bias":
                req.params.logit_bias.update(_logit_bias(value))
            elif name == "response_format":
                kind, schema = _response_format(value)
                req.params.response_format.type = kind
                req.params.response_format.json_schema = schema
            elif name in _FLAGS:
                if not isinstance(value, bool):
                    raise TypeError(f"must be True or False, got {value!r}")
                setattr(req.params, name, value)
            else:
                if isinstance(value, bool):
                    raise TypeError("booleans are not numbers here")
                setattr(req.params, name, value)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"{name}: {exc}", field=name) from None
    return req


_FLAGS = ("logprobs", "echo")
_PARAM_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "echo",
    "response_format",
)


def _logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, Mapping):
        raise TypeError("must map token ids to biases, e.g. {50256: -100}")
    out: dict[int, float] = {}
    for token, bias in value.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise TypeError(f"token ids must be integers >= 0, got {token!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise TypeError(f"biases must be numbers, got {bias!r} for token {token}")
        out[token] = float(bias)
    return out


def _response_format(value: Any) -> tuple[str, str]:
    """``"text"`` / ``"json_object"``, a JSON schema as a dict, or OpenAI's own shapes
    (``{"type": "json_schema", "json_schema": {"schema": {...}}}``) -> (type, schema JSON text)."""
    if isinstance(value, str):
        return value, ""
    if not isinstance(value, Mapping):
        raise TypeError("give 'json_object', a JSON schema (dict), or {'type': ..., 'json_schema': ...}")
    if "type" not in value or not isinstance(value["type"], str) or value["type"] not in _FORMAT_TYPES:
        return "json_schema", json.dumps(dict(value))  # a bare schema
    kind = value["type"]
    schema = value.get("json_schema")
    if isinstance(schema, Mapping) and "schema" in schema:
        schema = schema["schema"]  # OpenAI's {"name": ..., "schema": {...}}
    if schema is None:
        return kind, ""
    return kind, schema if isinstance(schema, str) else json.dumps(schema)


_FORMAT_TYPES = ("text", "json_object", "json_schema")


def _token_logprob(msg: inference_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token_id=msg.token_id,
        token=msg.token,
        token_bytes=msg.token_bytes,
        logprob=msg.logprob if msg.HasField("logprob") else None,
        top=tuple(_token_logprob(t) for t in msg.top),
    )


def _logprobs(msg: Any, field: str = "logprobs") -> tuple[TokenLogprob, ...] | None:
    if not msg.HasField(field):
        return None
    return tuple(_token_logprob(t) for t in getattr(msg, field).tokens)


def _echo(msg: Any) -> Echo | None:
    if not msg.HasField("echo"):
        return None
    return Echo(text=msg.echo.text, token_ids=tuple(msg.echo.token_ids), logprobs=_logprobs(msg.echo))


def _usage(msg: inference_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens)


def _timings(msg: inference_pb2.Timings) -> Timings:
    return Timings(queue_s=msg.queue_s, ttft_s=msg.ttft_s, total_s=msg.total_s)


def result_from_proto(msg: inference_pb2.GenerateResponse) -> Result:
    return Result(
        request_id=msg.request_id,
        node=msg.node,
        node_version=msg.node_version,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=_FINISH.get(msg.finish_reason, FinishReason.STOP),
        usage=_usage(msg.usage),
        timings=_timings(msg.timings),
        logprobs=_logprobs(msg),
        choices=tuple(
            Choice(
                index=c.index,
                text=c.text,
                token_ids=tuple(c.token_ids),
                finish_reason=_FINISH.get(c.finish_reason, FinishReason.STOP),
                logprobs=_logprobs(c),
            )
            for c in msg.choices
        ),
        echo=_echo(msg),
    )


def chunk_from_proto(msg: inference_pb2.GenerateChunk) -> Chunk:
    return Chunk(
        request_id=msg.request_id,
        node=msg.node,
        node_version=msg.node_version,
        index=msg.index,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=_FINISH.get(msg.finish_reason),
        usage=_usage(msg.usage) if msg.HasField("usage") else None,
        timings=_timings(msg.timings) if msg.HasField("timings") else None,
        choice=msg.choice,
        logprobs=_logprobs(msg),
        echo=_echo(msg),
    )


def node_from_proto(msg: registry_pb2.Node) -> Node:
    return Node(
        id=msg.id,
        tree=msg.tree,
        path=msg.path,
        level=msg.level,
        parent=msg.parent or None,
        language=msg.language or None,
        domain=msg.domain or None,
        subdomain=msg.subdomain or None,
        tags=tuple(msg.tags),
        visibility=msg.visibility,
        owner=msg.owner or None,
        aliases=dict(msg.aliases),
    )


def version_from_proto(msg: registry_pb2.NodeVersion) -> NodeVersion:
    return NodeVersion(
        node=msg.node,
        version=msg.version,
        parent_version=msg.parent_version or None,
        status=msg.status,
        manifest_digest=msg.manifest_digest,
        metrics=json_format.MessageToDict(msg.metrics) if msg.HasField("metrics") else {},
        created_at=msg.created_at.ToDatetime() if msg.HasField("created_at") else None,
        aliases=tuple(msg.aliases),
    )


def match_request(
    task: str,
    *,
    device: str,
    memory: int | str,
    context: int | None = None,
    batch: int | None = None,
    top: int | None = None,
    bandwidth: str | None = None,
    compute: str | None = None,
    tags: Iterable[str] = (),
    tree: str | None = None,
    dtype: str | None = None,
) -> registry_pb2.MatchRequest:
    value: object  # each loop checks the caller's values at run time
    for name, value in (("task", task), ("device", device)):
        if not isinstance(value, str):
            raise InvalidRequest(f"{name}: must be a string, got {value!r}", field=name)
    if isinstance(memory, bool) or not isinstance(memory, (int, str)):
        raise InvalidRequest("memory: give bytes (int) or a size like '8GiB'", field="memory")
    # Bytes travel as "<n>B" so the server parses one format, the CLI's.
    req = registry_pb2.MatchRequest(
        task=task, device=device, memory=f"{memory}B" if isinstance(memory, int) else memory
    )
    for name, value in (("context", context), ("batch", batch), ("top", top)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidRequest(f"{name}: must be a positive integer, got {value!r}", field=name)
        setattr(req, name, value)
    for name, value in (("bandwidth", bandwidth), ("compute", compute), ("tree", tree), ("dtype", dtype)):
        if value is not None:
            setattr(req, name, str(value))
    req.tags.extend([tags] if isinstance(tags, str) else tags)
    return req


def match_from_proto(msg: registry_pb2.MatchResponse) -> MatchResult:
    return MatchResult(
        candidates=tuple(
            MatchCandidate(
                node=c.node,
                version=c.version,
                variant=c.variant,
                fit=c.fit,
                memory_bytes=c.memory_bytes,
                score=c.score,
                reasons=tuple(c.reasons),
                tokens_per_s=c.tokens_per_s if c.HasField("tokens_per_s") else None,
            )
            for c in msg.candidates
        ),
        suggestions=tuple(
            MatchSuggestion(
                kind=s.kind,
                message=s.message,
                node=s.node or None,
                variant=s.variant or None,
                context=s.context or None,
                fit=s.fit or None,
            )
            for s in msg.suggestions
        ),
    )


def status_from_proto(msg: admin_pb2.StatusResponse) -> ServerStatus:
    return ServerStatus(
        version=msg.version,
        uptime_s=msg.uptime_s,
        auth_enabled=msg.auth_enabled,
        tenant=msg.tenant or None,
        in_flight=msg.in_flight,
        trunks=tuple(
            TrunkStatus(
                tree=t.tree,
                base_digest=t.base_digest,
                loaded_adapters=tuple(t.loaded_adapters),
                queue_depth=t.queue_depth,
                running=t.running,
                max_batch=t.max_batch,
                cache=AdapterCacheCounters(
                    hits=t.cache.hits,
                    misses=t.cache.misses,
                    loads=t.cache.loads,
                    evictions=t.cache.evictions,
                    active=t.cache.active,
                    host=t.cache.host,
                    host_bytes=t.cache.host_bytes,
                ),
            )
            for t in msg.trunks
        ),
    )
