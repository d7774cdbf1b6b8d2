"""A trunk behind a Serve deployment handle, in the shape the servicers already use (:class:`cluster.service.trunk.Trunk`).

The servicers, interceptors, auth, health and metrics of the single-process
server run unchanged in the ingress; only the trunk differs: generate/stream go
through ``handle.options(multiplexed_model_id=node)`` to a replica, and the
snapshot comes from the replicas' latest reports (:mod:`cluster.ray.board`).

Failures of the replica itself become :class:`ReplicaUnavailable`
(UNAVAILABLE): the SDK retries unary calls, and a stream that already sent
chunks ends with a message saying how many it got and that the text is cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable

import ray.exceptions
from ray.serve import exceptions as serve_exceptions
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from cluster.errors import ReplicaUnavailable
from cluster.ray.board import ReplicaReport
from cluster.ray.wire import TrunkInfo, remote_cause
from cluster.service.trunk import CacheSnapshot, TrunkSnapshot
from nodes.errors import QueueFull
from nodes.runtime.requests import GenerationRequest, GenerationResult, TokenChunk

__all__ = ["BoardView", "RayTrunk", "aggregate"]

log = logging.getLogger("treelm.ingress")

# Failures of a replica, its worker or its node (not of the request): answered UNAVAILABLE.
_REPLICA_FAILURES = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.ObjectLostError,
    serve_exceptions.ReplicaUnavailableError,
    serve_exceptions.DeploymentUnavailableError,
)


class BoardView:
    """The replica board as the ingress sees it: fetched at most every ``min_interval_s``."""

    def __init__(self, board, min_interval_s: float = 0.2, max_age_s: float = 5.0):
        self._board = board
        self._min_interval = min_interval_s
        self._max_age = max_age_s
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self.reports: tuple[ReplicaReport, ...] = ()

    async def refresh(self) -> tuple[ReplicaReport, ...]:
        async with self._lock:
            if time.monotonic() - self._fetched >= self._min_interval:
                try:
                    self.reports = tuple(await self._board.reports.remote(self._max_age))
                except Exception as exc:  # a restarting board: keep the last view
                    log.warning("replica board unavailable: %s", exc)
                self._fetched = time.monotonic()
        return self.reports

    def of(self, tree: str) -> tuple[ReplicaReport, ...]:
        return tuple(r for r in self.reports if r.trunk == tree)


def aggregate(info: TrunkInfo, reports: Iterable[ReplicaReport]) -> TrunkSnapshot:
    """One trunk's snapshot over its replicas: sums, and the union of loaded nodes."""
    reports = list(reports)

    def total(name: str) -> int:
        return sum(getattr(r.cache, name) for r in reports)

    cache = CacheSnapshot(**{name: total(name) for name in CacheSnapshot.__dataclass_fields__})
    loaded = sorted({node for r in reports for node in r.loaded})
    return TrunkSnapshot(
        tree=info.tree,
        base_digest=info.base_digest,
        loaded_adapters=tuple(loaded),
        queue_depth=sum(r.queue_depth for r in reports),
        running=sum(r.running for r in reports),
        max_batch=sum(r.max_batch for r in reports) or info.max_batch,
        cache=cache,
    )


class RayTrunk:
    """A :class:`cluster.service.trunk.Trunk` whose engine runs in the replicas of a Serve deployment."""

    def __init__(self, info: TrunkInfo, handle: DeploymentHandle, view: BoardView | None = None):
        self.info = info
        self._handle = handle
        self._view = view

    @property
    def tree(self) -> str:
        return self.info.tree

    @property
    def base_digest(self) -> str:
        return self.info.base_digest

    def serves(self, node: str) -> bool:
        """Every node of the tree: the registry (the access check before this) knows which exist, and
        each replica follows its tree dir's snapshot, so nodes created while serving need no restart
        (a node the replica does not have is refused there, NOT_FOUND)."""
        return node == self.tree or node.startswith(self.tree + "/")

    def served_version(self, node: str) -> int | None:
        """Unknown here: each replica serves its tree dir's snapshot; the answer names its version."""
        return None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        response = self._handle.options(multiplexed_model_id=request.node).generate.remote(request)
        try:
            answer = await response
        except asyncio.CancelledError:
            response.cancel()  # the caller went away or its deadline passed: free the replica's row
            raise
        except _REPLICA_FAILURES as exc:
            raise ReplicaUnavailable(
                f"the replica serving {request.node!r} failed ({type(exc).__name__}); "
                "the request did not complete, retry it"
            ) from None
        except serve_exceptions.BackPressureError:
            raise QueueFull(f"every replica of trunk {self.tree!r} is at its queue bound; retry later") from None
        except ray.exceptions.RayTaskError as exc:  # the request's own error (unknown node, bad field, ...)
            raise remote_cause(exc) from None
        return answer

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        response = self._handle.options(stream=True, multiplexed_model_id=request.node).stream.remote(request)
        if not isinstance(response, DeploymentResponseGenerator):  # stream=True makes one; Ray types either kind
            raise TypeError(f"a streaming call answered {type(response).__name__}")
        sent, finished = 0, False
        try:
            async for item in response:
                sent += 1
                finished = item.finish_reason is not None
                yield item
            finished = True
        except _REPLICA_FAILURES as exc:
            finished = True
            raise ReplicaUnavailable(
                f"the replica serving {request.node!r} failed ({type(exc).__name__}) after {sent} chunk(s); "
                "this stream is cut short and incomplete: send the request again"
            ) from None
        except serve_exceptions.BackPressureError:
            finished = True
            raise QueueFull(f"every replica of trunk {self.tree!r} is at its queue bound; retry later") from None
        except ray.exceptions.RayTaskError as exc:
            finished = True
            raise remote_cause(exc) from None
        finally:
            if not finished:
                response.cancel()  # the client went away: the replica's generator is cancelled too

    async def refresh(self) -> None:
        """Fetch the replicas' latest reports (Admin.Status calls this before ``snapshot``)."""
        if self._view is not None:
            await self._view.refresh()

    def snapshot(self) -> TrunkSnapshot:
        return aggregate(self.info, self._view.of(self.tree) if self._view is not None else ())

    async def close(self) -> None:
        """Nothing to close here: the replicas belong to Serve."""
