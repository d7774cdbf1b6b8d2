"""Benchmark: the Ray cluster's gRPC ingress against the single-process server, at 1 and 2 replicas.

    .venv/bin/python benchmarks/cluster_bench.py           # about three minutes on 2 cores

Same tiny tree (a ~20M-parameter tiny Llama, chains up to depth 3), same SDK, same
requests (greedy, eos of the random model honoured as it comes) on both:

  single   `treelm serve` (one process: gRPC server + engine, one torch thread, --max-batch 8)
  ray-1    `treelm cluster up` on this machine (explicit ports): the gRPC ingress deployment, one trunk
           replica (one engine, one torch thread, max_ongoing_requests 8 = its batch)
  ray-2    the same after `treelm cluster scale bench --replicas 2`

Concurrency 1 (latency): 60 short requests (4 new tokens), each sent to ``single`` and
to ``ray-1`` in turn (order alternating), so every Ray latency has a single-process twin
measured moments apart; the added latency is the median of the paired differences.
Concurrency 16 (throughput): 64 requests of 32 new tokens over 8 nodes, ``--repeats``
runs per contender, each Ray run next to a single-process run; tokens/s is the median run.
Every contender must produce exactly the same tokens. The machine may be shared with
other work: the single-process runs measured beside each phase are in the JSON.
Writes benchmarks/results/cluster_bench.json and .png; the last line printed is
``cluster: added_p50_ms=X.X two_vs_one=Y.YY`` (targets: <= 10 ms, >= 1.0).
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
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

RESULTS = REPO / "benchmarks" / "results"
PROMPTS = (
    "The patient was admitted with chest pain and shortness of breath.",
    "The radiologist reviewed the scan of the patient",
    "The contract was signed by both parties on the first day",
    "Domain models and sub-domain models sit below the language models,",
)
NODES = (
    "bench",
    "bench/en",
    "bench/en/medical",
    "bench/en/medical/radiology",
    "bench/en/medical/cardiology",
    "bench/en/legal",
    "bench/fr",
    "bench/fr/medical",
)
CONTENDERS = ("single", "ray-1", "ray-2")


def cli(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"treelm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def prepare(workdir: Path) -> dict:
    from grpc_bench import tiny_tree

    from cluster.tree_import import import_tree
    from registry.access import issue_token
    from registry.db import init_registry, open_registry
    from tests.cluster.ray.cluster_harness import cluster_yaml, free_port_block

    _, tree_dir = tiny_tree(workdir)
    url = f"sqlite:///{workdir / 'registry.db'}"
    init_registry(url)
    with open_registry(url) as reg:
        import_tree(reg, tree_dir)
        token = issue_token(reg, "acme").token
    base = free_port_block()
    temp = Path(tempfile.mkdtemp(prefix="tl-bench-ray-"))
    config = cluster_yaml(
        workdir / "cluster.yaml",
        base=base,
        registry_url=url,
        temp_dir=temp,
        trees={
            tree_dir: {
                "replicas": 1,
                "max_ongoing_requests": 8,
                "max_adapters": 16,
                "engine": {"max_batch": 8},
                "resources": {"cpus": 0.5},
            },
        },
    )
    return {
        "tree_dir": str(tree_dir),
        "db": url,
        "token": token,
        "config": str(config),
        "temp": str(temp),
        "target": f"127.0.0.1:{base + 20}",
        "state": str(workdir / "state"),
    }


def start_single(paths: dict) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            paths["tree_dir"],
            "--db",
            paths["db"],
            "--port",
            "0",
            "--threads",
            "1",
            "--grace",
            "2",
            "--max-batch",
            "8",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        found = re.search(r"serving \S+ on (\S+:\d+)", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError("treelm serve did not start")


class Caller:
    """One AsyncClient per target, kept open across runs on one event loop."""

    def __init__(self, targets: dict[str, str], token: str):
        from treelm import AsyncClient

        self.runner = asyncio.Runner()

        async def make():
            return {name: AsyncClient(t, token=token, timeout=300) for name, t in targets.items()}

        self.clients = self.runner.run(make())

    async def _one(self, name: str, r: dict) -> tuple[float, list[int]]:
        t = time.perf_counter()
        result = await self.clients[name].generate(r["node"], r["prompt"], max_new_tokens=r["max_new_tokens"])
        return time.perf_counter() - t, list(result.token_ids)

    def paired(self, requests: list[dict], names: tuple[str, str]) -> dict:
        """Concurrency 1: each request on both targets, order alternating."""
        out = {n: {"latencies": [], "outputs": {}} for n in names}

        async def go():
            for i, r in enumerate(requests):
                for name in names if i % 2 == 0 else names[::-1]:
                    latency, ids = await self._one(name, r)
                    out[name]["latencies"].append(latency)
                    out[name]["outputs"][r["key"]] = ids

        self.runner.run(go())
        return out

    def pool(self, name: str, requests: list[dict], concurrency: int) -> dict:
        async def go():
            queue: asyncio.Queue = asyncio.Queue()
            for r in requests:
                queue.put_nowait(r)
            latencies, outputs = [], {}

            async def caller():
                while not queue.empty():
                    r = queue.get_nowait()
                    latency, ids = await self._one(name, r)
                    latencies.append(latency)
                    outputs[r["key"]] = ids

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            wall = time.perf_counter() - started
            lat = sorted(latencies)
            tokens = sum(len(v) for v in outputs.values())
            return {
                "requests": len(lat),
                "p50_ms": 1000 * statistics.median(lat),
                "p95_ms": 1000 * lat[round(0.95 * (len(lat) - 1))],
                "tokens": tokens,
                "wall_s": wall,
                "tokens_per_s": tokens / wall,
                "outputs": outputs,
            }

        return self.runner.run(go())

    def close(self) -> None:
        async def close_all():
            for client in self.clients.values():
                await client.close()

        self.runner.run(close_all())
        self.runner.close()


def requests(count: int, tokens: int, tag: str) -> list[dict]:
    return [
        {
            "node": NODES[i % len(NODES)],
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_new_tokens": tokens,
            "key": f"{tag}-{i}",
        }
        for i in range(count)
    ]


def median_run(runs: list[dict]) -> dict:
    middle = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
    return {k: middle[k] for k in ("requests", "p50_ms", "p95_ms", "tokens_per_s")}


def check_same_tokens(reference: dict, runs: list[dict], what: str) -> None:
    for run in runs:
        for key, ids in run["outputs"].items():
            if ids != reference[key]:
                raise AssertionError(f"{what}: request {key} got other tokens than the single-process server")


def print_table(table: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title="SDK -> Ray ingress -> Serve replicas vs SDK -> single-process server (same tree and load)")
    for col in ("load", "contender", "requests", "p50 ms", "p95 ms", "tok/s", "vs single", "added p50 ms"):
        out.add_column(col, justify="right")
    for load in ("c1", "c16"):
        for name, r in table[load].items():
            added = f"{r['added_ms']:+.1f}" if "added_ms" in r else ""
            vs = f"{r['vs_single']:.2f}" if "vs_single" in r else ""
            out.add_row(
                load,
                name,
                str(r["requests"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
                f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "",
                vs,
                added,
            )
    Console(width=120).print(out)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    c1 = table["c1"]
    axes[0].bar(list(c1), [c1[n]["p50_ms"] for n in c1], color=["tab:gray", "tab:blue"])
    axes[0].set_ylabel("p50 latency, concurrency 1 (ms)")
    c16 = table["c16"]
    axes[1].bar(list(c16), [c16[n]["tokens_per_s"] for n in c16], color=["tab:gray", "tab:blue", "tab:green"])
    axes[1].set_ylabel("generated tokens / s, concurrency 16")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Ray cluster ingress vs single-process server (2 shared cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    try:
        run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> None:
    paths = prepare(workdir)
    single, single_target = start_single(paths)
    up = False
    try:
        print("starting the Ray cluster (treelm cluster up) ...", flush=True)
        cli("cluster", "up", paths["config"], "--state-dir", paths["state"])
        up = True
        caller = Caller({"single": single_target, "ray": paths["target"]}, paths["token"])
        warm = requests(len(NODES), 2, "warm")
        caller.paired(warm, ("single", "ray"))
        c1 = caller.paired(requests(60, 4, "c1"), ("single", "ray"))
        print("concurrency 1: 60 paired requests done", flush=True)
        load = requests(64, 32, "c16")
        phases: dict[str, dict[str, list]] = {}
        for phase in ("ray-1", "ray-2"):
            if phase == "ray-2":
                cli("cluster", "scale", "bench", "--replicas", "2", "--state-dir", paths["state"])
                caller.pool("ray", requests(16, 2, "warm2"), 16)
            runs = {"single": [], "ray": []}
            for rep in range(args.repeats):
                for name in ("single", "ray") if rep % 2 == 0 else ("ray", "single"):
                    runs[name].append(caller.pool(name, load, 16))
            phases[phase] = runs
            print(f"concurrency 16, {phase}: {args.repeats} runs done", flush=True)
        caller.close()
    finally:
        if up:
            cli("cluster", "down", "--state-dir", paths["state"])
        single.terminate()
        single.wait(60)
        shutil.rmtree(paths["temp"], ignore_errors=True)

    check_same_tokens(c1["single"]["outputs"], [c1["ray"]], "ray-1 @ c1")
    ref16 = phases["ray-1"]["single"][0]["outputs"]
    for phase, runs in phases.items():
        check_same_tokens(ref16, runs["ray"] + runs["single"], f"{phase} @ c16")

    diffs = [1000 * (r - s) for r, s in zip(c1["ray"]["latencies"], c1["single"]["latencies"], strict=False)]
    added = statistics.median(diffs)

    def lat_summary(lat: list[float]) -> dict:
        lat = sorted(lat)
        return {
            "requests": len(lat),
            "p50_ms": 1000 * statistics.median(lat),
            "p95_ms": 1000 * lat[round(0.95 * (len(lat) - 1))],
        }

    table = {
        "c1": {
            "single": lat_summary(c1["single"]["latencies"]),
            "ray-1": {**lat_summary(c1["ray"]["latencies"]), "added_ms": added},
        },
        "c16": {
            "single": median_run(phases["ray-1"]["single"] + phases["ray-2"]["single"]),
            "ray-1": median_run(phases["ray-1"]["ray"]),
            "ray-2": median_run(phases["ray-2"]["ray"]),
        },
    }
    for name in ("ray-1", "ray-2"):
        beside = median_run(phases[name]["single"])["tokens_per_s"]
        table["c16"][name]["vs_single"] = table["c16"][name]["tokens_per_s"] / beside
        table["c16"][name]["single_beside_tokens_per_s"] = beside
    two_vs_one = table["c16"]["ray-2"]["tokens_per_s"] / table["c16"]["ray-1"]["tokens_per_s"]
    print_table(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "a shared 2-core machine: other processes may have run during the measurement",
        },
        "setup": {
            "model": "tiny Llama hidden 256, 4 layers, vocab 32000",
            "nodes": list(NODES),
            "c1": "60 paired requests x 4 tokens",
            "c16": f"64 requests x 32 tokens, {args.repeats} runs",
        },
        "table": table,
        "added_p50_ms": added,
        "two_vs_one": two_vs_one,
        "two_vs_one_against_single_beside": table["c16"]["ray-2"]["vs_single"] / table["c16"]["ray-1"]["vs_single"],
        "paired_added_ms_p95": sorted(diffs)[round(0.95 * (len(diffs) - 1))],
    }
    (RESULTS / "cluster_bench.json").write_text(json.dumps(report, indent=2))
    plot(table, RESULTS / "cluster_bench.png")
    print(f"wrote {RESULTS / 'cluster_bench.json'} and .png (targets: added p50 <= 10 ms, two_vs_one >= 1.0)")
    print(f"cluster: added_p50_ms={added:.1f} two_vs_one={two_vs_one:.2f}")


if __name__ == "__main__":
    main()
