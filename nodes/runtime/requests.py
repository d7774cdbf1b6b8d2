"""Values that cross the engine's boundary: requests, sampling parameters, results, chunks.

These are the contract between the engine (:mod:`nodes.runtime.engine`), the transports in
``cluster/`` (gRPC and the OpenAI-compatible HTTP API both translate to a GenerationRequest)
and, converted to protos, the SDK. Every sampling feature lives here and in the engine, per
row of the batch; a transport only translates.

Sampling parameters and their limits (checked in ``__post_init__``; InvalidRequest names the field):

=====================  ==========================================================================
``max_new_tokens``     >= 1; 0 only with ``echo`` (pure scoring: the prompt is prefilled, nothing
                       is generated, finish reason ``length``). The engine also caps it.
``n``                  1 .. MAX_CHOICES (16) completions; the prompt is prefilled once and its KV
                       forked into n rows. Choice 0 uses ``seed`` itself, choice i a seed derived
                       from (seed, i): choices differ and are reproducible.
``presence_penalty``   [-2, 2]: subtracted once from the logit of every token the row generated.
``frequency_penalty``  [-2, 2]: subtracted once per occurrence (OpenAI's formula):
                       ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``.
``logit_bias``         up to MAX_LOGIT_BIAS entries token id -> bias in [-100, 100], added to the logits.
``logprobs``           each generated token's log-probability under the node's effective model
                       (log_softmax of the raw logits: before temperature, penalties, bias, grammar).
``top_logprobs``       0 .. MAX_TOP_LOGPROBS (20) most likely alternatives per position; needs logprobs.
``echo``               the result also carries the prompt's tokens (and, with logprobs, theirs;
                       the first prompt token has none).
``response_format``    None / ``text``, ``json_object`` (any JSON object) or ``json_schema``
                       (constrained decoding; the row stops when the JSON value is complete).
=====================  ==========================================================================

A request's text is bounded before anything tokenizes it: ``prompt``, or the messages' contents
together, at most MAX_PROMPT_BYTES (1 MiB) of UTF-8 (InvalidRequest naming ``prompt`` /
``messages``). After tokenizing, the engine refuses a prompt that leaves no room in the base's
context. The engine tokenizes and detokenizes off the event loop.
"""

from __future__ import annotations

import enum
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard

from nodes.errors import InvalidRequest

__all__ = [
    "DEFAULT_CONTENDED_RUNNING",
    "MAX_CHOICES",
    "MAX_LOGIT_BIAS",
    "MAX_PROMPT_BYTES",
    "MAX_SCHEMA_BYTES",
    "MAX_TOP_LOGPROBS",
    "ChatMessage",
    "Choice",
    "Echo",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "ResponseFormat",
    "SamplingParams",
    "TenantLimits",
    "Timings",
    "TokenChunk",
    "TokenLogprob",
    "Usage",
]

MAX_CHOICES = 16  # completions per request (OpenAI's ``n``)
MAX_TOP_LOGPROBS = 20  # alternatives per position, as OpenAI allows
MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias
MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema's size as compact JSON text
MAX_PROMPT_BYTES = 1 << 20  # a prompt's (or all messages' contents') UTF-8 bytes, checked before tokenizing
_PENALTY = 2.0  # presence/frequency penalties lie in [-2, 2]
_BIAS = 100.0  # logit_bias values lie in [-100, 100]

_ROLES = ("system", "user", "assistant")
_FORMATS = ("text", "json_object", "json_schema")


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
class ResponseFormat:
    """What the output must be. ``schema`` is kept as compact, key-sorted JSON text (hashable, a cache key)."""

    kind: str = field(default="text", metadata={"help": "text | json_object | json_schema"})
    schema: str | None = field(
        default=None, metadata={"help": "json_schema only: the JSON Schema (JSON text or a dict/bool)"}
    )

    def __post_init__(self) -> None:
        if self.kind not in _FORMATS:
            raise InvalidRequest("response_format.type", f"must be one of {', '.join(_FORMATS)}, got {self.kind!r}")
        if self.kind != "json_schema":
            if self.schema is not None:
                raise InvalidRequest("response_format.schema", f"only json_schema takes a schema, not {self.kind}")
            return
        if self.schema is None:
            raise InvalidRequest("response_format.schema", "json_schema needs a schema")
        value: object = self.schema
        if isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidRequest("response_format.schema", f"is not valid JSON: {exc}") from None
        if not isinstance(value, (dict, bool)):
            raise InvalidRequest("response_format.schema", f"must be a JSON object, got {type(value).__name__}")
        try:
            text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest("response_format.schema", f"cannot be written as JSON: {exc}") from None
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise InvalidRequest("response_format.schema", f"is larger than {MAX_SCHEMA_BYTES} bytes")
        object.__setattr__(self, "schema", text)

    @property
    def constrained(self) -> bool:
        return self.kind != "text"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    items: Iterable[object] = value.items() if isinstance(value, Mapping) else value  # type: ignore[assignment]
    try:
        pairs: list[tuple[object, ...]] = [tuple(item) for item in items]  # type: ignore[arg-type]
    except TypeError:
        raise InvalidRequest("logit_bias", "must map token ids to biases") from None
    out: dict[int, float] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise InvalidRequest("logit_bias", "must map token ids to biases")
        token, bias = pair
        if isinstance(token, str) and token.strip().isdigit():  # JSON object keys arrive as strings
            token = int(token)
        if not _is_int(token) or token < 0:
            raise InvalidRequest("logit_bias", f"token ids must be integers >= 0, got {token!r}")
        if not _is_number(bias) or not -_BIAS <= bias <= _BIAS:
            raise InvalidRequest("logit_bias", f"biases must be in [-100, 100], got {bias!r} for token {token}")
        out[token] = float(bias)
    if len(out) > MAX_LOGIT_BIAS:
        raise InvalidRequest("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(out)}")
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    """How to decode (see the module docstring for every limit). ``temperature == 0`` means greedy."""

    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate per choice (0: echo only)"})
    temperature: float = field(default=0.0, metadata={"help": ">= 0; 0 = greedy (top_p/top_k then do nothing)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass, in (0, 1]"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = no top-k filtering"})
    seed: int | None = field(default=None, metadata={"help": "RNG seed of choice 0 (choice i derives its own)"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "strings that end a choice (not included)"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past end-of-sequence (benchmarks)"})
    n: int = field(default=1, metadata={"help": f"completions, 1..{MAX_CHOICES}; one prefill, KV forked"})
    presence_penalty: float = field(default=0.0, metadata={"help": "[-2, 2], once per generated token kind"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "[-2, 2], once per generated occurrence"})
    logit_bias: tuple[tuple[int, float], ...] = field(
        default=(), metadata={"help": "token id -> bias in [-100, 100] (a mapping is accepted); sorted pairs"}
    )
    logprobs: bool = field(default=False, metadata={"help": "return each generated token's log-probability"})
    top_logprobs: int = field(
        default=0, metadata={"help": f"0..{MAX_TOP_LOGPROBS} alternatives per position (needs logprobs)"}
    )
    echo: bool = field(default=False, metadata={"help": "return the prompt's tokens (and logprobs) too"})
    response_format: ResponseFormat | None = field(
        default=None, metadata={"help": "None/text, json_object or json_schema (constrained decoding)"}
    )

    def __post_init__(self) -> None:
        self._check_decoding()
        self._check_features()

    def _check_decoding(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise InvalidRequest("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens == 0 and self.echo is not True:
            raise InvalidRequest("max_new_tokens", "must be a positive integer (0 only with echo: scoring)")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequest("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequest("seed", f"must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            raise InvalidRequest("stop", "must be a list of strings, not one string")
        stops = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise InvalidRequest("stop", "stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stops)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    def _check_features(self) -> None:
        if not _is_int(self.n) or not 1 <= self.n <= MAX_CHOICES:
            raise InvalidRequest("n", f"must be an integer in 1..{MAX_CHOICES}, got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -_PENALTY <= value <= _PENALTY:
                raise InvalidRequest(name, f"must be in [-2, 2], got {value!r}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        for name in ("logprobs", "echo", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(name, f"must be true or false, got {getattr(self, name)!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                "top_logprobs", f"must be an integer in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}"
            )
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs=true")
        if self.response_format is not None and not isinstance(self.response_format, ResponseFormat):
            raise InvalidRequest("response_format", "must be a ResponseFormat")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def constrained(self) -> bool:
        return self.response_format is not None and self.response_format.constrained


# The engine's contended share (nodes.runtime.fair): 4 kept another tenant's p50 within 1.3-1.8x
# of alone under a 200-stream flood here (2 and 8 did worse); see the README's fairness table.
DEFAULT_CONTENDED_RUNNING = 4


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's share of an engine (see :mod:`nodes.runtime.fair`); None = no bound of its own."""

    max_running: int | None = field(default=None, metadata={"help": "requests of the tenant in the batch at once"})
    max_queued: int | None = field(default=None, metadata={"help": "requests of the tenant waiting to be admitted"})

    def __post_init__(self) -> None:
        for name in ("max_running", "max_queued"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidRequest(f"limits.{name}", f"must be an integer >= 1 or None, got {value!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request for one node. Exactly one of ``prompt`` / ``messages``."""

    node: str  # node id, e.g. "demo/en/medical/radiology"; the tree name alone is the base
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    params: SamplingParams = SamplingParams()
    deadline: float | None = None  # absolute, time.time() seconds; None = no deadline
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tenant: str | None = None  # who asks (the server stamps the authenticated caller's); None = anonymous
    limits: TenantLimits | None = None  # the tenant's share (the server stamps it); None = the engine's defaults

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
        self._check_size()
        if not isinstance(self.params, SamplingParams):
            raise InvalidRequest("params", "must be a SamplingParams")

    def _check_size(self) -> None:
        field_name = "prompt" if self.prompt is not None else "messages"
        texts = [self.prompt] if self.prompt is not None else [getattr(m, "content", "") for m in self.messages or ()]
        size = 0
        for text in texts:
            if not isinstance(text, str):
                continue  # ChatMessage refuses it with its own message
            # Characters never outnumber UTF-8 bytes: a huge text is refused without encoding it.
            size += len(text) if len(text) > MAX_PROMPT_BYTES else len(text.encode("utf-8", "surrogatepass"))
            if size > MAX_PROMPT_BYTES:
                raise InvalidRequest(
                    field_name, f"more than {MAX_PROMPT_BYTES} bytes of text (the limit per request); shorten it"
                )


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token, a stop string, or the response format's value is complete
    LENGTH = "length"  # max_new_tokens or the context limit reached (also echo with max_new_tokens 0)
    CANCELLED = "cancelled"
    DEADLINE = "deadline"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # counted once, whatever n is
    completion_tokens: int  # summed over every choice

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queue_s: float  # admission -> first scheduled
    ttft_s: float  # admission -> first token
    total_s: float  # admission -> finished


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token with its log-probability under the node's effective model (base + chain)."""

    token_id: int
    token: str  # the token's text on its own (U+FFFD where it holds part of a UTF-8 character)
    token_bytes: bytes  # its exact bytes (OpenAI's ``bytes``): join them to rebuild split characters
    logprob: float | None  # None only for the first prompt token (nothing precedes it)
    top: tuple[TokenLogprob, ...] = ()  # the top_logprobs most likely tokens at this position, best first


@dataclass(frozen=True)
class Echo:
    """The prompt as the engine saw it (``echo``): its text, tokens and, with logprobs, their logprobs."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per prompt token; the first has logprob None


@dataclass(frozen=True)
class Choice:
    """One of the ``n`` completions of a request."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when logprobs was asked


@dataclass(frozen=True)
class TokenChunk:
    """A piece of a streamed response.

    Each choice's last chunk carries its ``finish_reason``; the request's very last chunk also
    carries usage and timings. With echo, the first chunk (choice 0, no tokens) carries ``echo``.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    index: int  # 0-based position of the chunk in the request's stream (all choices together)
    finish_reason: FinishReason | None = None
    node_version: int = 1  # the version of the node that answered
    usage: Usage | None = None  # set on the request's last chunk only
    timings: Timings | None = None  # set on the request's last chunk only
    choice: int = 0  # which of the n completions this chunk belongs to
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when logprobs was asked
    echo: Echo | None = None  # the prompt, on the first chunk only, when echo was asked


@dataclass(frozen=True)
class GenerationResult:
    """The whole answer. The top-level text/tokens/finish_reason/logprobs are choice 0's."""

    request_id: str
    node: str
    node_version: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    logprobs: tuple[TokenLogprob, ...] | None = None  # choice 0's, when logprobs was asked
    choices: tuple[Choice, ...] = ()  # every choice, index order (choice 0 repeated here)
    echo: Echo | None = None  # the prompt, when echo was asked
