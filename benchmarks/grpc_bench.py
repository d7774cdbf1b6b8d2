"""Benchmark: the gRPC path (SDK -> `treelm serve` -> engine) against the engine called in-process.

    .venv/bin/python benchmarks/grpc_bench.py            # about two minutes on 2 cores

Same requests on both paths: greedy, ``--tokens`` new tokens (eos ignored by the
tiny random model only by chance, so counts are what each run produced), over the
public nodes of a random tree (chains up to depth 3) on a ~20M-parameter tiny Llama.
One torch thread everywhere.

  inproc      a process that owns the Engine and awaits ``engine.generate`` (the baseline)
  grpc        this process, ``AsyncClient.generate`` against ``treelm serve`` (auth on, a real token)
  grpc-stream the same, ``AsyncClient.stream`` to the last chunk

Concurrency 1: 150 short requests (``--latency-tokens``, default 4: what gRPC adds
is per call, so little decoding keeps the engine's own jitter out of the figure);
each goes through every path in turn (order rotated), so every gRPC latency has an
in-process twin measured moments apart; the added latency is the median of the
per-request differences (robust to load from other processes). Concurrency 32: a pool of 32 callers over 128
requests, runs interleaved, ``--repeats`` times; the ratio is the median of the
per-repeat ratios. Every path must produce exactly the same tokens.
Writes benchmarks/results/grpc_bench.json and .png. The last line printed is
``grpc: added_p50_ms=X.X throughput_ratio=Y.YY``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

RESULTS = REPO / "benchmarks" / "results"
CONCURRENCY = (1, 32)
MODES = ("inproc", "grpc", "grpc-stream")
PROMPTS = (
    "The patient was admitted with chest pain and shortness of breath.",
    "The radiologist reviewed the scan of the patient",
    "The contract was signed by both parties on the first day",
    "Domain models and sub-domain models sit below the language models,",
)


def requests_for(nodes: list[str], concurrency: int, tokens: int) -> list[dict]:
    count = 150 if concurrency == 1 else 128
    return [
        {
            "node": nodes[i % len(nodes)],
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_new_tokens": tokens,
            "request_id": f"r{concurrency}-{i}",
        }
        for i in range(count)
    ]


def summarise(latencies: list[float], tokens: int, wall: float, outputs: dict) -> dict:
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "outputs": outputs,
    }


async def pool(requests: list[dict], concurrency: int, call) -> dict:
    """Run ``call(request) -> token ids`` over the requests with ``concurrency`` callers."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    latencies, outputs = [], {}

    async def caller():
        while not queue.empty():
            r = queue.get_nowait()
            t = time.perf_counter()
            outputs[r["request_id"]] = list(await call(r))
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return summarise(latencies, sum(len(v) for v in outputs.values()), wall, outputs)


# ----------------------------------------------------------------------------- in-process worker
def inproc_worker(spec: dict) -> None:
    """Stays up reading one JSON job per line on stdin; answers one JSON line per job."""
    import torch

    torch.set_num_threads(1)
    from nodes.runtime.engine import Engine, EngineConfig
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    engine = Engine(spec["base_dir"], spec["tree_dir"], EngineConfig(max_batch_size=32))

    async def call(r):
        request = GenerationRequest(
            node=r["node"],
            prompt=r["prompt"],
            request_id=r["request_id"],
            params=SamplingParams(max_new_tokens=r["max_new_tokens"]),
        )
        return (await engine.generate(request)).token_ids

    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(asyncio.run(pool(job["requests"], job["concurrency"], call))), flush=True)
    engine.close()


class InProc:
    def __init__(self, paths: dict):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--inproc", json.dumps(paths)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, requests: list[dict], concurrency: int) -> dict:
        self.proc.stdin.write(json.dumps({"requests": requests, "concurrency": concurrency}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


# ----------------------------------------------------------------------------- setup
def tiny_tree(workdir: Path) -> tuple[Path, Path]:
    """The benchmarks' tiny Llama base and random tree under ``workdir`` (made once, then reused)."""
    from nodes.base.model import TinyBaseConfig, make_tiny_base
    from tests.nodes.treefactory import RandomTreeSpec, make_random_tree

    base_dir, tree_dir = workdir / "base", workdir / "tree"
    if not (base_dir / "config.json").is_file():
        make_tiny_base(
            base_dir,
            TinyBaseConfig(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=1024, vocab=32000, max_position=512),
        )
    if not (tree_dir / "tree.json").is_file():
        make_random_tree(tree_dir, base_dir, RandomTreeSpec(name="bench", init_scale=0.05))
    return base_dir, tree_dir


def prepare(workdir: Path) -> dict:
    base_dir, tree_dir = tiny_tree(workdir)
    db = workdir / "registry.db"
    db.unlink(missing_ok=True)
    from cluster.tree_import import import_tree
    from registry.access import issue_token
    from registry.db import init_registry, open_registry

    url = f"sqlite:///{db}"
    init_registry(url)
    with open_registry(url) as reg:
        import_tree(reg, tree_dir)
        token = issue_token(reg, "acme").token  # the factory's private node belongs to acme
    return {"base_dir": str(base_dir), "tree_dir": str(tree_dir), "db": url, "token": token}


def start_server(paths: dict, feedback: bool = True) -> tuple[subprocess.Popen, str]:
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
            "5",
            "--feedback" if feedback else "--no-feedback",
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


class GrpcCaller:
    """One AsyncClient (one channel) kept open across runs, on one event loop."""

    def __init__(self, target: str, token: str):
        from treelm import AsyncClient

        self.runner = asyncio.Runner()
        self.client = self.runner.run(self._make(AsyncClient, target, token))

    @staticmethod
    async def _make(cls, target, token):
        return cls(target, token=token, timeout=300)

    async def unary(self, r):
        result = await self.client.generate(
            r["node"], r["prompt"], max_new_tokens=r["max_new_tokens"], request_id=r["request_id"]
        )
        return result.token_ids

    async def stream(self, r):
        ids = []
        async for chunk in self.client.stream(
            r["node"], r["prompt"], max_new_tokens=r["max_new_tokens"], request_id=r["request_id"]
        ):
            ids.extend(chunk.token_ids)
        return ids

    def run(self, requests: list[dict], concurrency: int, mode: str) -> dict:
        return self.runner.run(pool(requests, concurrency, self.stream if mode == "grpc-stream" else self.unary))

    def close(self) -> None:
        self.runner.run(self.client.close())
        self.runner.close()


# ----------------------------------------------------------------------------- report
def combine(results: list[dict]) -> dict:
    """Pool a contender's runs: latencies of every request, tokens/s over all of them."""
    lat = [r["p50_ms"] for r in results] if all(r["requests"] == 1 for r in results) else None
    if lat is None:  # concurrency 32: each run is a whole pool; report the median run
        middle = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]
        return {k: middle[k] for k in ("requests", "p50_ms", "p95_ms", "tokens_per_s")}
    lat.sort()
    total_tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(lat),
        "p50_ms": statistics.median(lat),
        "p95_ms": lat[round(0.95 * (len(lat) - 1))],
        "tokens_per_s": total_tokens / sum(r["wall_s"] for r in results),
    }


def check_same_tokens(runs: dict) -> None:
    """The gRPC path must not change a single token of any request."""
    for c, by in runs.items():
        reference: dict = {}
        for r in by["inproc"]:
            reference.update(r["outputs"])
        for mode in MODES:
            for r in by[mode]:
                for rid, ids in r["outputs"].items():
                    assert ids == reference[rid], f"{mode}@{c}: request {rid} got different tokens than in-process"


def print_table(table: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title="SDK -> gRPC -> engine vs engine in-process (c=1: paired requests; c=32: median run)")
    for col in ("conc.", "mode", "requests", "p50 ms", "p95 ms", "tok/s", "vs inproc", "added p50 ms"):
        out.add_column(col, justify="right")
    for c in CONCURRENCY:
        for mode in MODES:
            r = table[str(c)][mode]
            added = f"{r['added_ms']:+.1f}" if "added_ms" in r else ""
            out.add_row(
                str(c),
                mode,
                str(r["requests"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['vs_inproc']:.2f}",
                added,
            )
    Console(width=120).print(out)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.25
    for i, mode in enumerate(MODES):
        xs = [j + (i - 1) * width for j in range(len(CONCURRENCY))]
        axes[0].bar(xs, [table[str(c)][mode]["p50_ms"] for c in CONCURRENCY], width, label=mode)
        axes[1].bar(xs, [table[str(c)][mode]["tokens_per_s"] for c in CONCURRENCY], width, label=mode)
    for ax, ylabel in zip(axes, ("p50 latency (ms)", "generated tokens / s"), strict=False):
        ax.set_xticks(range(len(CONCURRENCY)), [f"concurrency {c}" for c in CONCURRENCY])
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SDK -> gRPC server -> engine vs engine in-process (tiny Llama, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per request at concurrency 32")
    parser.add_argument("--latency-tokens", type=int, default=4, help="new tokens per request at concurrency 1")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved runs at concurrency 32")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "treelm-grpc-bench")
    parser.add_argument(
        "--no-feedback",
        action="store_true",
        help="serve with --no-feedback (no response rows): run with and without to see what recording costs",
    )
    parser.add_argument("--inproc", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inproc:
        inproc_worker(json.loads(args.inproc))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.workdir)
    from tests.nodes.treefactory import DEFAULT_NODES

    nodes = [f"bench/{n.path}" for n in DEFAULT_NODES if n.visibility == "public"] + ["bench"]
    server, target = start_server(paths, feedback=not args.no_feedback)
    inproc = InProc(paths)
    runs: dict = {str(c): {m: [] for m in MODES} for c in CONCURRENCY}
    grpc = GrpcCaller(target, paths["token"])
    started = time.time()

    def run(mode: str, requests: list[dict], concurrency: int) -> dict:
        return inproc.run(requests, concurrency) if mode == "inproc" else grpc.run(requests, concurrency, mode)

    try:
        warm = requests_for(nodes, 32, args.tokens)[:16]  # load every adapter on both sides first
        for mode in MODES:
            run(mode, warm, 8)
        for i, request in enumerate(requests_for(nodes, 1, args.latency_tokens)):  # paired, order rotated
            order = MODES[i % 3 :] + MODES[: i % 3]
            for mode in order:
                runs["1"][mode].append(run(mode, [request], 1))
        print(f"concurrency 1: {len(runs['1']['inproc'])} paired requests done", flush=True)
        for rep in range(args.repeats):
            requests = requests_for(nodes, 32, args.tokens)
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                runs["32"][mode].append(run(mode, requests, 32))
            print(f"concurrency 32: repeat {rep + 1}/{args.repeats} done", flush=True)
    finally:
        grpc.close()
        inproc.close()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    check_same_tokens(runs)
    table = {str(c): {m: combine(runs[str(c)][m]) for m in MODES} for c in CONCURRENCY}
    pairs = runs["1"]
    added = statistics.median(g["p50_ms"] - i["p50_ms"] for g, i in zip(pairs["grpc"], pairs["inproc"], strict=False))
    added_stream = statistics.median(
        g["p50_ms"] - i["p50_ms"] for g, i in zip(pairs["grpc-stream"], pairs["inproc"], strict=False)
    )
    ratios = [
        g["tokens_per_s"] / i["tokens_per_s"] for g, i in zip(runs["32"]["grpc"], runs["32"]["inproc"], strict=False)
    ]
    ratios_stream = [
        g["tokens_per_s"] / i["tokens_per_s"]
        for g, i in zip(runs["32"]["grpc-stream"], runs["32"]["inproc"], strict=False)
    ]
    ratio = statistics.median(ratios)
    for c in table:
        for m in table[c]:
            table[c][m]["vs_inproc"] = table[c][m]["tokens_per_s"] / table[c]["inproc"]["tokens_per_s"]
    table["1"]["grpc"]["added_ms"], table["1"]["grpc-stream"]["added_ms"] = added, added_stream
    table["32"]["grpc"]["vs_inproc"], table["32"]["grpc-stream"]["vs_inproc"] = ratio, statistics.median(ratios_stream)
    print_table(table)
    for by in runs.values():
        for rs in by.values():
            for r in rs:
                r.pop("outputs", None)
    record = {
        "benchmark": "grpc_bench",
        "settings": {
            "tokens": args.tokens,
            "latency_tokens": args.latency_tokens,
            "repeats": args.repeats,
            "feedback": not args.no_feedback,
            "concurrency": list(CONCURRENCY),
            "nodes": nodes,
            "prompts": list(PROMPTS),
            "threads": 1,
            "greedy": True,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": time.time() - started,
        "runs": runs,
        "table": table,
        "added_p50_ms_at_1": added,
        "added_p50_ms_at_1_stream": added_stream,
        "throughput_ratios_at_32": ratios,
        "throughput_ratio_at_32": ratio,
        "targets": {"added_p50_ms": 5.0, "throughput_ratio": 0.9},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpc_bench.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    plot(table, RESULTS / "grpc_bench.png")
    print(f"wrote {RESULTS / 'grpc_bench.json'} and .png (targets: added p50 <= 5 ms, throughput >= 0.90x)")
    print(f"grpc: added_p50_ms={added:.1f} throughput_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
