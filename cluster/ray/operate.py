"""What `treelm cluster up|drain|down` do, as functions: start or join Ray, find and drain a machine,
record where the trees are served. The CLI (cluster/cli/cluster.py) only parses and prints.

Vocabulary: a *machine* is a Ray node (a host that runs Ray); a *node* is always a node of a tree.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster.errors import ClusterError
from cluster.ray.config import ClusterConfig
from cluster.ray.runtime import (
    ClusterState,
    connect,
    head_alive,
    load_state,
    ray_executable,
    start_head,
    stop_ray_process,
    token_file,
)
from registry.errors import RegistryError

__all__ = ["drain_machine", "driver", "endpoints", "find_machine", "record_deployments", "start_or_join"]

Say = Callable[[str], None]


@contextmanager
def driver(state: ClusterState) -> Iterator[None]:
    """Connected to the cluster for the block (an already connected process stays connected)."""
    import ray

    ours = connect(state)
    try:
        yield
    finally:
        if ours:
            ray.shutdown()


def endpoints(config: ClusterConfig) -> tuple[str, ...]:
    """host:port of each ingress replica (0.0.0.0 becomes the IP of the machine it runs on)."""
    from cluster.ray.app import INGRESS_APP, INGRESS_DEPLOYMENT
    from cluster.ray.status import serve_details

    ing = config.ingress
    if ing.host not in ("0.0.0.0", "::"):
        return (f"{ing.host}:{ing.port}",)
    app = serve_details().get("applications", {}).get(INGRESS_APP) or {}
    replicas = ((app.get("deployments") or {}).get(INGRESS_DEPLOYMENT) or {}).get("replicas", ())
    return tuple(sorted({f"{r.get('node_ip')}:{ing.port}" for r in replicas})) or (f"{ing.host}:{ing.port}",)


def record_deployments(config: ClusterConfig, where: tuple[str, ...], status: str, warn: Say) -> None:
    """Tell the registry where every node is served (match's "remote" suggestions read it)."""
    from nodes.store.tree import open_tree
    from registry.access import record_deployment
    from registry.db import open_registry

    try:
        registry = open_registry(config.registry)
    except RegistryError as exc:
        warn(f"could not record the deployment: {exc}")
        return
    try:
        for trunk in config.trunks:
            tree = open_tree(trunk.tree_dir)
            for node in (tree.name, *(str(n.node_id) for n in tree.nodes)):
                for endpoint in where:
                    record_deployment(registry, node, trunk=tree.name, endpoint=endpoint, status=status)
    except RegistryError as exc:  # serving matters more than the bookkeeping
        warn(f"could not record the deployment: {exc}")
    finally:
        registry.close()


def start_or_join(config: ClusterConfig, state_dir: Path, say: Say) -> ClusterState:
    """A head started on the config's ports, the head an earlier `up` left running, or the cluster
    at ``ray.address`` joined; the state `treelm cluster` keeps between commands."""
    previous = None
    try:
        previous = load_state(state_dir)
    except ClusterError:
        pass
    base: dict[str, Any] = dict(
        config_file=str(Path(config.file).resolve()),
        name=config.name,
        namespace=config.ray.namespace,
        auth=config.ray.auth,
        started_at=time.time(),
    )
    if previous is not None and head_alive(previous):
        say(f"Ray is already up at {previous.gcs_address} (started by an earlier `up`): redeploying")
        return previous.with_(**{k: v for k, v in base.items() if k != "started_at"}, overrides={})
    if previous is not None and previous.head is not None:
        stop_ray_process(previous.head.pid, timeout_s=5)  # a half-dead head of an earlier run
    if config.ray.address:
        token = token_file(state_dir, create=False) if config.ray.auth == "token" else None
        if token is not None and not token.exists():
            raise ClusterError(f"ray.auth is token: copy the head's token file to {token} first")
        say(f"joining the Ray cluster at {config.ray.address}")
        return ClusterState(gcs_address=config.ray.address, token_file=str(token) if token else None, head=None, **base)
    say(f"starting a Ray head on port {config.ray.ports.gcs} ...")
    head, _env = start_head(config, state_dir)
    token = token_file(state_dir, create=False) if config.ray.auth == "token" else None
    address = _gcs_address(head.log, config.ray.ports.gcs)
    say(f"Ray head started at {address} (pid {head.pid}, log {head.log})")
    return ClusterState(gcs_address=address, token_file=str(token) if token else None, head=head, **base)


def _gcs_address(log: str, port: int) -> str:
    """The head's address as Ray printed it (Ray binds the machine's IP, not 127.0.0.1)."""
    found = re.search(r"--address='([^']+)'", Path(log).read_text(errors="replace"))
    return found.group(1) if found else f"127.0.0.1:{port}"


def find_machine(address: str) -> dict[str, Any]:
    """The live Ray machine named by IP:PORT (its node manager), IP, or Ray's node id (a prefix)."""
    import ray

    machines = [m for m in ray.nodes() if m.get("Alive")]
    by_id = [m for m in machines if len(address) >= 6 and m["NodeID"].startswith(address.lower())]
    by_addr = [m for m in machines if f"{m['NodeManagerAddress']}:{m['NodeManagerPort']}" == address]
    by_ip = [m for m in machines if m["NodeManagerAddress"] == address]
    for found in (by_addr, by_id, by_ip):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ClusterError(
                f"{address!r} matches {len(found)} machines: give IP:PORT or the Ray node id "
                "(`treelm cluster status` lists them)"
            )
    raise ClusterError(
        f"no live machine {address!r}: give IP:PORT, an IP or a Ray node id from `treelm cluster status`"
    )


def drain_machine(config: ClusterConfig, state: ClusterState, address: str, timeout_s: float) -> str:
    """Ask Ray to drain a worker machine and wait until no TreeLM replica runs there; its Ray node id.

    Serve starts replacements elsewhere before it stops the replicas there (connected: see driver)."""
    from cluster.ray.app import app_names
    from cluster.ray.status import serve_details

    machine = find_machine(address)
    if "node:__internal_head__" in (machine.get("Resources") or {}):
        raise ClusterError("that is the head machine: it runs Serve's controller and the ingress; drain workers only")
    ray_id = str(machine["NodeID"])
    cmd = [
        ray_executable(),
        "drain-node",
        "--address",
        state.gcs_address,
        "--node-id",
        ray_id,
        "--reason",
        "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message",
        "treelm cluster drain",
        "--deadline-remaining-seconds",
        str(int(timeout_s)),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ClusterError(f"Ray refused to drain {address}: {(done.stderr or done.stdout).strip()[-500:]}")
    end = time.monotonic() + timeout_s
    while True:
        apps = serve_details().get("applications", {})
        deployments = [d for name in app_names(config) for d in (apps.get(name, {}).get("deployments") or {}).values()]
        left = sum(1 for d in deployments for r in d.get("replicas", ()) if r.get("node_id") == ray_id)
        if left == 0:
            return ray_id
        if time.monotonic() > end:
            raise ClusterError(f"{left} replica(s) still on {address} after {timeout_s:g}s")
        time.sleep(0.5)
