"""`treelm serve TREE_DIR`: one process serving a built tree over gRPC.

    treelm registry init --db sqlite:///registry.db
    treelm serve build/demo --db sqlite:///registry.db --port 50051 --metrics-port 9100

The tree is imported into the registry first (idempotent). SIGTERM or Ctrl-C
drains: health turns NOT_SERVING, new calls are refused, in-flight calls get
``--grace`` seconds, then the engine stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from cluster.errors import ServeError
from cluster.service.catalog import Catalog
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.tree_import import import_tree
from cluster.updates.coordinator import Coordinator
from cluster.updates.policy import UpdatePolicy
from nodes.runtime.engine import Engine, EngineConfig
from nodes.store.tree import open_tree
from registry.access import record_deployment
from registry.db import Registry, open_registry
from registry.errors import RegistryError

__all__ = ["serve_command"]

log = logging.getLogger("treelm.server")


def serve_command(
    tree_dir: Annotated[Path, typer.Argument(help="a built tree directory (treelm tree build ... --out DIR)")],
    db: Annotated[
        str | None,
        typer.Option("--db", help="registry URL (default: $TREELM_REGISTRY_URL or ~/.treelm/registry.db)"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0 = any free port)")] = 50051,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate chain")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Prometheus /metrics port")] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="accept calls without a token (local development only)")
    ] = False,
    grace: Annotated[float, typer.Option(help="seconds in-flight calls may finish at shutdown")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="rows decoded together")] = 32,
    max_queue: Annotated[int, typer.Option(help="waiting requests before RESOURCE_EXHAUSTED")] = 1024,
    threads: Annotated[int | None, typer.Option(help="torch threads for the engine (default: torch's)")] = None,
    updates: Annotated[
        bool,
        typer.Option(
            "--updates/--no-updates",
            help="serve the Updates service (signed update protocol) over this tree dir and registry",
        ),
    ] = True,
    update_policy: Annotated[
        Path | None,
        typer.Option("--update-policy", help="update policy YAML (default: TREE_DIR/update-policy.yaml)"),
    ] = None,
) -> None:
    """Serve a built tree over gRPC (Inference, Registry, Updates, Admin, health, reflection)."""
    console, err = Console(), Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        metrics_port=metrics_port,
        auth=not insecure_no_auth,
        grace_s=grace,
    )
    if threads is not None and threads < 1:
        raise ServeError(f"--threads must be >= 1, got {threads}")
    tree = open_tree(tree_dir)
    registry = open_registry(db)
    try:
        imported = import_tree(registry, tree.root)
        what = "imported into" if imported.changed else "already in"
        console.print(f"tree [bold]{escape(tree.name)}[/bold] ({len(tree.nodes) + 1} nodes) {what} {registry.url}")
        if insecure_no_auth:
            err.print(
                Panel(
                    "[bold]authentication is OFF[/bold] (--insecure-no-auth): anyone who can reach this port may call it.\n"
                    "Calls without a token see public nodes only. Never use this outside local development.",
                    title="[bold red]WARNING[/bold red]",
                    border_style="red",
                )
            )
            log.warning("authentication is OFF (--insecure-no-auth)")
        if threads is not None:
            torch.set_num_threads(threads)
        coordinator = None
        if updates:  # pins every node's version and writes the snapshot the engine then serves
            # The next level's aggregation round runs after an approval returns (one at a time).
            rounds = ThreadPoolExecutor(1, thread_name_prefix="treelm-update-round")
            coordinator = Coordinator.open(
                registry, tree.root, UpdatePolicy.for_tree(tree.root, update_policy), background=rounds.submit
            )
        with console.status(f"loading the base of {escape(tree.name)} ..."):
            engine = Engine(tree.base_dir, tree.root, EngineConfig(max_batch_size=max_batch, max_queue=max_queue))
        if coordinator is not None:
            coordinator.on_snapshot(engine.use_tree)
        asyncio.run(_run(engine, registry, config, console, coordinator))
    finally:
        registry.close()


async def _run(
    engine: Engine, registry: Registry, config: ServerConfig, console: Console, coordinator: Coordinator | None = None
) -> None:
    server = TreeServer([EngineTrunk(engine)], Catalog(registry), config, close_trunks=True, updates=coordinator)
    try:
        await server.start()
    except ServeError:
        await EngineTrunk(engine).close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    endpoint = f"{config.host}:{server.port}"
    await asyncio.to_thread(_record, registry, engine, endpoint, "active")
    metrics = f", metrics on :{server.metrics_port}/metrics" if server.metrics_port is not None else ""
    console.print(
        f"[green]serving[/green] {escape(engine.tree.name)} on {endpoint} "
        f"(tls {'on' if config.tls else 'off'}, auth {'on' if config.auth else 'OFF'}{metrics}); Ctrl-C to stop"
    )
    ticker = None
    if coordinator is not None and coordinator.policy.window_s:  # time-window aggregation needs a clock
        ticker = asyncio.create_task(_tick(coordinator, min(60.0, coordinator.policy.window_s / 10)))
    await stop.wait()
    if ticker is not None:
        ticker.cancel()
    console.print(f"draining (up to {config.grace_s:g}s for in-flight calls) ...")
    await server.stop()
    await asyncio.to_thread(_record, registry, engine, endpoint, "stopped")
    console.print("[green]stopped[/green]")


async def _tick(coordinator: Coordinator, every_s: float) -> None:
    """Aggregate parents whose policy window has passed (what `treelm update tick` does from cron)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(coordinator.tick)
        except Exception:  # one failed round must not stop serving; the log has it
            log.exception("update aggregation tick failed")


def _record(registry: Registry, engine: Engine, endpoint: str, status: str) -> None:
    """Tell the registry where the tree's nodes are served (match's "remote" suggestions use it)."""
    nodes = [engine.tree.name, *(str(n.node_id) for n in engine.tree.nodes)]
    try:
        for node in nodes:
            record_deployment(registry, node, trunk=engine.tree.name, endpoint=endpoint, status=status)
    except RegistryError as exc:  # serving matters more than the bookkeeping
        log.warning("could not record the deployment at %s: %s", endpoint, exc)
