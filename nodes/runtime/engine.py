"""The generation engine of one trunk: one base model, every node of its tree, one batch.

    engine = Engine(base_dir_or_loaded_base, tree_dir, EngineConfig(max_batch_size=32))
    result = await engine.generate(GenerationRequest(node="demo/en/medical", prompt="..."))
    async for chunk in engine.stream(request): ...
    engine.stats()        # queue depth, active requests, cache counters
    await engine.aclose()

Requests are checked when submitted (typed errors, nothing queued): unknown
node, bad parameters, a prompt that does not fit the context, a full queue.
The model runs on one background thread (see :mod:`nodes.runtime.scheduler`); the
async API only waits on it, so an event loop (e.g. a gRPC server) stays free.

How a request can end:

- finished: a GenerationResult (``stop`` or ``length``), or the last TokenChunk;
- cancelled or past its deadline *while generating*: a partial result with
  finish reason ``cancelled`` / ``deadline``;
- cancelled or past its deadline *while queued*: RequestCancelled /
  DeadlineExceeded is raised; an adapter that fails its sha256 check raises
  IntegrityError; EngineClosed when the engine shuts down.

Sampling features, per row of the mixed batch (see :mod:`nodes.runtime.requests` for each
field's limits): ``n`` choices from one prefill, presence/frequency penalties and logit bias,
logprobs with top alternatives (of the node's effective model, before any of those), ``echo``
of the prompt with its logprobs (``max_new_tokens=0`` scores a prompt), and structured output
(``response_format``: JSON object or JSON schema, :mod:`nodes.runtime.grammar`). A schema is
compiled off the event loop when a request first uses it, and refused there (InvalidRequest
naming ``response_format.schema``) before anything is queued. The engine itself also refuses
``n`` above ``max_batch_size``, a ``logit_bias`` token outside the vocabulary, and ``echo`` on a
model whose output head does more than one linear layer.

Node versions come from node.json; the base itself answers as version 0. A tree dir with a
snapshot (nodes.store.versions) is served as the snapshot pins it; a newer snapshot on disk is picked
up by the next request (checked at most once a second), or at once with ``use_tree``/``refresh``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hierarchy.errors import InvalidNodePath
from hierarchy.ids import NodeId
from nodes.base.model import LoadedBase, load_base
from nodes.base.precision import PRECISIONS, apply_precision, precision_of
from nodes.errors import (
    BaseModelError,
    DeadlineExceeded,
    EngineClosed,
    EngineConfigError,
    InvalidRequest,
    UnknownNode,
)
from nodes.runtime.bank import AdapterBank
from nodes.runtime.cache import AdapterCache, CacheStats
from nodes.runtime.chunks import merge_chunks
from nodes.runtime.grammar import Grammars, RowGrammar
from nodes.runtime.kv import check_supported
from nodes.runtime.logprobs import TokenTable
from nodes.runtime.prefix import PrefixCache
from nodes.runtime.requests import (
    DEFAULT_CONTENDED_RUNNING,
    GenerationRequest,
    GenerationResult,
    TenantLimits,
    TokenChunk,
)
from nodes.runtime.scheduler import Job, Limits, Scheduler
from nodes.store.tree import BuiltNode, BuiltTree
from nodes.store.versions import SNAPSHOT_RECORD, open_served_tree

__all__ = ["Engine", "EngineConfig", "EngineConfigError", "EngineStats"]


# How often a request may look at the tree dir's snapshot.json for a newer snapshot (one stat).
_SNAPSHOT_POLL_S = 1.0
# Config fields of heads that do more than one linear layer (echo's prompt logits would differ).
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine. Every field is checked in ``__post_init__``."""

    max_batch_size: int = field(default=32, metadata={"help": "rows decoded together in one step"})
    max_tokens_in_flight: int = field(
        default=65536, metadata={"help": "sum over running requests of prompt + max new tokens (KV cache bound)"}
    )
    max_queue: int = field(default=1024, metadata={"help": "waiting requests; beyond it submissions get QueueFull"})
    max_new_tokens_limit: int = field(default=2048, metadata={"help": "largest max_new_tokens a request may ask"})
    max_context: int | None = field(
        default=None, metadata={"help": "prompt + completion bound; None = the model's max_position_embeddings"}
    )
    max_prefill_tokens: int = field(default=4096, metadata={"help": "padded tokens in one prefill forward"})
    max_active_adapters: int = field(default=512, metadata={"help": "adapters active in the bank at once"})
    host_cache_bytes: int = field(default=2 << 30, metadata={"help": "bytes of inactive adapters kept in memory"})
    prefill_chunk: int = field(
        default=32,
        metadata={"help": "a longer prompt is prefilled this many tokens per step, between decode steps (0: whole)"},
    )
    prefix_cache_bytes: int = field(
        default=256 << 20, metadata={"help": "bytes of prompt-prefix keys/values kept for reuse (0: off)"}
    )
    tenant_max_running: int | None = field(
        default=None, metadata={"help": "a tenant's requests in the batch, unless its request carries limits"}
    )
    tenant_max_queued: int | None = field(
        default=None, metadata={"help": "a tenant's waiting requests, unless its request carries limits"}
    )
    tenant_step_rows: int | None = field(
        default=None,
        metadata={"help": "a tenant's rows decoded per step while other tenants have rows; None = all rows"},
    )
    tenant_contended_running: int | None = field(
        default=DEFAULT_CONTENDED_RUNNING,
        metadata={"help": "a tenant's requests admitted to the batch while a light tenant has requests; None = off"},
    )
    precision: str = field(
        default="fp32",
        metadata={"help": "fp32, bf16, int8 (weight-only, bf16 activations) or auto (bf16 where the CPU has it)"},
    )

    def __post_init__(self) -> None:
        if self.precision not in (*PRECISIONS, "auto"):
            raise EngineConfigError(
                f"EngineConfig.precision must be one of {', '.join(PRECISIONS)} or auto, got {self.precision!r}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "precision":
                continue
            if value is None and f.name in (
                "max_context",
                "tenant_max_running",
                "tenant_max_queued",
                "tenant_step_rows",
                "tenant_contended_running",
            ):
                continue
            minimum = 0 if f.name in ("host_cache_bytes", "prefix_cache_bytes", "prefill_chunk") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise EngineConfigError(f"EngineConfig.{f.name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for Admin.Status and Prometheus (see ``as_dict``)."""

    queue_depth: int
    active_requests: int
    max_batch_size: int
    max_queue: int
    tokens_in_flight: int
    max_tokens_in_flight: int
    submitted: int
    completed: int
    failed: int  # errors delivered to callers (integrity, deadline or cancel while queued, shutdown)
    rejected: int  # QueueFull at submission
    cancelled: int
    deadline: int  # finished with finish_reason "deadline"
    prompt_tokens: int
    tokens_generated: int
    decode_steps: int
    prefill_batches: int
    grammars_compiled: int  # distinct response formats compiled (the rest were cache hits)
    closed: bool
    cache: CacheStats
    prefix_hits: int = 0  # prompts that continued from a cached prefix
    prefix_tokens_reused: int = 0  # prompt tokens not computed again
    prefix_bytes: int = 0  # keys/values held by the prefix cache

    def as_dict(self) -> dict[str, int | float | bool]:
        out: dict[str, int | float | bool] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cache"}
        out.update({f"cache_{k}": v for k, v in self.cache.as_dict().items()})
        return out


class _QueueSink:
    """Delivers a job's events from the model thread to the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: object) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:  # the caller's loop is closed
            return False


class Engine:
    """Serves every node of one built tree over one base model (see the module docstring)."""

    def __init__(self, base: str | Path | LoadedBase, tree: str | Path | BuiltTree, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        # From a directory: what its snapshot serves (nodes.store.versions), else the built tree itself.
        self._root = None if isinstance(tree, BuiltTree) else Path(tree)
        self.tree = tree if isinstance(tree, BuiltTree) else open_served_tree(tree)
        self._snapshot_stamp = self._stamp()
        self._snapshot_checked = time.monotonic()
        if isinstance(base, LoadedBase):
            if self.tree.base_digest and base.digest != self.tree.base_digest:
                raise BaseModelError(
                    f"the loaded base {base.path} has digest {base.digest[:12]}..., tree {self.tree.name!r} "
                    f"was built over {self.tree.base_digest[:12]}..."
                )
            self.base = base
        else:
            self.base = load_base(base, digest=self.tree.base_digest or None)
        model: Any = self.base.model  # a transformers PreTrainedModel
        apply_precision(model, self.config.precision)  # a LoadedBase in place, as the bank wraps it in place
        self.precision = precision_of(model)
        tokenizer: Any = self.base.tokenizer
        check_supported(model.config)
        self.tokenizer: Any = tokenizer
        positions = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.context_length = min(self.config.max_context or positions, positions)
        depth = max((len(self.tree.chain(n.node_id)) for n in self.tree.nodes), default=0)
        if self.config.max_active_adapters < depth:
            raise EngineConfigError(
                f"EngineConfig.max_active_adapters ({self.config.max_active_adapters}) must be at least the "
                f"deepest chain of the tree ({depth})"
            )
        self._bank = AdapterBank(model)
        self.cache = AdapterCache(
            self._bank, max_active=self.config.max_active_adapters, host_bytes=self.config.host_cache_bytes
        )
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        config_eos = getattr(model.generation_config, "eos_token_id", None)
        eos |= set(
            config_eos if isinstance(config_eos, (list, tuple)) else [config_eos] if config_eos is not None else []
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
        limits = Limits(
            max_batch_size=self.config.max_batch_size,
            max_tokens_in_flight=self.config.max_tokens_in_flight,
            max_queue=self.config.max_queue,
            max_prefill_tokens=self.config.max_prefill_tokens,
            tenant=TenantLimits(self.config.tenant_max_running, self.config.tenant_max_queued),
            prefill_chunk=self.config.prefill_chunk,
            step_rows=self.config.tenant_step_rows,
            contended_running=self.config.tenant_contended_running,
        )
        head = model.get_output_embeddings()
        self.vocab_size = int(getattr(head, "out_features", 0) or model.config.vocab_size)  # the logits' width
        self._grammars = Grammars(tokenizer, self.vocab_size, sorted(eos))
        self._tokens = TokenTable(tokenizer)
        self._scheduler = Scheduler(
            model,
            self._bank,
            self.cache,
            limits,
            sorted(eos),
            pad,
            self.vocab_size,
            prefix=PrefixCache(self.config.prefix_cache_bytes),
            base_digest=self.tree.base_digest,
        )
        self._closed = False
        self._thread = threading.Thread(target=self._scheduler.run, name="treelm-engine", daemon=True)
        self._thread.start()

    # -- requests --------------------------------------------------------------
    def resolve(self, node: str) -> tuple[BuiltNode, ...]:
        """The chain of ``node`` (empty for the base); UnknownNode if this tree does not have it."""
        try:
            node_id = NodeId.parse(node)
        except InvalidNodePath as exc:
            raise InvalidRequest("node", str(exc)) from None
        if node_id.tree == self.tree.name and not self.tree.has(node_id) and self._root is not None:
            # A node created (or a snapshot switched) since the last look: one stat, only on a miss,
            # so a new node answers at once rather than after the next periodic check.
            self.refresh()
        if node_id.tree != self.tree.name or not self.tree.has(node_id):
            raise UnknownNode(f"node {node!r} is not served here (tree {self.tree.name!r})")
        return self.tree.chain(node_id)

    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: the text as is, or messages through the tokenizer's chat template."""
        return self._prompt(request)[1]

    def _prompt(self, request: GenerationRequest) -> tuple[str, list[int]]:
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest("messages", "this base has no chat template; send a plain prompt")
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True,
                tokenize=False,
            )
            return text, list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return request.prompt or "", list(self.tokenizer(request.prompt).input_ids)

    def _job(self, request: GenerationRequest, sink: _QueueSink, streaming: bool) -> Job:
        if not isinstance(request, GenerationRequest):
            raise InvalidRequest("request", f"expected a GenerationRequest, got {type(request).__name__}")
        chain = self.resolve(request.node)
        params = request.params
        if params.max_new_tokens > self.config.max_new_tokens_limit:
            raise InvalidRequest(
                "max_new_tokens",
                f"{params.max_new_tokens} is above this engine's limit of {self.config.max_new_tokens_limit}",
            )
        self._check_features(params)
        prompt_text, prompt = self._prompt(request)
        if not prompt:
            raise InvalidRequest("prompt", "the prompt has no tokens")
        if len(prompt) > self.context_length or (len(prompt) == self.context_length and params.max_new_tokens):
            field_name = "messages" if request.messages is not None else "prompt"
            raise InvalidRequest(
                field_name, f"{len(prompt)} tokens leave no room in a context of {self.context_length}; shorten it"
            )
        max_new = min(params.max_new_tokens, self.context_length - len(prompt))
        if params.n * (len(prompt) + max_new) > self.config.max_tokens_in_flight:
            raise InvalidRequest(
                "max_new_tokens",
                f"n ({params.n}) x (prompt ({len(prompt)}) + max_new_tokens ({max_new})) exceeds "
                f"max_tokens_in_flight ({self.config.max_tokens_in_flight})",
            )
        if request.deadline is not None and request.deadline <= time.time():
            raise DeadlineExceeded(f"request {request.request_id} arrived after its deadline")
        return Job(
            request=request,
            prompt_ids=prompt,
            chain=chain,
            node_version=chain[-1].version if chain else 0,
            max_new=max_new,
            sink=sink,
            streaming=streaming,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            prompt_text=prompt_text,
            grammars=self._row_grammars(request),
            table=self._tokens,
        )

    def _check_features(self, params) -> None:
        """What only the engine can check: limits of this batch, vocabulary and model."""
        if params.n > self.config.max_batch_size:
            raise InvalidRequest("n", f"{params.n} choices do not fit a batch of {self.config.max_batch_size} rows")
        outside = [token for token, _ in params.logit_bias if token >= self.vocab_size]
        if outside:
            raise InvalidRequest("logit_bias", f"token {outside[0]} is outside the vocabulary ({self.vocab_size})")
        if params.echo:
            model: Any = self.base.model
            extras = [n for n in _HEAD_EXTRAS if getattr(model.config, n, None) not in (None, 1, 1.0)]
            if extras or model.get_decoder() is None or model.get_output_embeddings() is None:
                raise InvalidRequest("echo", f"not supported for {type(model).__name__} (its head has {extras})")

    def _row_grammars(self, request: GenerationRequest) -> list[RowGrammar] | None:
        params = request.params
        if not params.constrained or params.response_format is None:
            return None
        return self._grammars.matchers(params.response_format, params.n)

    async def _compile(self, request: GenerationRequest) -> None:
        """Compile a new response format off the event loop (milliseconds; the first one builds the tokenizer)."""
        fmt = request.params.response_format if isinstance(request, GenerationRequest) else None
        if fmt is not None and fmt.constrained and not self._grammars.ready(fmt):
            await asyncio.to_thread(self._grammars.compile, fmt)

    async def _submit(self, request: GenerationRequest, streaming: bool) -> tuple[Job, _QueueSink]:
        if self._closed:
            raise EngineClosed("the engine is closed")
        if self._root is not None and time.monotonic() - self._snapshot_checked >= _SNAPSHOT_POLL_S:
            self.refresh()
        sink = _QueueSink(asyncio.get_running_loop())
        if isinstance(request, GenerationRequest):
            self._scheduler.check_room(request.tenant, request.limits)
        # Tokenizing a long prompt takes long: in a thread, so other calls on this loop go on meanwhile.
        job = await asyncio.to_thread(self._job, request, sink, streaming)
        self._scheduler.submit(job)
        return job, sink

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` to the end and return its result (see the module docstring for errors)."""
        await self._compile(request)
        job, sink = await self._submit(request, streaming=False)
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerationResult):
                    return item
        except asyncio.CancelledError:
            self._abandon(job)
            raise

    async def stream(self, request: GenerationRequest, *, coalesce: bool = False) -> AsyncIterator[TokenChunk]:
        """Yield the request's tokens as they come; the last chunk has ``finish_reason`` and usage.

        With ``coalesce``, the chunks that arrived while the reader was away are merged into one
        (:func:`nodes.runtime.chunks.merge_chunks`): a reader that pays per chunk catches up.
        Closing the iterator early (a client disconnect) cancels the request;
        its slot is freed at the next step.
        """
        await self._compile(request)
        job, sink = await self._submit(request, streaming=True)
        sent = 0  # coalesced chunks are numbered again: ``index`` is the chunk's position in the stream
        try:
            while True:
                items = [await sink.queue.get()]
                if coalesce:
                    while not sink.queue.empty():
                        items.append(sink.queue.get_nowait())
                    items = merge_chunks(items)
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, TokenChunk):
                        yield replace(item, index=sent) if coalesce and item.index != sent else item
                        sent += 1
                    elif isinstance(item, GenerationResult):
                        return
        finally:
            self._abandon(job)

    def _abandon(self, job: Job) -> None:
        if not job.finished:
            job.cancelled = True
            self._scheduler.wake()

    async def preload(self, nodes: Sequence[str]) -> None:
        """Load and verify the adapters of ``nodes`` before traffic arrives (a warm replica).

        Raises UnknownNode / IntegrityError like a request would; adapters beyond
        ``max_active_adapters`` end up in host memory (least recently used first).
        """
        if self._closed:
            raise EngineClosed("the engine is closed")
        chains = [self.resolve(node) for node in nodes]

        def load() -> None:
            for chain in chains:
                self.cache.release(self.cache.acquire(chain))

        await asyncio.wrap_future(self._scheduler.call(load))

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; False if no such request is in flight."""
        return self._scheduler.cancel(request_id)

    # -- snapshots --------------------------------------------------------------
    def use_tree(self, tree: BuiltTree) -> None:
        """Serve ``tree`` (another snapshot of the same tree) from the next admitted request on.

        Admitted requests keep the chains they were admitted with, and the cache names every
        stored version by its own key, so each request sees exactly one snapshot.
        """
        if tree.name != self.tree.name or tree.base_digest != self.tree.base_digest:
            raise EngineConfigError(
                f"cannot switch tree {self.tree.name!r} (base {self.tree.base_digest[:12]}) to tree "
                f"{tree.name!r} (base {tree.base_digest[:12]}): only snapshots of the same tree"
            )
        depth = max((len(tree.chain(n.node_id)) for n in tree.nodes), default=0)
        if self.config.max_active_adapters < depth:
            raise EngineConfigError(
                f"EngineConfig.max_active_adapters ({self.config.max_active_adapters}) must be "
                f"at least the deepest chain of the tree ({depth})"
            )
        self.tree = tree  # one reference assignment: _job reads either the old tree or the new one

    def _stamp(self) -> tuple[int, int] | None:
        if self._root is None:
            return None
        try:
            st = (self._root / SNAPSHOT_RECORD).stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def refresh(self) -> bool:
        """Serve the tree dir's snapshot if it changed on disk since the last look; True if it did."""
        self._snapshot_checked = time.monotonic()
        stamp = self._stamp()
        if self._root is None or stamp == self._snapshot_stamp:
            return False
        self._snapshot_stamp = stamp
        tree = open_served_tree(self._root)
        if getattr(tree, "serial", None) == getattr(self.tree, "serial", None):
            return False
        self.use_tree(tree)
        return True

    # -- status and lifecycle ---------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._scheduler
        c = s.counts
        return EngineStats(
            queue_depth=s.queue_depth,
            active_requests=s.active,
            max_batch_size=self.config.max_batch_size,
            max_queue=self.config.max_queue,
            tokens_in_flight=s.tokens_in_flight,
            max_tokens_in_flight=self.config.max_tokens_in_flight,
            submitted=c["submitted"],
            completed=c["completed"],
            failed=c["failed"],
            rejected=c["rejected"],
            cancelled=c["cancelled"],
            deadline=c["deadline"],
            prompt_tokens=c["prompt_tokens"],
            tokens_generated=c["tokens_generated"],
            decode_steps=c["decode_steps"],
            prefill_batches=c["prefill_batches"],
            grammars_compiled=self._grammars.compiled,
            closed=self._closed,
            cache=self.cache.stats(),
            prefix_hits=s.prefix.hits,
            prefix_tokens_reused=s.prefix.tokens_reused,
            prefix_bytes=s.prefix.stats().bytes,
        )

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop: waiting and running requests get EngineClosed; the base's layers are restored."""
        if self._closed:
            return
        self._closed = True
        self._scheduler.shutdown()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._bank.unwrap()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
