"""Pydantic models of the OpenAI API as TreeLM serves it, field by field (names and shapes as
OpenAI's; see https://platform.openai.com/docs/api-reference).

Requests are strict (a string is not a number) and closed: a field that is not here is a 400
``unknown_parameter`` naming it, as OpenAI answers. OpenAI fields that TreeLM does not offer
(tools, audio, ...) are refused the same way, with a message saying so. Ranges are checked once,
by the engine's own values (nodes/runtime/requests.py), so gRPC and HTTP refuse alike.

Responses carry two extra fields beside OpenAI's: ``node`` and ``node_version`` (the node that
answered); ``model`` is the same as ``node@node_version``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "UNSUPPORTED",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessageParam",
    "ChoiceLogprobs",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "ErrorInfo",
    "ErrorResponse",
    "FileDeleted",
    "FileList",
    "FileObject",
    "FineTuningJob",
    "FineTuningJobEvent",
    "FineTuningJobEventList",
    "FineTuningJobList",
    "FineTuningJobRequest",
    "FineTuningMethod",
    "JobErrorObject",
    "JobHyperparameters",
    "Model",
    "ModelList",
    "ResponseFormat",
    "SupervisedMethod",
    "TokenLogprob",
    "Usage",
]

# OpenAI request fields TreeLM does not offer: refused by name, with this reason.
UNSUPPORTED = {
    name: "TreeLM serves text generation only"
    for name in (
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "verbosity",
    )
} | {"suffix": "insertion (suffix) is not supported"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class StreamOptions(_Request):
    include_usage: bool | None = None  # a last chunk with usage and no choices
    include_obfuscation: bool | None = None  # accepted; TreeLM sends no obfuscation field


class JsonSchema(_Request):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None  # accepted: TreeLM's constrained decoding is always strict


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class TextPart(_Request):
    type: Literal["text"]  # images and audio are not served
    text: str


class ChatMessageParam(_Request):
    role: Literal["system", "developer", "user", "assistant"]  # developer is rendered as system
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted; chat templates have no place for it
    refusal: str | None = None  # accepted on assistant turns (an earlier answer's refusal)


class _Sampling(_Request):
    """Fields shared by both endpoints (OpenAI's names; limits in nodes/runtime/requests.py)."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    temperature: float | None = None  # OpenAI's default 1.0; 0 is greedy
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> [-100, 100]
    user: str | None = None  # accepted; TreeLM keeps no per-end-user records
    max_tokens: int | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = None  # wins over max_tokens (OpenAI deprecated that one for chat)
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..20, needs logprobs
    response_format: ResponseFormat | None = None
    # Accepted and without effect here (clients send them by default).
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # token-id prompts are refused with a reason
    echo: bool | None = None  # the prompt before the completion (with logprobs: scoring)
    logprobs: int | None = None  # 0..20 alternatives; each token's own logprob is always included
    best_of: int | None = None  # only equal to n (TreeLM does not rank extra candidates)


# -- responses ------------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(_Response):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class _Answer(_Response):
    id: str  # the engine's request id (feedback refers to it)
    created: int
    model: str  # node@version: the node version that answered
    system_fingerprint: str
    node: str  # TreeLM: the node id that answered
    node_version: int  # TreeLM: its version (0: the base)


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    """OpenAI's legacy shape: parallel lists, one entry per token (prompt tokens first with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (nothing precedes it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # each token's character offset in the choice's text


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(_Response):
    id: str  # the node id
    object: Literal["model"] = "model"
    created: int
    owned_by: str  # the owning tenant of a private node, else "treelm"
    parent: str | None  # TreeLM: the parent node (None for a base)
    tree: str
    level: str  # base | language | domain | subdomain
    visibility: str  # public | private
    stable_version: int | None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Response):
    error: ErrorInfo


# -- files and fine-tuning jobs (OpenAI's shapes; TreeLM's extensions are marked) -------------------


class SupervisedMethod(_Request):
    hyperparameters: dict[str, Any] | None = None


class FineTuningMethod(_Request):
    type: Literal["supervised"]  # TreeLM trains LoRA adapters on text: no DPO, no reinforcement
    supervised: SupervisedMethod | None = None


class FineTuningJobRequest(_Request):
    model: str  # the parent node
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None  # the new node's name (required here: it is the node's id)
    hyperparameters: dict[str, Any] | None = None  # n_epochs, learning_rate_multiplier, batch_size, ...
    method: FineTuningMethod | None = None  # OpenAI's newer place for the same hyperparameters
    visibility: Literal["private", "public"] | None = None  # TreeLM: public only with an operator token


class FileObject(_Response):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"  # a file is checked when uploaded: stored means usable
    status_details: str | None = None
    format: str  # TreeLM: jsonl | text
    records: int  # TreeLM: chat records or documents
    sha256: str  # TreeLM


class FileList(_Response):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(_Response):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobErrorObject(_Response):
    code: str
    message: str
    param: str | None


class JobHyperparameters(_Response):
    n_epochs: int | None
    batch_size: int | None
    learning_rate_multiplier: float | None = None  # the job stores the learning rate it resolved
    learning_rate: float | None  # TreeLM
    lora_rank: int | None  # TreeLM


class FineTuningJob(_Response):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str  # the parent node
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None  # the new node's id once the job succeeded
    organization_id: str  # the tenant
    result_files: list[str]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: str | None
    hyperparameters: JobHyperparameters
    trained_tokens: int | None
    error: JobErrorObject | None
    seed: int
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str
    node: str  # TreeLM: the node the job creates (= fine_tuned_model once it succeeded)
    visibility: str  # TreeLM
    started_at: int | None  # TreeLM
    cancel_requested: bool  # TreeLM
    result: dict[str, Any]  # TreeLM: held-out perplexities (the new node's and its parent's), timings, version


class FineTuningJobList(_Response):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(_Response):
    id: str  # "ftevent-<n>"
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str  # info | warn | error
    message: str
    data: dict[str, Any]
    type: Literal["message", "metrics"]


class FineTuningJobEventList(_Response):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool
