"""Values the SDK returns: frozen dataclasses, converted from protos at the edge."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypedDict

__all__ = [
    "AdapterCacheCounters",
    "ChatMessage",
    "Choice",
    "Chunk",
    "Echo",
    "Feedback",
    "FinishReason",
    "MatchCandidate",
    "MatchResult",
    "MatchSuggestion",
    "Node",
    "NodeVersion",
    "Result",
    "Retention",
    "RollbackResult",
    "SamplingOptions",
    "ServerStatus",
    "Timings",
    "TokenLogprob",
    "TrunkStatus",
    "UpdateStatus",
    "Usage",
]


class FinishReason(str, enum.Enum):
    """Why a generation ended."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens or the context limit
    CANCELLED = "cancelled"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn; ``role`` is ``system``, ``user`` or ``assistant``. Plain dicts work too."""

    role: str
    content: str


class SamplingOptions(TypedDict, total=False):
    """Keyword arguments of ``generate`` and ``stream`` (limits: the server's engine checks them).

    ``n`` completions (1..16) from one prefill; ``presence_penalty`` / ``frequency_penalty`` in
    [-2, 2]; ``logit_bias`` token id -> bias in [-100, 100]; ``logprobs`` (each token's
    log-probability) with ``top_logprobs`` (0..20) alternatives; ``echo`` returns the prompt's
    tokens (and logprobs; ``max_new_tokens=0`` then scores a prompt); ``response_format``:
    ``"json_object"``, a JSON schema (a dict), or OpenAI's ``{"type": "json_schema", "json_schema":
    {"schema": {...}}}``. ``temperature`` 0 (the default) is greedy.
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: str | list[str] | tuple[str, ...]
    n: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[int, float]
    logprobs: bool
    top_logprobs: int
    echo: bool
    response_format: str | Mapping[str, Any]


@dataclass(frozen=True)
class Usage:
    """Tokens of one request: the prompt as the node's tokenizer saw it, and the completion."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Seconds measured by the server's engine from admission."""

    queue_s: float
    ttft_s: float
    total_s: float


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its log-probability under the node's effective model (base + chain).

    ``logprob`` is None only for a prompt's first token (``echo``: nothing precedes it);
    ``top`` holds the ``top_logprobs`` most likely tokens at that position, best first;
    ``token_bytes`` are the token's exact bytes (``token`` shows U+FFFD for part of a character).
    """

    token_id: int
    token: str
    token_bytes: bytes
    logprob: float | None
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Echo:
    """The prompt as the server's tokenizer saw it (``echo=True``), with logprobs when asked."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Choice:
    """One of the ``n`` completions of a request."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when logprobs=True


@dataclass(frozen=True)
class Result:
    """A finished generation: ``client.generate(...)``.

    ``text``, ``token_ids``, ``finish_reason`` and ``logprobs`` are choice 0's; ``choices`` has
    every choice (``n``); ``usage`` counts the prompt once and every choice's tokens.
    """

    request_id: str
    node: str
    node_version: int  # the version of the node that answered
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    logprobs: tuple[TokenLogprob, ...] | None = None
    choices: tuple[Choice, ...] = ()
    echo: Echo | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of a stream. Each choice's last chunk has ``finish_reason``; the stream's very last
    chunk also has ``usage`` and ``timings`` (``last``). With echo, the first chunk has ``echo``."""

    request_id: str
    node: str
    node_version: int
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    choice: int = 0  # which of the n completions
    logprobs: tuple[TokenLogprob, ...] | None = None
    echo: Echo | None = None

    @property
    def last(self) -> bool:
        """The stream's last chunk (with n > 1, other choices' last chunks have finish_reason only)."""
        return self.usage is not None


@dataclass(frozen=True)
class Node:
    """A node the caller may use (private nodes of other tenants are never returned)."""

    id: str
    tree: str
    path: str
    level: str
    parent: str | None
    language: str | None = None
    domain: str | None = None
    subdomain: str | None = None
    tags: tuple[str, ...] = ()
    visibility: str = "public"
    owner: str | None = None
    aliases: Mapping[str, int] = field(default_factory=dict)

    @property
    def stable_version(self) -> int | None:
        return self.aliases.get("stable")


@dataclass(frozen=True)
class NodeVersion:
    """One immutable version of a node's adapter, pinned to its parent's version."""

    node: str
    version: int
    parent_version: int | None
    status: str  # candidate | accepted | rejected | revoked
    manifest_digest: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class MatchCandidate:
    """One ranked answer of ``client.match``; ``reasons`` explain the ranking."""

    node: str
    version: int
    variant: str
    fit: str  # perfect | good | marginal
    memory_bytes: int
    score: float
    reasons: tuple[str, ...]
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class MatchSuggestion:
    """Something that would fit when little or nothing does (``kind``: shorter-context,
    smaller-variant, shallower-node or remote); ``message`` says it in words."""

    kind: str
    message: str
    node: str | None = None
    variant: str | None = None
    context: int | None = None
    fit: str | None = None


@dataclass(frozen=True)
class MatchResult:
    """The answer of ``client.match``: ranked candidates (best first) and suggestions."""

    candidates: tuple[MatchCandidate, ...]
    suggestions: tuple[MatchSuggestion, ...]

    @property
    def best(self) -> MatchCandidate | None:
        return self.candidates[0] if self.candidates else None


@dataclass(frozen=True)
class AdapterCacheCounters:
    """An engine's adapter cache: lookups that hit or missed, loads from disk, evictions."""

    hits: int
    misses: int
    loads: int
    evictions: int
    active: int
    host: int
    host_bytes: int


@dataclass(frozen=True)
class TrunkStatus:
    """One base model in one server process and the engine that serves its tree."""

    tree: str
    base_digest: str
    loaded_adapters: tuple[str, ...]
    queue_depth: int
    running: int
    max_batch: int
    cache: AdapterCacheCounters


@dataclass(frozen=True)
class ServerStatus:
    """``client.status()``: the server's version, auth mode, the caller's tenant and its trunks."""

    version: str
    uptime_s: float
    auth_enabled: bool
    tenant: str | None
    trunks: tuple[TrunkStatus, ...]
    in_flight: int


@dataclass(frozen=True)
class UpdateStatus:
    """Where one update stands: ``client.submit_update(...)``, ``client.update_status(id)``.

    ``kind``: package (what a node signed), candidate (a parent version awaiting approvals) or
    contribution (an approved version offered to its own parent). ``state``: pending, aggregated,
    absorbed, awaiting-approval, stable or rejected; ``reasons`` say why. ``figures`` holds the
    screening and gate numbers (e.g. ``gate.checks.canary.change``).
    """

    update_id: str
    kind: str
    node: str
    version: int
    parent: str
    parent_version: int
    state: str
    reasons: tuple[str, ...]
    approvals: int
    approvals_needed: int
    candidate_id: str | None
    figures: Mapping[str, float] = field(default_factory=dict)
    manifest_digest: str = ""
    envelope: bytes = field(default=b"", repr=False)

    def manifest(self) -> dict[str, Any]:
        """The manifest this update carries (review it before approving)."""
        import base64
        import json

        manifest: dict[str, Any] = json.loads(base64.b64decode(json.loads(self.envelope)["payload"]))
        return manifest


@dataclass(frozen=True)
class RollbackResult:
    """``client.rollback(...)``: the alias's new and previous version, and nodes that stayed put."""

    node: str
    alias: str
    version: int
    previous_version: int
    held: tuple[str, ...] = ()


@dataclass(frozen=True)
class Feedback:
    """One rating of a response (``Client.feedback``, ``list_feedback``, ``export_feedback``)."""

    id: int
    response_id: str
    node: str
    version: int  # the node version that answered
    rating: int  # +1 or -1
    correction: str | None
    tags: tuple[str, ...]
    created_at: datetime
    used_by: str | None = None  # the update made from it
    prompt: dict[str, Any] | None = None  # exports only, when retained: {"prompt": ...} or {"messages": [...]}
    answer: str | None = None  # exports only, when retained


@dataclass(frozen=True)
class Retention:
    """Whether the caller's prompts and answers on ``node`` are kept (off unless turned on)."""

    node: str
    enabled: bool
