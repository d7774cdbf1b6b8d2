"""Every finished generation leaves a response row, so feedback can name it (registry/feedback.py).

    recorder = ResponseRecorder(RetentionCache(registry)) # one per server; TreeServer makes it
    trunk = RecordingTrunk(tenant_trunk, recorder, caller.tenant)   # what Admission.admit returns
    result = await trunk.generate(request)                # returns once the response row is committed

The row holds the tenant, the response id (the engine request's id: ``chatcmpl-...``,
``cmpl-...`` or a gRPC ``request_id``), the canonical node id and the version that answered. The
prompt (as JSON, ``{"prompt": text}`` or ``{"messages": [...]}``) and choice 0's answer are kept
only where the tenant turned retention on for that node; the writer thread decides, from a
retention cache that is refreshed every few seconds and updated at once by :meth:`set_retention`.

Writes are grouped: rows that arrive while a transaction is being committed share the next one
(one writer, off the event loop). A response is handed to its caller only after its row is
committed, so feedback sent right after the answer finds it, whichever ingress replica takes it
(on Ray they share the registry database). A database failure is logged and the answer still
goes out: feedback on it then gets 404, generation never fails for the sake of a record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from cluster.service.trunk import Trunk, TrunkView
from nodes.runtime.requests import GenerationRequest, GenerationResult, TokenChunk
from registry.db import Registry
from registry.feedback import ResponseEntry, record_responses, retention_enabled, set_retention

__all__ = ["RecordingTrunk", "ResponseRecorder", "RetentionCache"]

log = logging.getLogger("treelm.feedback")

_MAX_ID_CHARS = 128  # registry/feedback.py's bound: a longer (caller-chosen gRPC) id could never take feedback
_MAX_BATCH = 512  # rows in one transaction


class RetentionCache:
    """(tenant, node) -> retention on? Answers for ``ttl_s``; ``set`` writes through and updates at once."""

    def __init__(self, registry: Registry, *, ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.registry = registry
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()  # the writer thread and the request threads both read it
        self._cache: dict[tuple[str, str], tuple[bool, float]] = {}

    def enabled(self, tenant: str, node: str) -> bool:
        """Blocking (a registry read on a miss): call from a thread."""
        key = (tenant, node)
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        answer = retention_enabled(self.registry, tenant, node)
        with self._lock:
            if len(self._cache) > 10_000:  # tenants x nodes seen lately; an old burst must not pin memory
                self._cache.clear()
            self._cache[key] = (answer, now + self._ttl)
        return answer

    def set(self, tenant: str, node: str, enabled: bool) -> None:
        """Blocking: store the switch, then answer from it at once in this process."""
        set_retention(self.registry, tenant, node, enabled)
        with self._lock:
            self._cache[(tenant, node)] = (enabled, self._clock() + self._ttl)


@dataclass(frozen=True)
class _Finished:
    """A generation to record; the JSON is built in the writer thread, and only under retention."""

    tenant: str
    response_id: str
    node: str
    version: int
    request: GenerationRequest | None  # None: no texts to keep (a multi-prompt completion's whole id)
    answer: str

    def entry(self, retained: bool) -> ResponseEntry:
        if not retained or self.request is None:
            return ResponseEntry(self.tenant, self.response_id, self.node, self.version)
        r = self.request
        if r.messages is not None:
            prompt = json.dumps({"messages": [{"role": m.role, "content": m.content} for m in r.messages]})
        else:
            prompt = json.dumps({"prompt": r.prompt or ""})
        return ResponseEntry(self.tenant, self.response_id, self.node, self.version, prompt, self.answer)


class ResponseRecorder:
    """The group-commit writer of response rows (see the module docstring). One event loop."""

    def __init__(self, retention: RetentionCache):
        self.registry = retention.registry
        self.retention = retention
        self._pending: list[tuple[_Finished, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.transactions = 0  # committed batches (a test and the benchmark read it)
        self.failures = 0

    async def record(
        self,
        tenant: str | None,
        response_id: str,
        node: str,
        version: int,
        request: GenerationRequest | None = None,
        answer: str = "",
    ) -> None:
        """Returns once the row is committed (or its transaction failed and was logged)."""
        if not response_id or len(response_id) > _MAX_ID_CHARS:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((_Finished(tenant or "", response_id, node, version, request, answer), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        # The row is written even when this caller is cancelled meanwhile: shield the shared work.
        await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            try:
                await asyncio.to_thread(self._write, [item for item, _ in batch])
                self.transactions += 1
            except Exception:
                self.failures += 1
                log.warning(
                    "could not record %d responses; feedback on them will find nothing", len(batch), exc_info=True
                )
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _write(self, items: list[_Finished]) -> None:
        retained = {key: self.retention.enabled(*key) for key in {(i.tenant, i.node) for i in items}}
        entries = [i.entry(retained[(i.tenant, i.node)]) for i in items]
        try:
            record_responses(self.registry, entries)
        except Exception:
            if len(entries) == 1:
                raise
            # One bad row (another replica stored a caller-chosen id at the same moment) must not
            # cost the others theirs: write them one by one, logging only those that fail.
            for entry in entries:
                try:
                    record_responses(self.registry, [entry])
                except Exception:
                    self.failures += 1
                    log.warning("could not record response %.80r", entry.response_id, exc_info=True)

    async def close(self) -> None:
        """Wait for the rows queued now (a server that stops lets its last answers' rows land)."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)


class RecordingTrunk(TrunkView):
    """A trunk as one caller uses it, recording each finished generation before handing it back."""

    def __init__(self, trunk: Trunk, recorder: ResponseRecorder, tenant: str | None):
        super().__init__(trunk)
        self._recorder = recorder
        self.tenant = tenant

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = await self.trunk.generate(request)
        await self._recorder.record(
            self.tenant, request.request_id, request.node, result.node_version, request, result.text
        )
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        answer: list[str] = []  # choice 0's text, the one a retained record keeps
        chunks = self.trunk.stream(request)
        try:
            async for chunk in chunks:
                if chunk.choice == 0:
                    answer.append(chunk.text)
                if chunk.usage is not None:  # the request's last chunk: record before the caller sees it
                    await self._recorder.record(
                        self.tenant, request.request_id, request.node, chunk.node_version, request, "".join(answer)
                    )
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def record(self, response_id: str, node: str, version: int) -> None:
        """Record a response made of several engine requests (a multi-prompt completion's own id)."""
        await self._recorder.record(self.tenant, response_id, node, version)
