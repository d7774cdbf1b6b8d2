"""One process serving one built tree: the engine, the update coordinator and the server (gRPC,
and the OpenAI-compatible HTTP API with ``ServerConfig.http_port``), run until SIGTERM or Ctrl-C
(what `treelm serve` does; cluster/cli/serve.py parses its options).

The tree is imported into the registry first (idempotent). SIGTERM or Ctrl-C drains: health
turns NOT_SERVING, new calls are refused, in-flight calls get ``grace_s`` seconds, then the
engine stops.

When the tree's update policy has ``customize.key``, tenants' fine-tuning jobs run here too
(cluster/jobs): a :class:`~cluster.jobs.runner.JobRunner` claims them one at a time and trains
each in a separate process with ``job_threads`` CPU threads (beside the engine's ``threads``);
the node it makes is served from the snapshot switch on, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cluster.errors import JobError, PolicyError, ServeError
from cluster.jobs.runner import JobRunner, ProcessLauncher
from cluster.service.access import NodeAccess
from cluster.service.catalog import Catalog
from cluster.service.distribution import Distributor, VariantSigning
from cluster.service.fine_tuning import FineTuningCalls
from cluster.service.quota import Quotas
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.tree_import import import_tree
from cluster.updates.coordinator import Coordinator
from cluster.updates.keys import load_signing_key
from cluster.updates.policy import UpdatePolicy
from hierarchy.errors import KeyFormatError
from hierarchy.updates.envelope import Envelope
from nodes.base.precision import PRECISIONS
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import DEFAULT_CONTENDED_RUNNING
from nodes.store.tree import BuiltTree, open_tree
from registry.access import record_deployment
from registry.db import Registry, open_registry
from registry.errors import InvalidMemorySize, RegistryError
from registry.limits import all_tenant_limits
from registry.memory import parse_cache_size, parse_memory_size

__all__ = ["StandaloneOptions", "serve_standalone"]

log = logging.getLogger("treelm.server")

Say = Callable[[str], None]


@dataclass(frozen=True)
class StandaloneOptions:
    """What `treelm serve` runs: a tree dir, a registry, the server's settings and the engine's."""

    tree_dir: Path
    db: str | None = None  # registry URL; None: $TREELM_REGISTRY_URL or ~/.treelm/registry.db
    server: ServerConfig = field(default_factory=ServerConfig)
    max_batch: int = 32
    max_queue: int = 1024
    tenant_step_rows: int | None = None  # a tenant's rows per decode step while others have rows (None: all)
    tenant_contended_running: int | None = DEFAULT_CONTENDED_RUNNING  # nodes.runtime.fair (None: off)
    prefill_chunk: int = 32  # a longer prompt is prefilled this many tokens per step while rows decode (0: whole)
    threads: int | None = None  # torch threads for the engine; None: torch's default
    updates: bool = True  # serve the signed update protocol over this tree dir and registry
    update_policy: Path | None = None  # default: TREE_DIR/update-policy.yaml
    variant_key: Path | None = None  # the online key that signs variant manifests (Distribution)
    # opens an encrypted variant_key (None: $TREELM_KEY_PASSPHRASE, else the key must be plain)
    variant_key_passphrase: bytes | None = field(default=None, repr=False)
    variant_delegation: Path | None = None  # root's delegation of that key (treelm keys delegate-variants)
    variant_cache: str = "20GiB"  # bound on TREE_DIR/variants (Distributor's LRU eviction)
    prefix_cache: str = "256MiB"  # the engine's prompt-prefix keys/values ("0" or "off": none)
    precision: str = "fp32"  # nodes.base.precision: fp32, bf16, int8 or auto
    job_threads: int = 1  # CPU threads of a fine-tuning job's worker process (one job at a time)

    @property
    def prefix_cache_bytes(self) -> int:
        return parse_cache_size(self.prefix_cache, field="--prefix-cache")

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ServeError(f"--threads must be >= 1, got {self.threads}")
        if self.job_threads < 1:
            raise ServeError(f"--job-threads must be >= 1, got {self.job_threads}")
        if self.precision not in (*PRECISIONS, "auto"):
            raise ServeError(f"--precision must be one of {', '.join(PRECISIONS)} or auto, got {self.precision!r}")
        if (self.variant_key is None) != (self.variant_delegation is None):
            raise ServeError("serving variants needs both --variant-key and --variant-delegation")
        try:
            parse_memory_size(self.variant_cache, field="--variant-cache")
            self.prefix_cache_bytes  # noqa: B018  (refused here, before anything starts)
        except InvalidMemorySize as exc:
            raise ServeError(str(exc)) from None


def serve_standalone(options: StandaloneOptions, say: Say) -> None:
    """Import the tree, load the base, serve until a signal, drain, stop (blocking)."""
    tree = open_tree(options.tree_dir)
    registry = open_registry(options.db)
    try:
        imported = import_tree(registry, tree.root)
        what = "imported into" if imported.changed else "already in"
        say(f"tree {tree.name} ({len(tree.nodes) + 1} nodes) {what} {registry.url}")
        if not options.server.auth:
            log.warning("authentication is OFF (--insecure-no-auth)")
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        coordinator = None
        if options.updates:  # pins every node's version and writes the snapshot the engine then serves
            # The next level's aggregation round runs after an approval returns (one at a time).
            rounds = ThreadPoolExecutor(1, thread_name_prefix="treelm-update-round")
            policy = UpdatePolicy.for_tree(tree.root, options.update_policy)
            coordinator = Coordinator.open(registry, tree.root, policy, background=rounds.submit)
        runner = _job_runner(options, registry, coordinator, say)  # before the base: a bad key ends it at once
        # The variant key first: a missing passphrase ends the command before the base is loaded.
        distribution = _distributor(options, tree.name, tree.root, registry)
        say(f"loading the base of {tree.name} ...")
        config = EngineConfig(
            max_batch_size=options.max_batch,
            max_queue=options.max_queue,
            prefix_cache_bytes=options.prefix_cache_bytes,
            tenant_step_rows=options.tenant_step_rows,
            tenant_contended_running=options.tenant_contended_running,
            prefill_chunk=options.prefill_chunk,
            precision=options.precision,
        )
        engine = Engine(tree.base_dir, tree.root, config)
        if coordinator is not None:
            coordinator.on_snapshot(engine.use_tree)
        server_config = options.server
        if server_config.spool_dir is None:  # uploads are spooled beside the tree they update
            server_config = replace(server_config, spool_dir=tree.root / "spool")
        fine_tuning = FineTuningCalls(
            registry,
            NodeAccess(Catalog(registry).node_visibility, ttl_s=server_config.node_cache_ttl_s),
            {tree.name: runner.policy} if runner is not None else {},
            Quotas(server_config.quotas, overrides=lambda: all_tenant_limits(registry)),
            wake=runner.wake if runner is not None else None,
        )
        asyncio.run(_run(engine, registry, server_config, say, coordinator, distribution, fine_tuning, runner))
    finally:
        registry.close()


def _job_runner(
    options: StandaloneOptions, registry: Registry, coordinator: Coordinator | None, say: Say
) -> JobRunner | None:
    """The fine-tuning job runner when the tree's policy names ``customize.key`` (None otherwise)."""
    if coordinator is None:  # --no-updates: no desk registers new nodes
        try:
            wanted = UpdatePolicy.for_tree(options.tree_dir, options.update_policy).customize.enabled
        except PolicyError:
            wanted = False
        if wanted:
            log.warning("the update policy sets customize.key, but --no-updates: no fine-tuning jobs run here")
        return None
    if not coordinator.policy.customize.enabled:
        return None
    try:
        coordinator.growth_key()  # a key the registry does not trust would fail every job at its end
    except (JobError, KeyFormatError) as exc:
        raise ServeError(f"fine-tuning jobs: {exc}") from None
    say(f"fine-tuning jobs on (one at a time, {options.job_threads} CPU thread(s) each, in a worker process)")
    worker = f"serve@{socket.gethostname()}:{os.getpid()}"
    launcher = ProcessLauncher(options.job_threads)
    return JobRunner(registry, coordinator, coordinator.policy.customize, launcher, worker_name=worker)


def _distributor(options: StandaloneOptions, tree: str, root: Path, registry: Registry) -> Distributor | None:
    if options.variant_key is None or options.variant_delegation is None:
        return None
    try:
        delegation = Envelope.from_bytes(options.variant_delegation.read_bytes())
    except OSError as exc:
        raise ServeError(f"cannot read --variant-delegation {options.variant_delegation}: {exc}") from None
    signing = VariantSigning(load_signing_key(options.variant_key, options.variant_key_passphrase), {tree: delegation})
    cache = parse_memory_size(options.variant_cache, field="--variant-cache")
    return Distributor({tree: root}, Catalog(registry), signing, cache_bytes=cache)


async def _run(
    engine: Engine,
    registry: Registry,
    config: ServerConfig,
    say: Say,
    coordinator: Coordinator | None,
    distribution: Distributor | None = None,
    fine_tuning: FineTuningCalls | None = None,
    runner: JobRunner | None = None,
) -> None:
    server = TreeServer(
        [EngineTrunk(engine)],
        Catalog(registry),
        config,
        close_trunks=True,
        updates=coordinator,
        distribution=distribution,
        fine_tuning=fine_tuning,
    )
    try:
        await server.start()
    except ServeError:
        await EngineTrunk(engine).close()
        raise
    if runner is not None:
        await asyncio.to_thread(runner.start)  # fails the jobs a previous run left running
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    endpoint = f"{config.host}:{server.port}"
    await asyncio.to_thread(_record, registry, engine, endpoint, "active")
    if coordinator is not None:  # nodes a job adds or `node retire` removes while serving
        coordinator.on_snapshot(_Deployments(registry, engine.tree, endpoint).follow)
    metrics = (
        f", metrics on {config.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port is not None else ""
    )
    http = f", OpenAI API at {server.http_url}" if server.http_url is not None else ""
    say(
        f"serving {engine.tree.name} on {endpoint} "
        f"(tls {'on' if config.tls else 'off'}, auth {'on' if config.auth else 'OFF'}{metrics}{http}); Ctrl-C to stop"
    )
    ticker = None
    if coordinator is not None and coordinator.policy.window_s:  # time-window aggregation needs a clock
        ticker = asyncio.create_task(_tick(coordinator, min(60.0, coordinator.policy.window_s / 10)))
    await stop.wait()
    if ticker is not None:
        ticker.cancel()
    say(f"draining (up to {config.grace_s:g}s for in-flight calls) ...")
    if runner is not None:  # a job in progress ends failed ("interrupted"); queued ones wait for the next start
        await asyncio.to_thread(runner.stop)
    await server.stop()
    await asyncio.to_thread(_record, registry, engine, endpoint, "stopped")
    say("stopped")


async def _tick(coordinator: Coordinator, every_s: float) -> None:
    """Aggregate parents whose policy window has passed (what `treelm update tick` does from cron)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(coordinator.tick)
        except Exception:  # one failed round must not stop serving; the log has it
            log.exception("update aggregation tick failed")


def _served_ids(tree: BuiltTree) -> set[str]:
    return {tree.name, *(str(n.node_id) for n in tree.nodes)}


class _Deployments:
    """Keeps this server's deployment rows in step with the served tree: a node a fine-tuning job
    added becomes ``active`` here, a retired one ``stopped`` (match's "remote" suggestions read them)."""

    def __init__(self, registry: Registry, tree: BuiltTree, endpoint: str):
        self._registry, self._trunk, self._endpoint = registry, tree.name, endpoint
        self._known = _served_ids(tree)

    def follow(self, tree: BuiltTree) -> None:
        """A snapshot listener (runs in the desk's thread after each switch)."""
        served = _served_ids(tree)
        changes = [(n, "active") for n in sorted(served - self._known)]
        changes += [(n, "stopped") for n in sorted(self._known - served)]
        self._known = served
        for node, status in changes:
            try:
                record_deployment(self._registry, node, trunk=self._trunk, endpoint=self._endpoint, status=status)
            except RegistryError as exc:  # serving matters more than the bookkeeping
                log.warning("could not record %s as %s at %s: %s", node, status, self._endpoint, exc)


def _record(registry: Registry, engine: Engine, endpoint: str, status: str) -> None:
    """Tell the registry where the tree's nodes are served (match's "remote" suggestions use it)."""
    nodes = [engine.tree.name, *(str(n.node_id) for n in engine.tree.nodes)]
    try:
        for node in nodes:
            record_deployment(registry, node, trunk=engine.tree.name, endpoint=endpoint, status=status)
    except RegistryError as exc:  # serving matters more than the bookkeeping
        log.warning("could not record the deployment at %s: %s", endpoint, exc)
