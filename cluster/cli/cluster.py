"""`treelm cluster up|status|scale|drain|down`: run the tree on a Ray cluster (see README "Run a cluster").

    treelm registry init --db sqlite:///registry.db
    treelm cluster up examples/cluster/one-machine.yaml     # starts Ray on explicit ports, deploys, waits
    treelm cluster status [--json]
    treelm cluster scale demo --replicas 2                  # or --min 1 --max 4 (autoscaling)
    treelm cluster drain 10.0.0.7:46382                     # move replicas off a Ray node before removing it
    treelm cluster down

`up` leaves the cluster running and records where it is in a state directory
(``--state-dir``, default ``$TREELM_CLUSTER_STATE_DIR`` or ``~/.treelm/cluster``),
so the other commands find it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cluster.errors import ClusterError
from cluster.ray.config import ClusterConfig, load_cluster_config
from cluster.ray.runtime import (
    ClusterState,
    connect,
    default_state_dir,
    head_alive,
    join_command,
    load_state,
    ray_executable,
    remove_state,
    save_state,
    start_head,
    stop_node,
    token_file,
)
from cluster.tree_import import import_tree
from registry.access import record_deployment
from registry.db import open_registry
from registry.errors import RegistryError

__all__ = ["cluster_app"]

# Ray and Serve are imported inside the commands: every other `treelm` command starts faster without them.

cluster_app = typer.Typer(help="Serve trees on a Ray cluster: up, status, scale, drain, down.", no_args_is_help=True)

_STATE_HELP = "where `up` records the cluster (default: $TREELM_CLUSTER_STATE_DIR or ~/.treelm/cluster)"
StateDir = Annotated[Path | None, typer.Option("--state-dir", help=_STATE_HELP)]


@contextmanager
def _driver(state: ClusterState) -> Iterator[None]:
    """Connected to the cluster for the block (an already connected process stays connected)."""
    import ray

    ours = connect(state)
    try:
        yield
    finally:
        if ours:
            ray.shutdown()


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _wait(config: ClusterConfig, console: Console, what: str, timeout: float, replicas=None) -> None:
    from cluster.ray.app import app_names, wait_healthy

    with _progress(console) as progress:
        task = progress.add_task(what, total=len(app_names(config)))

        def report(ready: int, total: int, waiting: str) -> None:
            progress.update(task, completed=ready, total=total, description=f"{what}: {escape(waiting or 'done')}")

        wait_healthy(config, timeout, report, replicas)


def _endpoints(config: ClusterConfig) -> tuple[str, ...]:
    """host:port of each ingress replica (0.0.0.0 becomes the IP of the node it runs on)."""
    from cluster.ray.app import INGRESS_APP, INGRESS_DEPLOYMENT
    from cluster.ray.status import _serve_details

    ing = config.ingress
    if ing.host not in ("0.0.0.0", "::"):
        return (f"{ing.host}:{ing.port}",)
    app = _serve_details().get("applications", {}).get(INGRESS_APP) or {}
    replicas = ((app.get("deployments") or {}).get(INGRESS_DEPLOYMENT) or {}).get("replicas", ())
    return tuple(sorted({f"{r.get('node_ip')}:{ing.port}" for r in replicas})) or (f"{ing.host}:{ing.port}",)


def _record(config: ClusterConfig, endpoints: tuple[str, ...], status: str, console: Console) -> None:
    """Tell the registry where every node is served (match's "remote" suggestions read it)."""
    from nodes.store.tree import open_tree

    try:
        registry = open_registry(config.registry)
    except RegistryError as exc:
        console.print(f"[yellow]could not record the deployment: {escape(str(exc))}[/yellow]")
        return
    try:
        for trunk in config.trunks:
            tree = open_tree(trunk.tree_dir)
            for node in (tree.name, *(str(n.node_id) for n in tree.nodes)):
                for endpoint in endpoints:
                    record_deployment(registry, node, trunk=tree.name, endpoint=endpoint, status=status)
    except RegistryError as exc:  # serving matters more than the bookkeeping
        console.print(f"[yellow]could not record the deployment: {escape(str(exc))}[/yellow]")
    finally:
        registry.close()


def _start_or_join(config: ClusterConfig, state_dir: Path, console: Console) -> ClusterState:
    previous = None
    try:
        previous = load_state(state_dir)
    except ClusterError:
        pass
    base = dict(
        config_file=str(Path(config.file).resolve()),
        name=config.name,
        namespace=config.ray.namespace,
        auth=config.ray.auth,
        started_at=time.time(),
    )
    if previous is not None and head_alive(previous):
        console.print(f"Ray is already up at {previous.gcs_address} (started by an earlier `up`): redeploying")
        return previous.with_(**{k: v for k, v in base.items() if k != "started_at"}, overrides={})
    if previous is not None and previous.head is not None:
        stop_node(previous.head.pid, timeout_s=5)  # a half-dead head of an earlier run
    if config.ray.address:
        token = token_file(state_dir, create=False) if config.ray.auth == "token" else None
        if token is not None and not token.exists():
            raise ClusterError(f"ray.auth is token: copy the head's token file to {token} first")
        console.print(f"joining the Ray cluster at {config.ray.address}")
        return ClusterState(gcs_address=config.ray.address, token_file=str(token) if token else None, head=None, **base)
    with console.status(f"starting a Ray head on port {config.ray.ports.gcs} ..."):
        head, _env = start_head(config, state_dir)
    token = token_file(state_dir, create=False) if config.ray.auth == "token" else None
    address = _gcs_address(head.log, config.ray.ports.gcs)
    console.print(f"Ray head started at {address} (pid {head.pid}, log {head.log})")
    return ClusterState(gcs_address=address, token_file=str(token) if token else None, head=head, **base)


def _gcs_address(log: str, port: int) -> str:
    """The head's address as Ray printed it (Ray binds the machine's IP, not 127.0.0.1)."""
    import re

    found = re.search(r"--address='([^']+)'", Path(log).read_text(errors="replace"))
    return found.group(1) if found else f"127.0.0.1:{port}"


@cluster_app.command("up")
def up_command(
    config_file: Annotated[Path, typer.Argument(help="cluster.yaml (see examples/cluster/)")],
    state_dir: StateDir = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait until every deployment is healthy")] = 300.0,
) -> None:
    """Start (or join) Ray on explicit ports, deploy every trunk and the gRPC ingress, wait until healthy."""
    from cluster.ray.app import deploy
    from cluster.ray.board import ensure_board
    from cluster.ray.desk import DeskSpec, ensure_desk

    console = Console()
    config = load_cluster_config(config_file)
    state_dir = state_dir or default_state_dir()
    registry = open_registry(config.registry)  # fails early, with the `treelm registry init` hint
    try:
        for trunk in config.trunks:
            imported = import_tree(registry, trunk.tree_dir)
            what = "imported into" if imported.changed else "already in"
            console.print(f"tree [bold]{escape(trunk.tree)}[/bold] {what} the registry")
    finally:
        registry.close()
    state = _start_or_join(config, state_dir, console)
    save_state(state_dir, state)  # before deploying: `down` can always stop what was started
    with _driver(state):
        ensure_board(config.ray.namespace)
        if config.ingress.updates:  # before the replicas start: it pins versions and writes the snapshots
            trees = tuple((t.tree, str(t.tree_dir)) for t in config.trunks)
            with console.status("opening the update desk (signed updates) ..."):
                ensure_desk(
                    DeskSpec(config.registry, trees, config.ingress.update_threads), config.ray.namespace, timeout
                )
        deploy(config)
        _wait(config, console, "deploying", timeout)
        endpoints = _endpoints(config)
    state = state.with_(endpoints=endpoints)
    save_state(state_dir, state)
    _record(config, endpoints, "active", console)
    console.print(
        f"[green]cluster {escape(config.name)} is up[/green]: gRPC ingress on {', '.join(endpoints)} "
        f"(auth {'on' if config.ingress.auth else 'OFF'}); trunks: "
        f"{', '.join(t.tree for t in config.trunks)}"
    )
    console.print("add a machine:", escape(join_command(config, state)), soft_wrap=True)


@cluster_app.command("status")
def status_command(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Trunks, their replicas (Ray node, loaded nodes, queue, requests/s, p50/p95) and the Ray nodes."""
    from cluster.ray.status import collect_status, render_status

    state = load_state(state_dir or default_state_dir())
    config = load_cluster_config(state.config_file)
    with _driver(state):
        status = collect_status(config, state)
    if as_json:
        typer.echo(json.dumps(status.as_dict(), indent=2, sort_keys=True))
    else:
        render_status(status, Console())


@cluster_app.command("scale")
def scale_command(
    trunk: Annotated[str, typer.Argument(help="the trunk's tree name (see `treelm cluster status`)")],
    replicas: Annotated[int | None, typer.Option("--replicas", help="a fixed number of replicas")] = None,
    min_replicas: Annotated[int | None, typer.Option("--min", help="autoscaling lower bound")] = None,
    max_replicas: Annotated[int | None, typer.Option("--max", help="autoscaling upper bound")] = None,
    state_dir: StateDir = None,
    wait: Annotated[bool, typer.Option(help="wait until the replicas run")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 300.0,
) -> None:
    """Change a trunk's replicas in place: --replicas N, or --min A --max B for autoscaling."""
    from cluster.ray.app import Scaling, scale

    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ClusterError("give either --replicas or --min/--max, not both")
    if replicas is None and (min_replicas is None or max_replicas is None):
        raise ClusterError("give --replicas N, or both --min and --max")
    scaling = Scaling.fixed(replicas) if replicas is not None else Scaling(min_replicas, max_replicas)
    state_dir = state_dir or default_state_dir()
    state = load_state(state_dir)
    config = load_cluster_config(state.config_file)
    config.trunk(trunk)  # unknown trunk: an error naming the known ones
    console = Console()
    with _driver(state):
        scale(config, trunk, scaling)
        save_state(state_dir, state.with_(overrides={**state.overrides, trunk: scaling.as_dict()}))
        if wait:
            want = {trunk: scaling.min} if scaling.min == scaling.max else None
            _wait(config, console, f"scaling {trunk}", timeout, want)
    what = f"{scaling.min} replica(s)" if scaling.min == scaling.max else f"autoscaling {scaling.min}..{scaling.max}"
    console.print(f"[green]trunk {escape(trunk)}[/green]: {what}")


def _find_node(address: str) -> dict:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    by_id = [n for n in nodes if len(address) >= 6 and n["NodeID"].startswith(address.lower())]
    by_addr = [n for n in nodes if f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}" == address]
    by_ip = [n for n in nodes if n["NodeManagerAddress"] == address]
    for found in (by_addr, by_id, by_ip):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ClusterError(
                f"{address!r} matches {len(found)} Ray nodes: give IP:PORT or the node id "
                "(`treelm cluster status` lists them)"
            )
    raise ClusterError(f"no live Ray node {address!r}: give IP:PORT, an IP or a node id from `treelm cluster status`")


@cluster_app.command("drain")
def drain_command(
    node_addr: Annotated[str, typer.Argument(help="the Ray node: IP:PORT (node manager), IP, or node id")],
    state_dir: StateDir = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait until no replica is left there")] = 300.0,
) -> None:
    """Move every replica off a Ray node (Serve starts replacements elsewhere first), before removing it."""
    from cluster.ray.app import app_names
    from cluster.ray.status import _serve_details

    state = load_state(state_dir or default_state_dir())
    config = load_cluster_config(state.config_file)
    console = Console()
    with _driver(state):
        node = _find_node(node_addr)
        if "node:__internal_head__" in (node.get("Resources") or {}):
            raise ClusterError("that is the head node: it runs Serve's controller and the ingress; drain workers only")
        node_id = node["NodeID"]
        cmd = [
            ray_executable(),
            "drain-node",
            "--address",
            state.gcs_address,
            "--node-id",
            node_id,
            "--reason",
            "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message",
            "treelm cluster drain",
            "--deadline-remaining-seconds",
            str(int(timeout)),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"Ray refused to drain {node_addr}: {(done.stderr or done.stdout).strip()[-500:]}")
        end = time.monotonic() + timeout
        with console.status(f"moving replicas off {node_addr} ..."):
            while True:
                apps = _serve_details().get("applications", {})
                deployments = [
                    d for name in app_names(config) for d in (apps.get(name, {}).get("deployments") or {}).values()
                ]
                left = sum(1 for d in deployments for r in d.get("replicas", ()) if r.get("node_id") == node_id)
                if left == 0:
                    break
                if time.monotonic() > end:
                    raise ClusterError(f"{left} replica(s) still on {node_addr} after {timeout:g}s")
                time.sleep(0.5)
        _wait(config, console, "replacements", timeout)
    console.print(
        f"[green]drained[/green] {escape(node_addr)} (node {node_id[:12]}): no TreeLM replica runs there; "
        "Ray takes the node out of the cluster, its machine can be stopped"
    )


@cluster_app.command("down")
def down_command(state_dir: StateDir = None) -> None:
    """Delete the deployments, and stop Ray if `up` started it."""
    import ray

    from cluster.ray.app import app_names, teardown
    from cluster.ray.board import BOARD_NAME
    from cluster.ray.desk import kill_desk

    state_dir = state_dir or default_state_dir()
    state = load_state(state_dir)
    config = load_cluster_config(state.config_file)
    console = Console()
    reachable = state.head is None or head_alive(state)
    if reachable:
        with _driver(state), console.status("stopping the deployments ..."):
            teardown(app_names(config))
            try:
                ray.kill(ray.get_actor(BOARD_NAME, namespace=state.namespace))
            except ValueError:
                pass
            kill_desk(state.namespace)
        _record(config, state.endpoints, "stopped", console)
    if state.head is not None:
        if ray.is_initialized():
            ray.shutdown()  # this process was a driver of the cluster that now goes away
        with console.status(f"stopping the Ray head (pid {state.head.pid}) ..."):
            stop_node(state.head.pid)
    remove_state(state_dir)
    console.print(
        f"[green]cluster {escape(state.name)} is down[/green]"
        + ("" if state.head is not None else " (Ray itself was not started by `up` and keeps running)")
    )
