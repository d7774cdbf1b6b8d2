"""Values that cross the engine's boundary: requests, sampling parameters, results, chunks.

These are the contract between the engine (nodes/engine), the gRPC servers
(cluster/) and, converted to protos, the SDK.
"""

from __future__ import annotations

import enum
import math
import uuid
from dataclasses import dataclass, field

from nodes.errors import InvalidRequest

__all__ = [
    "ChatMessage",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "Timings",
    "TokenChunk",
    "Usage",
]

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise InvalidRequest("messages.role", f"must be one of {', '.join(_ROLES)}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise InvalidRequest("messages.content", "must be a string")


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. ``temperature == 0`` means greedy (top_p/top_k then do nothing)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks)

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens <= 0
        ):
            raise InvalidRequest("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise InvalidRequest("temperature", f"must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequest("seed", f"must be an integer, got {self.seed!r}")
        stops = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise InvalidRequest("stop", "stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stops)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request for one node. Exactly one of ``prompt`` / ``messages``."""

    node: str  # node id, e.g. "demo/en/medical/radiology"; the tree name alone is the base
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    params: SamplingParams = SamplingParams()
    deadline: float | None = None  # absolute, time.time() seconds; None = no deadline
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node.strip():
            raise InvalidRequest("node", "must name a node, e.g. 'demo/en/medical'")
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("prompt", "give exactly one of prompt or messages")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidRequest("prompt", "must be a string")
        if self.messages is not None:
            msgs = tuple(self.messages)
            if not msgs:
                raise InvalidRequest("messages", "must not be empty")
            object.__setattr__(self, "messages", msgs)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens or the context limit reached
    CANCELLED = "cancelled"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queue_s: float  # admission -> first scheduled
    ttft_s: float  # admission -> first token
    total_s: float  # admission -> finished


@dataclass(frozen=True)
class TokenChunk:
    """A piece of a streamed response. The last chunk carries ``finish_reason``."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    index: int  # 0-based position of the chunk in the stream
    finish_reason: FinishReason | None = None
    node_version: int = 1  # the version of the node that answered
    usage: Usage | None = None  # set on the last chunk only
    timings: Timings | None = None  # set on the last chunk only


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    node: str
    node_version: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
