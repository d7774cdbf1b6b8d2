"""What each trunk replica reports about itself, and the detached actor that collects the reports.

Serve's controller knows where replicas run; only the replicas know what they
hold and how busy they are. Each replica pushes a :class:`ReplicaReport` about
once a second (and at once when its set of loaded adapters changes) to one
named, detached :class:`ReplicaBoard` actor. The ingress reads it for
Admin.Status and Prometheus, `treelm cluster status` for its table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from cluster.service.trunk import CacheSnapshot

__all__ = ["BOARD_NAME", "ReplicaBoard", "ReplicaReport", "board", "ensure_board"]

BOARD_NAME = "treelm-replica-board"


@dataclass(frozen=True)
class ReplicaReport:
    trunk: str  # the tree the replica serves
    replica: str  # Serve's replica id
    machine_id: str  # Ray's node id of the machine it runs on
    machine_ip: str
    pid: int
    base_digest: str
    loaded: tuple[str, ...]  # node ids whose whole chain is active in the engine's bank
    routed: tuple[str, ...]  # node ids Serve routes here preferably (its multiplexed model ids)
    queue_depth: int  # waiting in the engine
    running: int  # rows in the running batch
    ongoing: int  # requests inside the replica (queued + running + being answered)
    in_flight: tuple[str, ...]  # their request ids (which calls a dying replica takes with it)
    max_batch: int
    completed: int  # requests finished since the replica started
    failed: int
    requests_per_s: float  # over the last few seconds
    p50_ms: float | None  # latency of requests finished in the last minute
    p95_ms: float | None
    cache: CacheSnapshot = field(default_factory=CacheSnapshot)
    at: float = field(default_factory=time.time)


@ray.remote(num_cpus=0, max_restarts=-1)
class ReplicaBoard:
    """The latest report of every replica (a restarted board fills again within a second)."""

    def __init__(self) -> None:
        self._reports: dict[str, ReplicaReport] = {}

    def report(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = report

    def forget(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def reports(self, max_age_s: float = 10.0) -> list[ReplicaReport]:
        """Reports newer than ``max_age_s`` (a replica that stopped reporting is gone or stuck)."""
        now = time.time()
        for key in [k for k, r in self._reports.items() if now - r.at > 600]:
            del self._reports[key]  # forget the long dead
        return [r for r in self._reports.values() if now - r.at <= max_age_s]


def ensure_board(namespace: str):
    """The board actor, created (detached, on the head, no CPU) if absent."""
    # mypy keeps a class's own type under a class decorator: it misses that @ray.remote made an ActorClass.
    return ReplicaBoard.options(  # type: ignore[attr-defined]
        name=BOARD_NAME,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        resources={"node:__internal_head__": 0.001},
    ).remote()


def board(namespace: str):
    """The board if it exists, else None (replicas then simply do not report)."""
    try:
        return ray.get_actor(BOARD_NAME, namespace=namespace)
    except ValueError:
        return None
