"""`treelm cluster up|status|scale|drain|down`: run the tree on a Ray cluster (see README "Run a cluster").

    treelm registry init --db sqlite:///registry.db
    treelm cluster up examples/cluster/one-machine.yaml     # starts Ray on explicit ports, deploys, waits
    treelm cluster status [--json]
    treelm cluster scale demo --replicas 2                  # or --min 1 --max 4 (autoscaling)
    treelm cluster drain 10.0.0.7:46382                     # move replicas off a machine before removing it
    treelm cluster down

`up` leaves the cluster running and records where it is in a state directory
(``--state-dir``, default ``$TREELM_CLUSTER_STATE_DIR`` or ``~/.treelm/cluster``),
so the other commands find it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cluster.errors import ClusterError

if TYPE_CHECKING:
    from cluster.ray.config import ClusterConfig

__all__ = ["cluster_app"]

# Ray, Serve and the registry are imported inside the commands: `treelm --help` must not load them.

cluster_app = typer.Typer(help="Serve trees on a Ray cluster: up, status, scale, drain, down.", no_args_is_help=True)

_STATE_HELP = "where `up` records the cluster (default: $TREELM_CLUSTER_STATE_DIR or ~/.treelm/cluster)"
StateDir = Annotated[Path | None, typer.Option("--state-dir", help=_STATE_HELP)]


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


def _warner(console: Console) -> Callable[[str], None]:
    return lambda text: console.print(f"[yellow]{escape(text)}[/yellow]")


def _wait(
    config: ClusterConfig, console: Console, what: str, timeout: float, replicas: dict[str, int] | None = None
) -> None:
    from cluster.ray.app import app_names, wait_healthy

    with _progress(console) as progress:
        task = progress.add_task(what, total=len(app_names(config)))

        def report(ready: int, total: int, waiting: str) -> None:
            progress.update(task, completed=ready, total=total, description=f"{what}: {escape(waiting or 'done')}")

        wait_healthy(config, timeout, report, replicas)


@cluster_app.command("up")
def up_command(
    config_file: Annotated[Path, typer.Argument(help="cluster.yaml (see examples/cluster/)")],
    state_dir: StateDir = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait until every deployment is healthy")] = 300.0,
) -> None:
    """Start (or join) Ray on explicit ports, deploy every trunk and the ingress (gRPC + OpenAI HTTP), wait until healthy."""
    from cluster.ray.app import deploy
    from cluster.ray.board import ensure_board
    from cluster.ray.config import load_cluster_config
    from cluster.ray.desk import DeskSpec, ensure_desk
    from cluster.ray.operate import driver, endpoints, record_deployments, start_or_join
    from cluster.ray.runtime import default_state_dir, join_command, save_state
    from cluster.tree_import import import_tree
    from registry.db import open_registry

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
    state = start_or_join(config, state_dir, console.print)
    save_state(state_dir, state)  # before deploying: `down` can always stop what was started
    with driver(state):
        ensure_board(config.ray.namespace)
        if config.ingress.updates:  # before the replicas start: it pins versions and writes the snapshots
            trees = tuple((t.tree, str(t.tree_dir)) for t in config.trunks)
            with console.status("opening the update desk (signed updates) ..."):
                ensure_desk(
                    DeskSpec(
                        config.registry,
                        trees,
                        config.ingress.update_threads,
                        config.ingress.job_cpus,
                        config.ingress.job_threads,
                    ),
                    config.ray.namespace,
                    timeout,
                )
        deploy(config)
        _wait(config, console, "deploying", timeout)
        where = endpoints(config)
    state = state.with_(endpoints=where)
    save_state(state_dir, state)
    record_deployments(config, where, "active", _warner(console))
    http = config.ingress.http_port
    openai = f", OpenAI HTTP API on port {http} (/v1)" if http else ""
    console.print(
        f"[green]cluster {escape(config.name)} is up[/green]: gRPC ingress on {', '.join(where)}{openai} "
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
    from cluster.ray.config import load_cluster_config
    from cluster.ray.operate import driver
    from cluster.ray.runtime import default_state_dir, load_state
    from cluster.ray.status import collect_status, render_status

    state = load_state(state_dir or default_state_dir())
    config = load_cluster_config(state.config_file)
    with driver(state):
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
    from cluster.ray.config import load_cluster_config
    from cluster.ray.operate import driver
    from cluster.ray.runtime import default_state_dir, load_state, save_state

    if replicas is not None:
        if min_replicas is not None or max_replicas is not None:
            raise ClusterError("give either --replicas or --min/--max, not both")
        scaling = Scaling.fixed(replicas)
    elif min_replicas is None or max_replicas is None:
        raise ClusterError("give --replicas N, or both --min and --max")
    else:
        scaling = Scaling(min_replicas, max_replicas)
    state_dir = state_dir or default_state_dir()
    state = load_state(state_dir)
    config = load_cluster_config(state.config_file)
    config.trunk(trunk)  # unknown trunk: an error naming the known ones
    console = Console()
    with driver(state):
        scale(config, trunk, scaling)
        save_state(state_dir, state.with_(overrides={**state.overrides, trunk: scaling.as_dict()}))
        if wait:
            want = {trunk: scaling.min} if scaling.min == scaling.max else None
            _wait(config, console, f"scaling {trunk}", timeout, want)
    what = f"{scaling.min} replica(s)" if scaling.min == scaling.max else f"autoscaling {scaling.min}..{scaling.max}"
    console.print(f"[green]trunk {escape(trunk)}[/green]: {what}")


@cluster_app.command("drain")
def drain_command(
    machine: Annotated[str, typer.Argument(help="the machine: IP:PORT (Ray's node manager), IP, or Ray node id")],
    state_dir: StateDir = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait until no replica is left there")] = 300.0,
) -> None:
    """Move every replica off a machine (Serve starts replacements elsewhere first), before removing it."""
    from cluster.ray.config import load_cluster_config
    from cluster.ray.operate import drain_machine, driver
    from cluster.ray.runtime import default_state_dir, load_state

    state = load_state(state_dir or default_state_dir())
    config = load_cluster_config(state.config_file)
    console = Console()
    with driver(state):
        with console.status(f"moving replicas off {machine} ..."):
            ray_id = drain_machine(config, state, machine, timeout)
        _wait(config, console, "replacements", timeout)
    console.print(
        f"[green]drained[/green] {escape(machine)} (Ray node {ray_id[:12]}): no TreeLM replica runs there; "
        "Ray takes the machine out of the cluster, it can be stopped"
    )


@cluster_app.command("down")
def down_command(state_dir: StateDir = None) -> None:
    """Delete the deployments, and stop Ray if `up` started it."""
    import ray

    from cluster.ray.app import app_names, teardown
    from cluster.ray.board import BOARD_NAME
    from cluster.ray.config import load_cluster_config
    from cluster.ray.desk import kill_desk
    from cluster.ray.operate import driver, record_deployments
    from cluster.ray.runtime import default_state_dir, head_alive, load_state, remove_state, stop_ray_process

    state_dir = state_dir or default_state_dir()
    state = load_state(state_dir)
    config = load_cluster_config(state.config_file)
    console = Console()
    reachable = state.head is None or head_alive(state)
    if reachable:
        with driver(state), console.status("stopping the deployments ..."):
            teardown(app_names(config))
            try:
                ray.kill(ray.get_actor(BOARD_NAME, namespace=state.namespace))
            except ValueError:
                pass
            kill_desk(state.namespace)
        record_deployments(config, state.endpoints, "stopped", _warner(console))
    if state.head is not None:
        if ray.is_initialized():
            ray.shutdown()  # this process was a driver of the cluster that now goes away
        with console.status(f"stopping the Ray head (pid {state.head.pid}) ..."):
            stop_ray_process(state.head.pid)
    remove_state(state_dir)
    console.print(
        f"[green]cluster {escape(state.name)} is down[/green]"
        + ("" if state.head is not None else " (Ray itself was not started by `up` and keeps running)")
    )
