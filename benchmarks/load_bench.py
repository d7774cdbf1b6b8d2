"""Load test: both wire formats from 1 to 64 concurrent callers, on one process and on the Ray cluster.

    .venv/bin/python benchmarks/load_bench.py                       # about six minutes on 2 cores
    .venv/bin/python benchmarks/load_bench.py --deployments single  # without Ray

The tiny Llama tree of grpc_bench.py (chains up to depth 3), one torch thread per engine, the
same engine settings on both deployments (batch 32; the callers' one tenant may fill it):

  single   `treelm serve --http-port`: gRPC and the OpenAI-compatible HTTP API in one process
  cluster  `treelm cluster up` on this machine: the ingress (gRPC + HTTP) and one trunk replica

and both wire formats against each:

  grpc         treelm.AsyncClient.generate
  http         the official openai client (AsyncOpenAI), POST /v1/completions
  grpc-stream  treelm.AsyncClient.stream, read to its last chunk (``--wires`` picks some)

For every deployment, wire and concurrency in ``--levels``: that many callers, each sending the
next request (greedy, exactly ``--tokens`` new tokens: end-of-text is biased away; nodes in turn) as soon as its last one is
answered, for ``--seconds``; calls still running at the end finish and count. Reported:
requests/s, tokens/s (completion tokens as each answer's usage reports them), p50 and p99
latency, and failures (there should be none). The callers run in this process, on the same
cores as the server: at 64 callers the client's own CPU time is part of what is measured.
Writes benchmarks/results/load_bench.json and .png; the last line printed is
``load: single_grpc_tps_32=X single_http_tps_32=X cluster_grpc_tps_32=X cluster_http_tps_32=X``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from grpc_bench import PROMPTS, tiny_tree  # noqa: E402 (the same tree)

RESULTS = REPO / "benchmarks" / "results"
# Every caller is one tenant: its share of the batch must not be what limits the batch.
_ONE_TENANT = ("--tenant-max-running", str(64))
WIRES = ("grpc", "http", "grpc-stream")
BATCH = 32


def prepare(workdir: Path, deployments: list[str]) -> dict:
    from cluster.tree_import import import_tree
    from registry.access import issue_token
    from registry.db import init_registry, open_registry

    base_dir, tree_dir = tiny_tree(workdir)
    # Every request generates exactly --tokens tokens: the random model's end-of-text is biased away.
    eos = json.loads((Path(base_dir) / "config.json").read_text())["eos_token_id"]
    url = f"sqlite:///{workdir / 'registry.db'}"
    init_registry(url)
    with open_registry(url) as reg:
        import_tree(reg, tree_dir)
        token = issue_token(reg, "acme").token
    from tests.nodes.treefactory import DEFAULT_NODES

    nodes = [f"bench/{n.path}" for n in DEFAULT_NODES if n.visibility == "public"] + ["bench"]
    paths = {"tree_dir": str(tree_dir), "db": url, "token": token, "nodes": nodes, "eos": int(eos)}
    if "cluster" in deployments:
        from tests.cluster.ray.cluster_harness import cluster_yaml, free_port_block

        base = free_port_block()
        temp = Path(tempfile.mkdtemp(prefix="tl-load-ray-"))
        config = cluster_yaml(
            workdir / "cluster.yaml",
            base=base,
            registry_url=url,
            temp_dir=temp,
            ingress={"tenant_limits": {"max_running": 2 * BATCH}},  # one tenant may fill the batch
            trees={
                tree_dir: {
                    "replicas": 1,
                    "max_ongoing_requests": 2 * BATCH,  # the engine's batch, and as many waiting in it
                    "max_adapters": 16,
                    "engine": {"max_batch": BATCH},
                    "resources": {"cpus": 0.5},
                },
            },
        )
        paths |= {
            "config": str(config),
            "temp": str(temp),
            "state": str(workdir / "state"),
            "cluster_grpc": f"127.0.0.1:{base + 20}",
            "cluster_http": f"http://127.0.0.1:{base + 22}/v1",
        }
    return paths


def start_single(paths: dict) -> tuple[subprocess.Popen, str, str]:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    args = ["serve", paths["tree_dir"], "--db", paths["db"], "--port", "0", "--http-port", "0", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args, "--max-batch", str(BATCH), *_ONE_TENANT, "--grace", "5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    text = ""
    for line in proc.stdout:
        text += line
        found = re.search(r"serving \S+ on (\S+:\d+)[^;]*?OpenAI API at\s*(http://[0-9.:]+/v1)", " ".join(text.split()))
        if found:
            return proc, found.group(1), found.group(2)
    raise RuntimeError("treelm serve did not start")


def cli(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"treelm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


class Wires:
    """One gRPC AsyncClient and one AsyncOpenAI client for a deployment, on one event loop."""

    def __init__(self, target: str, base_url: str, token: str, eos: int):
        import openai

        from treelm import AsyncClient

        self.grpc = AsyncClient(target, token=token, timeout=300)
        self.http = openai.AsyncOpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=300)
        self.eos = eos

    async def call(self, wire: str, node: str, prompt: str, tokens: int) -> int:
        """Completion tokens of one greedy request."""
        if wire == "grpc":
            result = await self.grpc.generate(node, prompt, max_new_tokens=tokens, logit_bias={self.eos: -100.0})
            return result.usage.completion_tokens
        if wire == "grpc-stream":
            count = 0
            async for chunk in self.grpc.stream(node, prompt, max_new_tokens=tokens, logit_bias={self.eos: -100.0}):
                count += len(chunk.token_ids)
            return count
        answer = await self.http.completions.create(
            model=node, prompt=prompt, max_tokens=tokens, temperature=0, logit_bias={str(self.eos): -100}
        )
        return answer.usage.completion_tokens if answer.usage else 0

    async def close(self) -> None:
        await self.grpc.close()
        await self.http.close()


async def level(wires: Wires, wire: str, nodes: list[str], callers: int, seconds: float, tokens: int) -> dict:
    """``callers`` closed-loop callers for ``seconds``."""
    latencies: list[float] = []
    counted = [0, 0]  # tokens, failures
    end = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < end:
            node, prompt = nodes[i % len(nodes)], PROMPTS[i % len(PROMPTS)]
            i += callers
            started = time.perf_counter()
            try:
                got = await wires.call(wire, node, prompt, tokens)  # not `+= await`: that reads before awaiting
                counted[0] += got
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # a failed call is counted, never retried
                counted[1] += 1
                print(f"  {wire} c{callers}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "callers": callers,
        "requests": len(ordered),
        "failed": counted[1],
        "wall_s": wall,
        "requests_per_s": len(ordered) / wall,
        "tokens_per_s": counted[0] / wall,
        "p50_ms": 1000 * statistics.median(ordered) if ordered else float("nan"),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] if ordered else float("nan"),
    }


async def measure(target: str, base_url: str, paths: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    wires = Wires(target, base_url, paths["token"], paths["eos"])
    try:
        for wire in args.wires:  # warm: adapters loaded, channels and connections open
            await level(wires, wire, paths["nodes"], 4, 2.0, args.tokens)
        out: dict[str, list[dict]] = {wire: [] for wire in args.wires}
        for callers in args.levels:
            for wire in args.wires:  # the wires alternate at each level: load from elsewhere hits both alike
                row = await level(wires, wire, paths["nodes"], callers, args.seconds, args.tokens)
                out[wire].append(row)
                print(
                    f"  {wire:<4} c{callers:<3} {row['tokens_per_s']:8.1f} tok/s  p50 {row['p50_ms']:7.1f} ms  "
                    f"p99 {row['p99_ms']:7.1f} ms  failed {row['failed']}",
                    flush=True,
                )
        return out
    finally:
        await wires.close()


def print_table(table: dict) -> None:
    print(
        f"{'deployment':<10} {'wire':<5} {'callers':>7} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}"
    )
    for deployment, wires in table.items():
        for wire, rows in wires.items():
            for r in rows:
                print(
                    f"{deployment:<10} {wire:<5} {r['callers']:>7} {r['requests_per_s']:>7.1f} {r['tokens_per_s']:>8.1f} "
                    f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['failed']:>6}"
                )


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"grpc": "-", "http": "--", "grpc-stream": ":"}
    colors = {"single": "#39c", "cluster": "#c63"}
    for deployment, wires in table.items():
        for wire, rows in wires.items():
            xs = [r["callers"] for r in rows]
            label = f"{deployment} {wire}"
            style = dict(color=colors.get(deployment), linestyle=styles[wire], marker="o")
            left.plot(xs, [r["tokens_per_s"] for r in rows], label=label, **style)
            right.plot(xs, [r["p50_ms"] for r in rows], label=f"{label} p50", **style)
            right.plot(xs, [r["p99_ms"] for r in rows], label=f"{label} p99", alpha=0.45, **style)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("tokens/s")
    right.set_ylabel("latency (ms, log scale)")
    right.set_yscale("log")
    left.legend(fontsize=8)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("TreeLM load test: gRPC and HTTP, one process and the Ray cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="per deployment, wire and level")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--deployments", default="single,cluster", help="single, cluster or both")
    parser.add_argument("--wires", type=lambda s: s.split(","), default=list(WIRES), help=",".join(WIRES))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    deployments = [d for d in args.deployments.split(",") if d]
    if set(deployments) - {"single", "cluster"} or not deployments:
        parser.error("--deployments takes single, cluster or both")
    if set(args.wires) - set(WIRES) or not args.wires:
        parser.error(f"--wires takes some of {', '.join(WIRES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="load-bench-"))
    started = time.time()
    table: dict[str, dict[str, list[dict]]] = {}
    try:
        paths = prepare(workdir, deployments)
        if "single" in deployments:
            print("single process (treelm serve --http-port) ...", flush=True)
            server, target, base_url = start_single(paths)
            try:
                table["single"] = asyncio.run(measure(target, base_url, paths, args))
            finally:
                server.terminate()
                server.wait(60)
        if "cluster" in deployments:
            print("starting the Ray cluster (treelm cluster up) ...", flush=True)
            cli("cluster", "up", paths["config"], "--state-dir", paths["state"])
            try:
                table["cluster"] = asyncio.run(measure(paths["cluster_grpc"], paths["cluster_http"], paths, args))
            finally:
                cli("cluster", "down", "--state-dir", paths["state"])
                shutil.rmtree(paths["temp"], ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(table)
    record = {
        "benchmark": "load_bench",
        "settings": {k: v for k, v in vars(args).items() if k != "workdir"} | {"batch": BATCH, "threads": 1},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": time.time() - started,
        "table": table,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load_bench.json").write_text(json.dumps(record, indent=2))
    plot(table, RESULTS / "load_bench.png")
    print(f"wrote {RESULTS / 'load_bench.json'} and .png")

    def at(deployment: str, wire: str, callers: int) -> float:
        rows = [r for r in table.get(deployment, {}).get(wire, []) if r["callers"] == callers]
        return rows[0]["tokens_per_s"] if rows else float("nan")

    print("load: " + " ".join(f"{d}_{w}_tps_32={at(d, w, 32):.1f}" for d in ("single", "cluster") for w in WIRES))


if __name__ == "__main__":
    main()
