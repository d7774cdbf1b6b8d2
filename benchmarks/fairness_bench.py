"""Benchmark: one tenant floods `treelm serve` with 200 streams; another tenant's latency and refusals.

    .venv/bin/python benchmarks/fairness_bench.py                          # about a minute on 2 cores
    .venv/bin/python benchmarks/fairness_bench.py --deployment cluster     # the same against a Ray cluster

One `treelm serve` process (the tiny Llama tree of grpc_bench.py, one torch thread, auth on,
``--max-queue 32`` as in issue 21's measurement, every tenant limit at its default unless given
with ``--server-arg``). Tenant B (``acme``) sends a steady trickle: ``--requests`` greedy
requests of ``--tokens`` new tokens, one after another, through ``treelm.AsyncClient``.

  unloaded   B alone
  flood      the same while tenant A (``globex``) keeps ``--streams`` streams of ``--flood-tokens``
             new tokens open, each sent again as soon as it ends, or when refused after the
             server's retry hint (``--ignore-hint``: after 50 ms, a flooder that ignores it); A's
             client runs in a process of its own, as across a network, so B's client loop does
             not also run A's streams; ``--cpus split`` (the default) gives it cores of its own,
             ``--cpus shared`` lets it share the server's (benchmarks/placement.py)

Reported: B's p50 and p90 latency in each phase and their ratio (the goal: p50 within 2x), B's
p50 time in the engine's queue (what fair admission decides) and in the engine in all (queue,
prefill and decoding in a batch that the flood makes wider; the rest of B's latency is the
server's event loop, gRPC and auth, which the flood's own traffic slows), how many calls of each
tenant were refused (RESOURCE_EXHAUSTED, with the kind the server gave), and how many flood
streams completed. Writes benchmarks/results/fairness_bench.json and .png; the
last line printed is ``fairness: p50_ratio=X.XX b_refused=N a_refused=M``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from grpc_bench import PROMPTS, prepare  # noqa: E402 (the same tree, registry and token)
from placement import Placement  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NODE = "bench/en/medical"
PHASES = ("unloaded", "flood")


def start_server(paths: dict, extra: list[str], place: Placement) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    args = ["serve", paths["tree_dir"], "--db", paths["db"], "--port", "0", "--threads", "1", "--max-queue", "32"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args, *extra, "--grace", "5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=place.preexec(place.server),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"serving \S+ on (\S+:\d+)", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError("treelm serve did not start")


def start_cluster(paths: dict, workdir: Path, place: Placement) -> tuple[Callable[[], None], str]:
    """``treelm cluster up`` on this machine (``--deployment cluster``): the ingress and one trunk
    replica, every setting at its default (the engine's batch 16 and queue 256; the replica takes
    as many calls at once); returns a stopper and the ingress's gRPC target."""
    from tests.cluster.ray.cluster_harness import cluster_yaml, free_port_block

    base = free_port_block()
    temp = Path(tempfile.mkdtemp(prefix="tl-fair-ray-"))
    config = cluster_yaml(
        workdir / "cluster.yaml",
        base=base,
        registry_url=paths["db"],
        temp_dir=temp,
        trees={paths["tree_dir"]: {"replicas": 1}},
    )
    state = workdir / "state"

    def cli(*argv: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "cluster.cli", *argv],
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=600,
            preexec_fn=place.preexec(place.server),  # Ray's processes inherit the server's cores
        )

    cli("cluster", "up", str(config), "--state-dir", str(state))

    def stop() -> None:
        cli("cluster", "down", "--state-dir", str(state))
        shutil.rmtree(temp, ignore_errors=True)

    return stop, f"127.0.0.1:{base + 20}"


def flood_token(paths: dict) -> str:
    from registry.access import create_tenant, issue_token
    from registry.db import open_registry

    with open_registry(paths["db"]) as reg:
        create_tenant(reg, "globex")
        return issue_token(reg, "globex").token


async def trickle(client, count: int, tokens: int) -> tuple[list[float], list[float], list[float], collections.Counter]:
    """B's calls one after another: end-to-end latencies, engine queue times (the part fairness
    decides), time in the engine (queue + prefill + decode), refusals."""
    import treelm

    latencies, queued, refused = [], [], collections.Counter()
    engine: list[float] = []
    for i in range(count):
        started = time.perf_counter()
        try:
            result = await client.generate(NODE, PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens)
            latencies.append(time.perf_counter() - started)
            queued.append(result.timings.queue_s)
            engine.append(result.timings.total_s)
        except treelm.Overloaded as exc:
            refused[exc.kind or "queue-full"] += 1
        await asyncio.sleep(0.02)  # a steady trickle, not a second flood
    return latencies, queued, engine, refused


async def _flood(target: str, token: str, args: argparse.Namespace) -> None:
    """Tenant A (run in its own process by ``--flood-child``): ``--streams`` streams, each sent again
    as soon as it ends; prints one JSON line of what it got when SIGTERM ends it."""
    import treelm

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    refused: collections.Counter = collections.Counter()
    completed = 0
    async with treelm.AsyncClient(target, token=token, retries=treelm.RetryPolicy(retries=0), timeout=300) as a:

        async def stream(worker: int) -> None:
            nonlocal completed
            while not stop.is_set():
                try:
                    async for _ in a.stream(NODE, f"flood {worker}", max_new_tokens=args.flood_tokens):
                        pass
                    completed += 1
                except treelm.Overloaded as exc:
                    refused[exc.kind or "queue-full"] += 1
                    # As the SDK's retries do: wait what the server asks (--ignore-hint: 50 ms).
                    await asyncio.sleep(0.05 if args.ignore_hint else exc.retry_after or 1.0)
                except treelm.TreeLMError:
                    if not stop.is_set():
                        raise

        workers = [asyncio.create_task(stream(w)) for w in range(args.streams)]
        print("flooding", flush=True)
        await stop.wait()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    print(json.dumps({"completed": completed, "refused": dict(refused)}), flush=True)


def start_flood(target: str, token: str, args: argparse.Namespace, place: Placement) -> subprocess.Popen:
    """Tenant A in a process of its own: its client's CPU is its own, as across a network (it
    still shares this machine's cores), and B's client loop does not run A's 200 streams."""
    argv = [sys.executable, __file__, "--flood-child", target, token, "--streams", str(args.streams)]
    argv += ["--flood-tokens", str(args.flood_tokens)] + (["--ignore-hint"] if args.ignore_hint else [])
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, preexec_fn=place.preexec(place.attacker))
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "flooding":
        raise RuntimeError("the flood process did not start")
    return proc


async def measure(target: str, tokens: dict[str, str], args: argparse.Namespace, place: Placement) -> dict:
    import treelm

    no_retry = treelm.RetryPolicy(retries=0)
    out: dict = {}
    async with treelm.AsyncClient(target, token=tokens["b"], retries=no_retry, timeout=300) as b:
        await trickle(b, 8, args.tokens)  # warm: adapters loaded, channel open
        latencies, queued, engine, refused = await trickle(b, args.requests, args.tokens)
        out["unloaded"] = {"latencies": latencies, "queued": queued, "engine": engine, "b_refused": dict(refused)}

        flood = start_flood(target, tokens["a"], args, place)
        try:
            await asyncio.sleep(3.0)  # the flood is on: the batch and the flooder's queue are full
            latencies, queued, engine, refused = await trickle(b, args.requests, args.tokens)
        finally:
            flood.send_signal(signal.SIGTERM)
            report = json.loads(flood.communicate(timeout=120)[0].strip().splitlines()[-1])
        out["flood"] = {
            "latencies": latencies,
            "queued": queued,
            "engine": engine,
            "b_refused": dict(refused),
            "a_refused": report["refused"],
            "a_completed": report["completed"],
        }
    return out


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.35
    xs = range(len(PHASES))
    ax.bar([x - width / 2 for x in xs], [table[p]["p50_ms"] for p in PHASES], width, label="p50", color="#39c")
    ax.bar([x + width / 2 for x in xs], [table[p]["p90_ms"] for p in PHASES], width, label="p90", color="#6bd")
    ax.set_xticks(list(xs), [f"{p}\n(B refused {table[p]['b_refused']})" for p in PHASES])
    ax.set_ylabel("tenant B latency (ms)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.suptitle("treelm serve: tenant B while tenant A floods with 200 streams")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4, help="new tokens per request of tenant B")
    parser.add_argument("--requests", type=int, default=60, help="tenant B's requests per phase")
    parser.add_argument("--streams", type=int, default=200, help="tenant A's concurrent streams")
    parser.add_argument("--flood-tokens", type=int, default=32, help="new tokens per flood stream")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `treelm serve` argument")
    parser.add_argument("--ignore-hint", action="store_true", help="the flooder retries after 50 ms, not retry-after")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "treelm-grpc-bench")
    parser.add_argument("--cpus", choices=("split", "shared"), default="split", help="see benchmarks/placement.py")
    parser.add_argument(
        "--deployment",
        choices=("single", "cluster"),
        default="single",
        help="treelm serve, or treelm cluster up (Ray: the ingress and one replica; --server-arg is ignored)",
    )
    parser.add_argument("--flood-child", nargs=2, metavar=("TARGET", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_child:
        asyncio.run(_flood(*args.flood_child, args))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.workdir)
    tokens = {"b": paths["token"], "a": flood_token(paths)}
    place = Placement(args.cpus)
    place.measured_here()
    if args.deployment == "cluster":
        stop, target = start_cluster(paths, args.workdir, place)
    else:
        server, target = start_server(paths, args.server_arg, place)

        def stop() -> None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)

    started = time.time()
    try:
        runs = asyncio.run(measure(target, tokens, args, place))
    finally:
        stop()

    def pct(values: list[float], q: float) -> float:
        return 1000 * statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")

    table = {
        p: {
            "p50_ms": 1000 * statistics.median(runs[p]["latencies"]),
            "p90_ms": pct(runs[p]["latencies"], 90),
            "queue_p50_ms": 1000 * statistics.median(runs[p]["queued"]),
            "engine_p50_ms": 1000 * statistics.median(runs[p]["engine"]),
            "b_refused": sum(runs[p]["b_refused"].values()),
            "b_served": len(runs[p]["latencies"]),
        }
        for p in PHASES
    }
    ratio = table["flood"]["p50_ms"] / table["unloaded"]["p50_ms"]
    a_refused = sum(runs["flood"]["a_refused"].values())
    print(
        f"{'phase':<10} {'B p50 ms':>9} {'B p90 ms':>9} {'B queue p50 ms':>15} {'B engine p50 ms':>16} "
        f"{'B served':>9} {'B refused':>10}"
    )
    for p in PHASES:
        t = table[p]
        print(
            f"{p:<10} {t['p50_ms']:>9.1f} {t['p90_ms']:>9.1f} {t['queue_p50_ms']:>15.1f} {t['engine_p50_ms']:>16.1f} "
            f"{t['b_served']:>9} {t['b_refused']:>10}"
        )
    print(f"deployment: {args.deployment}; CPUs: {place.describe()}")
    print(f"B p50 flood / unloaded: {ratio:.2f}x (goal: within 2x)")
    print(f"A: {runs['flood']['a_completed']} streams completed, refused {runs['flood']['a_refused']}")
    record = {
        "benchmark": "fairness_bench",
        "settings": vars(args)
        | {"workdir": str(args.workdir), "node": NODE, "max_queue": 32, "threads": 1, "deployment": args.deployment}
        | {"placement": place.describe()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": time.time() - started,
        "table": table,
        "p50_ratio": ratio,
        "a_refused": runs["flood"]["a_refused"],
        "a_completed": runs["flood"]["a_completed"],
        "latencies_s": {p: runs[p]["latencies"] for p in PHASES},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fairness_bench.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    plot(table, RESULTS / "fairness_bench.png")
    print(f"wrote {RESULTS / 'fairness_bench.json'} and .png")
    b_refused = sum(t["b_refused"] for t in table.values())
    print(f"fairness: p50_ratio={ratio:.2f} b_refused={b_refused} a_refused={a_refused}")


if __name__ == "__main__":
    main()
