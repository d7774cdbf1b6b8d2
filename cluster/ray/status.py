"""What `treelm cluster status` shows: trunks, their replicas and where they run, the machines.

A *machine* is a host running Ray (Ray calls it a node); a *node* is always a node of a tree.

Placement and replica states come from Serve's controller; what each replica
holds and how busy it is comes from the replicas' own reports
(:mod:`cluster.ray.board`). A replica Serve lists but that has not reported yet
(starting, or just restarted) shows its state with empty load columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from cluster.errors import ClusterError
from cluster.ray.app import INGRESS_APP, INGRESS_DEPLOYMENT, TRUNK_DEPLOYMENT, app_name
from cluster.ray.board import ReplicaReport, board
from cluster.ray.config import ClusterConfig
from cluster.ray.runtime import ClusterState

__all__ = [
    "ClusterStatus",
    "MachineStatus",
    "ReplicaStatus",
    "TrunkStatus",
    "collect_status",
    "render_status",
    "serve_details",
]


@dataclass(frozen=True)
class ReplicaStatus:
    trunk: str
    replica: str
    state: str  # Serve's replica state: STARTING, RUNNING, STOPPING, ...
    machine_id: str  # Ray's node id of the machine the replica runs on
    machine_ip: str
    pid: int | None
    loaded: tuple[str, ...] = ()  # node ids whose chain is active in this replica's engine
    queue_depth: int | None = None
    running: int | None = None
    ongoing: int | None = None
    requests_per_s: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    completed: int | None = None
    failed: int | None = None


@dataclass(frozen=True)
class TrunkStatus:
    tree: str
    status: str  # Serve's application status
    target: int  # replicas Serve aims for now
    min_replicas: int
    max_replicas: int
    replicas: tuple[ReplicaStatus, ...]

    @property
    def running(self) -> int:
        return sum(1 for r in self.replicas if r.state == "RUNNING")


@dataclass(frozen=True)
class MachineStatus:
    machine_id: str  # Ray's node id
    address: str  # ip:node_manager_port (unique even with several Ray processes on one host)
    alive: bool
    head: bool
    cpus: float
    gpus: float
    replicas: int  # TreeLM replicas placed there (trunks and ingress)


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    gcs_address: str
    endpoints: tuple[str, ...]
    ingress: str  # the ingress application's status
    trunks: tuple[TrunkStatus, ...]
    machines: tuple[MachineStatus, ...]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for trunk, raw in zip(self.trunks, out["trunks"], strict=False):
            raw["running"] = trunk.running
        return out


def serve_details() -> Mapping[str, Any]:
    from ray.serve.context import _get_global_client

    client = _get_global_client()  # raises RayServeException when no Serve controller runs
    if client is None:  # typed optional for raise_if_no_controller_running=False only
        raise ClusterError("Serve is not running on this cluster")
    return client.get_serve_details()


def _replicas(
    tree: str, deployment: Mapping[str, Any], reports: Mapping[str, ReplicaReport]
) -> tuple[ReplicaStatus, ...]:
    rows = []
    for raw in deployment.get("replicas", ()):
        state = getattr(raw.get("state"), "value", str(raw.get("state")))
        row = ReplicaStatus(
            trunk=tree,
            replica=raw["replica_id"],
            state=state,
            machine_id=raw.get("node_id") or "",
            machine_ip=raw.get("node_ip") or "",
            pid=raw.get("pid"),
        )
        rep = reports.get(raw["replica_id"])
        if rep is not None:  # its load, as the replica last reported it
            row = replace(
                row,
                loaded=rep.loaded,
                queue_depth=rep.queue_depth,
                running=rep.running,
                ongoing=rep.ongoing,
                requests_per_s=round(rep.requests_per_s, 2),
                p50_ms=rep.p50_ms,
                p95_ms=rep.p95_ms,
                completed=rep.completed,
                failed=rep.failed,
            )
        rows.append(row)
    return tuple(sorted(rows, key=lambda r: r.replica))


def _scaling(deployment: Mapping[str, Any]) -> tuple[int, int]:
    config = deployment.get("deployment_config") or {}
    auto = config.get("autoscaling_config")
    if auto:
        return int(auto.get("min_replicas", 0)), int(auto.get("max_replicas", 1))
    count = int(config.get("num_replicas") or deployment.get("target_num_replicas") or 0)
    return count, count


def collect_status(config: ClusterConfig, state: ClusterState) -> ClusterStatus:
    """Ask Serve, the replica board and Ray (this process must be connected, see ray_runtime.connect)."""
    details = serve_details().get("applications", {})
    the_board = board(state.namespace)
    reports = {r.replica: r for r in ray.get(the_board.reports.remote(10.0), timeout=30)} if the_board else {}
    trunks = []
    placed: dict[str, int] = {}
    for trunk in config.trunks:
        app = details.get(app_name(trunk.tree)) or {}
        deployment = (app.get("deployments") or {}).get(TRUNK_DEPLOYMENT) or {}
        low, high = _scaling(deployment)
        replicas = _replicas(trunk.tree, deployment, reports)
        for r in replicas:
            placed[r.machine_id] = placed.get(r.machine_id, 0) + 1
        status = getattr(app.get("status"), "value", app.get("status")) or "NOT_STARTED"
        trunks.append(
            TrunkStatus(
                tree=trunk.tree,
                status=str(status),
                target=int(deployment.get("target_num_replicas") or 0),
                min_replicas=low,
                max_replicas=high,
                replicas=replicas,
            )
        )
    ingress_app = details.get(INGRESS_APP) or {}
    for raw in ((ingress_app.get("deployments") or {}).get(INGRESS_DEPLOYMENT) or {}).get("replicas", ()):
        placed[raw.get("node_id") or ""] = placed.get(raw.get("node_id") or "", 0) + 1
    machines = []
    for raw_machine in ray.nodes():
        res = raw_machine.get("Resources") or {}
        machines.append(
            MachineStatus(
                machine_id=raw_machine["NodeID"],
                address=f"{raw_machine['NodeManagerAddress']}:{raw_machine['NodeManagerPort']}",
                alive=bool(raw_machine.get("Alive")),
                head="node:__internal_head__" in res,
                cpus=float(res.get("CPU", 0)),
                gpus=float(res.get("GPU", 0)),
                replicas=placed.get(raw_machine["NodeID"], 0),
            )
        )
    machines.sort(key=lambda m: (not m.alive, not m.head, m.address))
    ingress = getattr(ingress_app.get("status"), "value", ingress_app.get("status")) or "NOT_STARTED"
    return ClusterStatus(
        name=config.name,
        gcs_address=state.gcs_address,
        endpoints=state.endpoints,
        ingress=str(ingress),
        trunks=tuple(trunks),
        machines=tuple(machines),
    )


def _num(value: float | int | None, fmt: str = "{:g}") -> str:
    return "-" if value is None else fmt.format(value)


def render_status(status: ClusterStatus, console: Console) -> None:
    console.print(
        f"cluster [bold]{status.name}[/bold]: Ray at {status.gcs_address}, gRPC ingress "
        f"{', '.join(status.endpoints) or '-'} ({status.ingress.lower()})"
    )
    trunks = Table(title="trunks")
    for col in ("trunk", "status", "replicas", "scaling", "req/s", "queue"):
        trunks.add_column(col, justify="right" if col in ("req/s", "queue") else "left")
    for t in status.trunks:
        rate = sum(r.requests_per_s or 0 for r in t.replicas)
        queue = sum(r.queue_depth or 0 for r in t.replicas)
        fixed = t.min_replicas == t.max_replicas
        scaling = f"{t.min_replicas}" if fixed else f"auto {t.min_replicas}..{t.max_replicas}"
        trunks.add_row(t.tree, t.status.lower(), f"{t.running}/{t.target}", scaling, f"{rate:.2f}", str(queue))
    console.print(trunks)
    machine_names = {m.machine_id: m.address + (" (head)" if m.head else "") for m in status.machines}
    replicas = Table(title="replicas")
    for col in (
        "trunk",
        "replica",
        "state",
        "machine",
        "pid",
        "loaded nodes",
        "queue",
        "running",
        "req/s",
        "p50 ms",
        "p95 ms",
    ):
        replicas.add_column(
            col,
            justify="right" if col in ("pid", "queue", "running", "req/s", "p50 ms", "p95 ms") else "left",
            overflow="fold",
        )
    for t in status.trunks:
        for r in t.replicas:
            loaded = ", ".join(n.split("/", 1)[-1] for n in r.loaded) if r.loaded else "-"
            replicas.add_row(
                t.tree,
                r.replica,
                r.state.lower(),
                machine_names.get(r.machine_id, r.machine_id[:12] or "-"),
                _num(r.pid),
                loaded,
                _num(r.queue_depth),
                _num(r.running),
                _num(r.requests_per_s, "{:.2f}"),
                _num(r.p50_ms, "{:.1f}"),
                _num(r.p95_ms, "{:.1f}"),
            )
    console.print(replicas)
    machines = Table(title="machines")
    for col in ("Ray node id", "address", "role", "alive", "CPUs", "GPUs", "TreeLM replicas"):
        machines.add_column(col)
    for m in status.machines:
        machines.add_row(
            m.machine_id[:12],
            m.address,
            "head" if m.head else "worker",
            "yes" if m.alive else "no",
            f"{m.cpus:g}",
            f"{m.gpus:g}",
            str(m.replicas),
        )
    console.print(machines)
