"""Start, join, connect to and stop Ray on explicit ports; the state `treelm cluster` keeps between commands.

    head = start_head(config, state_dir)          # `ray start --head --block ...` in its own session
    connect(state)                                # this process becomes a driver of that cluster
    join_command(config, state, ports)            # what a new machine runs to add capacity
    stop_ray_process(head.pid)                           # SIGTERM: Ray drains, then stops every process it started

Every Ray process (head, workers, drivers) gets the same ``RAY_AUTH_MODE``; with
``auth: token`` the token lives in the state directory (mode 0600) and joining
machines need a copy. ``ray stop`` is never used: it kills every Ray process of
the user on the machine, clusters of others included. We stop exactly the
``ray start --block`` processes we started, by pid (and their process group).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.errors import ClusterError, RayStartError
from cluster.ray.config import ClusterConfig, RayPorts
from cluster.ray.priority import WORKER_NICENESS

__all__ = [
    "ClusterState",
    "RayProcess",
    "connect",
    "default_state_dir",
    "head_alive",
    "join_command",
    "load_state",
    "ray_env",
    "ray_executable",
    "ray_start_command",
    "remove_state",
    "save_state",
    "start_head",
    "start_ray_process",
    "stop_ray_process",
    "token_file",
]

STATE_FILE = "state.json"
TOKEN_FILE = "ray_token"
STATE_DIR_ENV = "TREELM_CLUSTER_STATE_DIR"
# Seconds a stopping node lets Serve move work away (Ray's own default is 30).
SHUTDOWN_DRAIN_S = 5
_FLAGS = {
    "node_manager": "--node-manager-port",
    "object_manager": "--object-manager-port",
    "dashboard_agent": "--dashboard-agent-listen-port",
    "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
    "runtime_env_agent": "--runtime-env-agent-port",
    "metrics_export": "--metrics-export-port",
}


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".treelm" / "cluster")


@dataclass(frozen=True)
class RayProcess:
    pid: int  # the `ray start --block` process; its process group holds the node's Ray processes
    log: str
    temp_dir: str


@dataclass(frozen=True)
class ClusterState:
    """What `treelm cluster up` leaves behind for status / scale / drain / down."""

    config_file: str
    name: str
    gcs_address: str
    namespace: str
    auth: str  # token | disabled
    token_file: str | None
    head: RayProcess | None  # None: we joined a cluster someone else started (down leaves Ray up)
    endpoints: tuple[str, ...] = ()
    overrides: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # trunk -> scale settings
    started_at: float = 0.0

    def with_(self, **changes) -> ClusterState:
        return ClusterState(**{**asdict(self), "head": self.head, **changes})


def save_state(state_dir: Path, state: ClusterState) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def load_state(state_dir: Path) -> ClusterState:
    path = state_dir / STATE_FILE
    if not path.is_file():
        raise ClusterError(
            f"no cluster is up here (no {path}): run `treelm cluster up CONFIG` first, or pass the --state-dir it used"
        )
    try:
        raw = json.loads(path.read_text())
        head = RayProcess(**raw.pop("head")) if raw.get("head") else raw.pop("head", None)
        raw["endpoints"] = tuple(raw.get("endpoints", ()))
        return ClusterState(head=head, **raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ClusterError(f"{path} is not a TreeLM cluster state ({exc}); remove it and run `up` again") from None


def remove_state(state_dir: Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def token_file(state_dir: Path, create: bool) -> Path:
    path = state_dir / TOKEN_FILE
    if create and not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


def ray_env(auth: str, token: Path | None) -> dict[str, str]:
    """Environment for every Ray process of the cluster (head, workers, replicas, drivers)."""
    env = {
        "RAY_AUTH_MODE": auth,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(SHUTDOWN_DRAIN_S),
        # Replicas and the ingress serve at a normal priority (Ray's default is 15); the desk and
        # its tasks lower themselves (cluster.ray.priority).
        "RAY_worker_niceness": str(WORKER_NICENESS),
        # Replicas load models from local directories only, one torch thread each (see DESIGN.md).
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    if auth == "token":
        if token is None:
            raise ClusterError("auth: token needs a token file")
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    return env


def ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def ray_start_command(
    ports: RayPorts,
    temp_dir: Path,
    *,
    head: bool,
    address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: int | None = None,
    resources: Mapping[str, float] | None = None,
    dashboard: bool = False,
    block: bool = True,
) -> list[str]:
    """`ray start` with every port explicit (a head, or a node joining ``address``)."""
    cmd = [ray_executable(), "start", "--disable-usage-stats"]
    if block:
        cmd.append("--block")
    if head:
        cmd += [
            "--head",
            "--port",
            str(ports.gcs),
            "--ray-client-server-port",
            str(ports.client_server),
            "--include-dashboard",
            "true" if dashboard else "false",
            "--dashboard-port",
            str(ports.dashboard),
            "--dashboard-host",
            "127.0.0.1",
        ]
    else:
        if not address:
            raise ClusterError("a worker node needs the head's address (HOST:GCS_PORT)")
        cmd += ["--address", address]
    for name, port in ports.node_ports().items():
        cmd += [_FLAGS[name], str(port)]
    cmd += ["--min-worker-port", str(ports.workers[0]), "--max-worker-port", str(ports.workers[1])]
    cmd += ["--temp-dir", str(temp_dir)]
    if num_cpus is not None:
        cmd += ["--num-cpus", f"{num_cpus:g}"]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    if resources:
        cmd += ["--resources", json.dumps(dict(resources))]
    return cmd


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _wait_started(proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Ray runtime started" in text and "--block" in text:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    tail = "\n".join((log.read_text(errors="replace") if log.exists() else "").splitlines()[-15:])
    if proc.poll() is None:
        stop_ray_process(proc.pid, timeout_s=10)
    why = f"exited with code {proc.returncode}" if proc.poll() is not None else f"did not start within {timeout_s:g}s"
    raise RayStartError(f"Ray {why}; the end of {log}:\n{tail}")


def start_ray_process(
    cmd: Sequence[str],
    env: Mapping[str, str],
    log: Path,
    temp_dir: Path,
    ports: Sequence[int] = (),
    timeout_s: float = 90.0,
) -> RayProcess:
    """Run ``cmd`` (a `ray start --block`) in a session of its own and wait until the node is up."""
    busy = [p for p in ports if _port_in_use(p)]
    if busy:
        raise RayStartError(
            f"port(s) {', '.join(map(str, busy))} are in use: another Ray (or service) runs "
            "here; pick other ports under ray.ports in the cluster file"
        )
    log.parent.mkdir(parents=True, exist_ok=True)
    temp_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            list(cmd),
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _wait_started(proc, log, timeout_s)
    return RayProcess(pid=proc.pid, log=str(log), temp_dir=str(temp_dir))


def start_head(config: ClusterConfig, state_dir: Path, timeout_s: float = 90.0) -> tuple[RayProcess, dict[str, str]]:
    """Start a head node as ``config`` says; returns it and the environment drivers must use."""
    ray_cfg = config.ray
    token = token_file(state_dir, create=True) if ray_cfg.auth == "token" else None
    env = ray_env(ray_cfg.auth, token)
    cmd = ray_start_command(
        ray_cfg.ports,
        ray_cfg.temp_dir,
        head=True,
        num_cpus=ray_cfg.num_cpus,
        num_gpus=ray_cfg.num_gpus,
        resources=ray_cfg.resources,
        dashboard=ray_cfg.dashboard,
    )
    p = ray_cfg.ports
    ports = [p.gcs, p.client_server, *p.node_ports().values()]
    return start_ray_process(cmd, env, state_dir / "head.log", ray_cfg.temp_dir, ports, timeout_s), env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def stop_ray_process(pid: int, timeout_s: float = 40.0) -> bool:
    """SIGTERM the `ray start --block` we started; SIGKILL its process group if it lingers. True if it was up."""
    if not _alive(pid):
        return False
    try:
        os.kill(pid, signal.SIGTERM)  # Ray drains for SHUTDOWN_DRAIN_S, then stops its processes
    except ProcessLookupError:
        return False
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and _alive(pid):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # our session: whatever of it is left (it is its own group leader)
    except (ProcessLookupError, PermissionError):
        pass
    return True


def head_alive(state: ClusterState) -> bool:
    return state.head is not None and _alive(state.head.pid)


def connect(state: ClusterState) -> bool:
    """Make this process a driver of the cluster in ``state``; False if it already was one."""
    token = Path(state.token_file) if state.token_file else None
    os.environ.update(ray_env(state.auth, token))
    already_imported = "ray._raylet" in sys.modules
    import ray

    if already_imported and not ray.is_initialized():
        # Ray reads RAY_AUTH_MODE and the token when it is imported; a process that imported it
        # earlier (a test session) re-reads them, the way Ray's own token setup does.
        from ray._raylet import (  # type: ignore[attr-defined]  # compiled in, absent from _raylet.pyi
            AuthenticationTokenLoader,
            Config,
        )

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=state.gcs_address,
            namespace=state.namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {state.gcs_address}: {exc} "
            "(is it up? `treelm cluster up CONFIG` starts it)"
        ) from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no per-call INFO lines in the operator's terminal
    return True


def join_command(
    config: ClusterConfig,
    state: ClusterState,
    ports: RayPorts | None = None,
    num_cpus: float | None = None,
    resources: Mapping[str, float] | None = None,
) -> str:
    """The shell line a new machine runs to join (same ports as the head unless given)."""
    cmd = ray_start_command(
        ports or config.ray.ports,
        config.ray.temp_dir,
        head=False,
        address=state.gcs_address,
        num_cpus=num_cpus,
        resources=resources,
    )
    cmd[0] = "ray"
    env = {"RAY_AUTH_MODE": state.auth}
    if state.auth == "token":
        env["RAY_AUTH_TOKEN_PATH"] = "~/.treelm/ray_token"  # a copy of the head's token file
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(cmd)
