"""The Serve deployment of one trunk: each replica holds one base model and one engine.

Routing: the ingress calls ``handle.options(multiplexed_model_id=node)``, so Serve
sends a node's requests preferably to replicas that already hold its chain.
Serve's multiplexed "model" here is a :class:`NodeLease`: a light claim on the
node, never the weights. The weights stay in the engine's own adapter cache,
which pins every adapter an in-flight request uses (refcounts) and evicts only
unpinned ones, least recently used first. When Serve's per-replica LRU drops a
lease it only stops advertising the node; nothing a request uses is evicted.

Batching: a replica accepts up to ``max_ongoing_requests`` calls at once and
hands all of them to the engine, whose iteration-level scheduler batches rows
of different nodes (different chains) into one forward. No ``@serve.batch``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

import ray
import torch
from ray import serve

from cluster.ray.board import ReplicaReport, board
from cluster.ray.wire import TrunkSpec
from cluster.service.trunk import EngineTrunk
from hierarchy.errors import HierarchyError
from nodes.errors import EngineError
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, GenerationResult, TokenChunk
from nodes.store.tree import open_tree

__all__ = ["NodeLease", "TrunkReplicaBase", "replica_class"]

log = logging.getLogger("treelm.replica")
REPORT_EVERY_S = 1.0
_WINDOW_S = 60.0  # latency percentiles over this many seconds
_RATE_S = 10.0  # requests/s over this many seconds
_lease_ids = itertools.count(1)


class NodeLease:
    """What Serve's multiplexer caches per node id on a replica (see the module docstring)."""

    def __init__(self, replica: TrunkReplicaBase, node: str):
        self.node = node
        self.id = next(_lease_ids)
        self._replica = replica
        replica.routed[node] = self.id

    def __del__(self) -> None:
        # Called by Serve when its LRU drops the node (and later by the garbage collector):
        # stop advertising the node. The engine keeps the adapters until it needs their slots,
        # and never drops one that a running request uses.
        if self._replica.routed.get(self.node) == self.id:
            del self._replica.routed[self.node]


class _Window:
    """Finish times and latencies of recent requests (for requests/s and p50/p95)."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[float, float]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, latency_s: float) -> None:
        with self._lock:
            self._items.append((time.monotonic(), latency_s))

    def summary(self) -> tuple[float, float | None, float | None]:
        now = time.monotonic()
        with self._lock:
            while self._items and now - self._items[0][0] > _WINDOW_S:
                self._items.popleft()
            items = list(self._items)
        recent = sum(1 for at, _ in items if now - at <= _RATE_S)
        latencies = sorted(lat for _, lat in items)
        if not latencies:
            return recent / _RATE_S, None, None

        def pct(q: float) -> float:
            return 1000.0 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

        return recent / _RATE_S, pct(0.5), pct(0.95)


class _RequestErrors(logging.Filter):
    """Serve logs every exception a replica raises as "Request failed." with its traceback. A
    request's own errors (unknown node, bad parameter, full queue, deadline) are answers that the
    ingress passes on with their status code, not failures of the replica: keep them out of the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (EngineError, HierarchyError))


def _quiet_request_errors() -> None:
    serve_log = logging.getLogger("ray.serve")
    if not any(isinstance(f, _RequestErrors) for f in serve_log.filters):
        serve_log.addFilter(_RequestErrors())


class TrunkReplicaBase:
    """One replica of a trunk deployment; :func:`replica_class` adds the multiplexed router."""

    def __init__(self, spec: TrunkSpec):
        torch.set_num_threads(1)  # one thread per replica: several replicas share the cores
        _quiet_request_errors()
        self.spec = spec
        base_dir = open_tree(spec.tree_dir).base_dir
        config = EngineConfig(
            max_batch_size=spec.max_batch,
            max_queue=spec.max_queue,
            tenant_step_rows=spec.tenant_step_rows,
            tenant_contended_running=spec.tenant_contended_running,
            prefill_chunk=spec.prefill_chunk,
            max_active_adapters=spec.max_adapters,
            host_cache_bytes=spec.host_cache,
            prefix_cache_bytes=spec.prefix_cache,
            precision=spec.precision,
        )
        self.engine = Engine(base_dir, spec.tree_dir, config)  # a dir: the engine follows its snapshots
        self._trunk = EngineTrunk(self.engine)  # its snapshot() is what Admin.Status shows per trunk
        self.routed: dict[str, int] = {}  # node id -> id of the lease Serve holds for it
        self._window = _Window()
        self._in_flight: dict[str, int] = {}  # request id -> calls with that id inside the replica
        self._completed = 0
        self._failed = 0
        self._reported_loaded: frozenset[str] = frozenset()
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id if context else f"local-{os.getpid()}"
        self._machine_id = ray.get_runtime_context().get_node_id()
        self._machine_ip = ray.util.get_node_ip_address()
        if spec.preload:
            # The constructor may run inside Serve's event loop: preload on a loop of our own, and
            # let a failure (an adapter whose sha256 changed) fail the replica's start.
            failures: list[BaseException] = []

            def preload() -> None:
                try:
                    asyncio.run(self.engine.preload(list(spec.preload)))
                except BaseException as exc:
                    failures.append(exc)

            with_loop = threading.Thread(target=preload)
            with_loop.start()
            with_loop.join()
            if failures:
                self.engine.close()
                raise failures[0]
        self._board = board(spec.namespace)
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="treelm-report", daemon=True)
        self._reporter.start()

    # -- requests -------------------------------------------------------------------------
    async def _open_lease(self, node: str) -> NodeLease:
        # Only a claim: the request itself loads the chain when the engine admits it, which waits
        # for free slots instead of failing when in-flight requests pin every slot of the bank.
        self.engine.resolve(node)  # UnknownNode / InvalidRequest
        return NodeLease(self, node)

    async def _route(self, node: str) -> NodeLease:  # replaced by the multiplexed version
        return await self._open_lease(node)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        started, ok = time.perf_counter(), False
        self._enter(request)
        try:
            await self._route(request.node)
            result = await self.engine.generate(request)
            ok = True
            return result
        finally:
            self._leave(request)
            await self._finished(request.node, started, ok)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        started, ok = time.perf_counter(), False
        self._enter(request)
        try:
            await self._route(request.node)
            # Coalesced: each item costs a Ray object and a hop through the ingress, so the tokens
            # made while the last one travelled go together (a reader that keeps up gets each alone).
            async for chunk in self.engine.stream(request, coalesce=True):
                yield chunk
            ok = True
        finally:
            self._leave(request)
            await self._finished(request.node, started, ok)

    def _enter(self, request: GenerationRequest) -> None:
        self._in_flight[request.request_id] = self._in_flight.get(request.request_id, 0) + 1

    def _leave(self, request: GenerationRequest) -> None:
        left = self._in_flight.pop(request.request_id, 1) - 1
        if left > 0:
            self._in_flight[request.request_id] = left

    async def _finished(self, node: str, started: float, ok: bool) -> None:
        if ok:
            self._completed += 1
            self._window.add(time.perf_counter() - started)
        else:
            self._failed += 1
        if ok and node != self.spec.tree and node not in self._reported_loaded and self._board is not None:
            # A node newly loaded: tell the board now, so Admin.Status right after this call shows it.
            try:
                await asyncio.wait_for(asyncio.wrap_future(self._board.report.remote(self.report()).future()), 2.0)
            except Exception:  # the board is best effort; serving is not
                log.debug("could not report to the replica board", exc_info=True)

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes Serve replace the replica."""
        if self.engine.stats().closed or not self.engine._thread.is_alive():
            raise RuntimeError("the engine's model thread is not running")

    # -- reports --------------------------------------------------------------------------
    def report(self) -> ReplicaReport:
        snap = self._trunk.snapshot()
        stats = self.engine.stats()
        rate, p50, p95 = self._window.summary()
        in_flight, routed = self._in_flight.copy(), self.routed.copy()  # atomic copies: the event loop changes them
        loaded = tuple(sorted(n for n in snap.loaded_adapters if self._chain_active(n)))
        self._reported_loaded = frozenset(loaded)
        return ReplicaReport(
            trunk=self.spec.tree,
            replica=self.replica_id,
            machine_id=self._machine_id,
            machine_ip=self._machine_ip,
            pid=os.getpid(),
            base_digest=snap.base_digest,
            loaded=loaded,
            routed=tuple(sorted(routed)),
            queue_depth=stats.queue_depth,
            running=stats.active_requests,
            ongoing=sum(in_flight.values()),
            in_flight=tuple(in_flight),
            max_batch=stats.max_batch_size,
            completed=self._completed,
            failed=self._failed,
            requests_per_s=rate,
            p50_ms=p50,
            p95_ms=p95,
            cache=snap.cache,
        )

    def _chain_active(self, node: str) -> bool:
        chain = self.engine.resolve(node)
        return all(self.engine.cache.tier_of(n.cache_key) == "active" for n in chain)

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            if self._board is None:
                self._board = board(self.spec.namespace)
                if self._board is None:
                    continue
            try:
                self._board.report.remote(self.report())
            except Exception:  # a restarting board: try again next second
                log.debug("could not report to the replica board", exc_info=True)

    def __del__(self) -> None:
        """Serve calls this when it stops the replica gracefully (scale down, drain, redeploy)."""
        stop = getattr(self, "_stop", None)
        if stop is None or stop.is_set():
            return
        stop.set()
        if self._board is not None:
            try:
                self._board.forget.remote(self.replica_id)
            except Exception:
                pass
        self.engine.close()


def replica_class(max_adapters: int) -> type:
    """A deployment class whose Serve multiplexer keeps up to ``max_adapters`` node leases per replica."""

    class TrunkReplica(TrunkReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def _route(self, node: str) -> NodeLease:
            return await self._open_lease(node)

    return TrunkReplica
