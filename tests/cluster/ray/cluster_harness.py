"""A TreeLM cluster on real Ray for tests: free explicit ports, a cluster.yaml, the CLI, extra Ray nodes.

One session-scoped cluster (tests/cluster/ray/conftest.py) serves every Ray test:
trunk ``rt`` (the factory's default tree over the session's tiny base, so the
single-process SDK tests apply unchanged) and trunk ``kb`` (another tree over
another tiny base with a long context, for long streams and a small adapter bank).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.cli import main
from cluster.ray.config import RayPorts
from cluster.ray.runtime import RayProcess, ray_env, ray_start_command, start_ray_process, stop_ray_process
from nodes.runtime.requests import GenerationRequest, SamplingParams
from tests.cluster.grpc_harness import World
from tests.nodes.treefactory import RandomNode, RandomTreeSpec

KB_NODES = (
    RandomNode("de", r=4, alpha=8.0, targets=("q_proj", "v_proj")),
    RandomNode("de/law", r=2, alpha=4.0, targets=("q_proj", "o_proj")),
    RandomNode("de/law/tax", r=2, alpha=4.0, targets=("v_proj",)),
    RandomNode("it", r=2, alpha=4.0, targets=("q_proj", "v_proj")),
    RandomNode("it/med", r=2, alpha=2.0, targets=("k_proj", "v_proj")),
    RandomNode("es", r=2, alpha=4.0, targets=("q_proj",)),
)
KB_SPEC = RandomTreeSpec(name="kb", nodes=KB_NODES, seed=3)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port_block(size: int = 220) -> int:
    """The first port of ``size`` consecutive free ports (never Ray's, Redis' or Serve's defaults)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 44000)
        if all(_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError("no free block of ports")


def head_ports(base: int) -> RayPorts:
    return RayPorts(
        gcs=base,
        client_server=base + 1,
        dashboard=base + 2,
        node_manager=base + 3,
        object_manager=base + 4,
        dashboard_agent=base + 5,
        dashboard_agent_grpc=base + 6,
        runtime_env_agent=base + 7,
        metrics_export=base + 8,
        serve_http=base + 9,
        serve_grpc=base + 10,
        workers=(base + 100, base + 149),
    )


def worker_ports(base: int) -> RayPorts:
    """A second node on the same machine: its own node ports and worker range."""
    return RayPorts(
        gcs=base,
        client_server=base + 1,
        dashboard=base + 2,
        node_manager=base + 33,
        object_manager=base + 34,
        dashboard_agent=base + 35,
        dashboard_agent_grpc=base + 36,
        runtime_env_agent=base + 37,
        metrics_export=base + 38,
        serve_http=base + 9,
        serve_grpc=base + 10,
        workers=(base + 150, base + 199),
    )


def cluster_yaml(
    path: Path, *, base: int, registry_url: str, temp_dir: Path, trees: dict[str, dict], ingress: dict | None = None
) -> Path:
    p = head_ports(base)
    ports = {
        name: getattr(p, name)
        for name in (
            "gcs",
            "client_server",
            "dashboard",
            "node_manager",
            "object_manager",
            "dashboard_agent",
            "dashboard_agent_grpc",
            "runtime_env_agent",
            "metrics_export",
            "serve_http",
            "serve_grpc",
        )
    }
    ports["workers"] = list(p.workers)
    doc = {
        "name": "test",
        "registry": registry_url,
        "ray": {"num_cpus": 4, "temp_dir": str(temp_dir), "auth": "token", "ports": ports},
        "ingress": {
            "port": base + 20,
            "metrics_port": base + 21,
            "http_port": base + 22,
            "grace_s": 2,
            **(ingress or {}),
        },
        "trunks": [{"tree": str(tree_dir), **options} for tree_dir, options in trees.items()],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class RayWorld:
    """The session's cluster: the rt world of the gRPC harness plus what the cluster adds."""

    world: World  # tree rt, registry, tokens, a local engine over rt (expected outputs)
    kb_tree: Any
    config: Path
    state_dir: Path
    base: int
    target: str  # the ingress, host:port
    temp_dir: Path
    http_url: str = ""  # the ingress's OpenAI-compatible API (base_url of the openai client)
    extra_nodes: list[RayProcess] = field(default_factory=list)
    root_key: str = ""  # fingerprint of the registry's root key (devices trust it to pull variants)

    def cli(self, *args: str) -> int:
        return main(["cluster", *args, "--state-dir", str(self.state_dir)])

    def status(self, capsys) -> dict:
        capsys.readouterr()
        assert self.cli("status", "--json") == 0
        return json.loads(capsys.readouterr().out)

    def start_worker_node(self, num_cpus: float = 2, resources: dict | None = None) -> RayProcess:
        """`ray start --address` a second Ray node on this machine (own ports and temp dir)."""
        from cluster.ray.runtime import load_state

        state = load_state(self.state_dir)
        ports = worker_ports(self.base)
        temp = self.temp_dir.parent / (self.temp_dir.name + "-w")
        cmd = ray_start_command(
            ports, temp, head=False, address=state.gcs_address, num_cpus=num_cpus, resources=resources
        )
        env = ray_env(state.auth, Path(state.token_file) if state.token_file else None)
        node = start_ray_process(cmd, env, self.state_dir / "worker.log", temp, list(ports.node_ports().values()))
        self.extra_nodes.append(node)
        return node

    def stop_extra_nodes(self) -> None:
        while self.extra_nodes:
            stop_ray_process(self.extra_nodes.pop().pid, timeout_s=20)


def expected(engine, node: str, prompt: str, max_new_tokens: int) -> tuple[int, ...]:
    """Greedy tokens of ``node`` from a local engine over the same tree (what a replica must answer)."""
    request = GenerationRequest(node=node, prompt=prompt, params=SamplingParams(max_new_tokens=max_new_tokens))
    return asyncio.run(engine.generate(request)).token_ids


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition", every: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
