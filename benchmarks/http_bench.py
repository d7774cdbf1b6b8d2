"""Benchmark: the OpenAI-compatible HTTP API against gRPC, on one `treelm serve --http-port` process.

    .venv/bin/python benchmarks/http_bench.py            # about a minute on 2 cores

Same server, same engine, same requests (greedy, the tiny Llama tree of grpc_bench.py, one torch
thread); only the transport and its client differ:

  grpc         treelm.AsyncClient.generate (the baseline)
  http         the official openai client (AsyncOpenAI), POST /v1/completions
  http-stream  the same with stream=True, read to [DONE]

Concurrency 1: ``--requests`` short requests (``--tokens`` new tokens), each through every path
in turn (order rotated), so every HTTP latency has a gRPC twin measured moments apart; the added
latency is the median of the per-request differences. Concurrency 16: a pool of 16 callers over
64 requests (4x the tokens), interleaved runs, ``--repeats`` times; the ratio is the median of
the per-repeat tokens/s ratios (tokens as each path's usage reports them). Every path must
produce the same text and token counts. Writes benchmarks/results/http_bench.json
and .png; the last line printed is ``http: added_p50_ms=X.X throughput_ratio=Y.YY``.
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
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from grpc_bench import PROMPTS, prepare  # noqa: E402 (the same tree, registry and token)

RESULTS = REPO / "benchmarks" / "results"
MODES = ("grpc", "http", "http-stream")
CONCURRENCY = (1, 16)


def start_server(paths: dict) -> tuple[subprocess.Popen, str, str]:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    args = ["serve", paths["tree_dir"], "--db", paths["db"], "--port", "0", "--http-port", "0", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args, "--grace", "5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        found = re.search(r"serving \S+ on (\S+:\d+).*OpenAI API at (\S+/v1)", line)
        if found:
            return proc, found.group(1), found.group(2)
    raise RuntimeError("treelm serve did not start")


class Callers:
    """One gRPC AsyncClient and one AsyncOpenAI client, kept open across runs on one event loop."""

    def __init__(self, target: str, base_url: str, token: str):
        self.runner = asyncio.Runner()
        self.runner.run(self._open(target, base_url, token))

    async def _open(self, target: str, base_url: str, token: str) -> None:
        import openai

        from treelm import AsyncClient

        self.grpc = AsyncClient(target, token=token, timeout=300)
        self.http = openai.AsyncOpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=300)

    async def call(self, mode: str, r: dict) -> tuple[str, int]:
        """(text, completion tokens) of one request."""
        if mode == "grpc":
            result = await self.grpc.generate(r["node"], r["prompt"], max_new_tokens=r["tokens"])
            return result.text, result.usage.completion_tokens
        common = dict(model=r["node"], prompt=r["prompt"], max_tokens=r["tokens"], temperature=0)
        if mode == "http":
            answer = await self.http.completions.create(**common)
            return answer.choices[0].text, answer.usage.completion_tokens
        text, tokens = "", 0
        stream = await self.http.completions.create(**common, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        return text, tokens

    async def pool(self, mode: str, requests: list[dict], concurrency: int) -> dict:
        queue: asyncio.Queue = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        latencies, outputs = [], {}

        async def caller() -> None:
            while not queue.empty():
                r = queue.get_nowait()
                t = time.perf_counter()
                outputs[r["id"]] = await self.call(mode, r)
                latencies.append(time.perf_counter() - t)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        return {"latencies": latencies, "wall_s": wall, "outputs": outputs}

    def run(self, mode: str, requests: list[dict], concurrency: int) -> dict:
        return self.runner.run(self.pool(mode, requests, concurrency))

    def close(self) -> None:
        self.runner.run(self.grpc.close())
        self.runner.run(self.http.close())
        self.runner.close()


def requests_for(nodes: list[str], count: int, tokens: int, tag: str) -> list[dict]:
    return [
        {"id": f"{tag}-{i}", "node": nodes[i % len(nodes)], "prompt": PROMPTS[i % len(PROMPTS)], "tokens": tokens}
        for i in range(count)
    ]


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(MODES, [table["1"][m]["p50_ms"] for m in MODES], color=["#777", "#39c", "#6bd"])
    axes[0].set_ylabel("p50 latency, concurrency 1 (ms)")
    axes[1].bar(MODES, [table["16"][m]["tokens_per_s"] for m in MODES], color=["#777", "#39c", "#6bd"])
    axes[1].set_ylabel("generated tokens / s, concurrency 16")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("treelm serve: OpenAI HTTP API vs gRPC (same process, engine, requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=100, help="paired requests at concurrency 1")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs at concurrency 16")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "treelm-grpc-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.workdir)
    from tests.nodes.treefactory import DEFAULT_NODES

    nodes = [f"bench/{n.path}" for n in DEFAULT_NODES if n.visibility == "public"] + ["bench"]
    server, target, base_url = start_server(paths)
    callers = Callers(target, base_url, paths["token"])
    runs: dict = {"1": {m: [] for m in MODES}, "16": {m: [] for m in MODES}}
    started = time.time()
    try:
        for mode in MODES:  # every adapter loaded, both clients connected
            callers.run(mode, requests_for(nodes, 16, args.tokens, "warm"), 8)
        for i, request in enumerate(requests_for(nodes, args.requests, args.tokens, "c1")):
            for mode in MODES[i % 3 :] + MODES[: i % 3]:
                runs["1"][mode].append(callers.run(mode, [request], 1))
        for rep in range(args.repeats):
            requests = requests_for(nodes, 64, args.tokens * 4, f"c16-{rep}")
            for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                runs["16"][mode].append(callers.run(mode, requests, 16))
    finally:
        callers.close()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    for run in (r for by in runs.values() for rs in by.values() for r in rs):
        run["outputs"] = {k: tuple(v) for k, v in run["outputs"].items()}
    for c, by in runs.items():  # the transport must not change one character
        for i, base in enumerate(by["grpc"]):
            for mode in MODES[1:]:
                assert by[mode][i]["outputs"] == base["outputs"], f"{mode}@{c} differs from gRPC"
    pairs = runs["1"]
    added = {
        m: 1000
        * statistics.median(h["latencies"][0] - g["latencies"][0] for h, g in zip(pairs[m], pairs["grpc"], strict=True))
        for m in MODES[1:]
    }

    def tokens_per_s(run: dict) -> float:
        return sum(n for _, n in run["outputs"].values()) / run["wall_s"]

    ratios = {
        m: [tokens_per_s(h) / tokens_per_s(g) for h, g in zip(runs["16"][m], runs["16"]["grpc"], strict=True)]
        for m in MODES[1:]
    }
    table = {
        "1": {m: {"p50_ms": 1000 * statistics.median(r["latencies"][0] for r in pairs[m])} for m in MODES},
        "16": {m: {"tokens_per_s": statistics.median(tokens_per_s(r) for r in runs["16"][m])} for m in MODES},
    }
    print(f"{'mode':<12} {'p50 ms (c=1)':>13} {'added p50 ms':>13} {'tokens/s (c=16)':>16} {'vs grpc':>8}")
    for m in MODES:
        add = f"{added[m]:+.1f}" if m in added else ""
        ratio = f"{statistics.median(ratios[m]):.2f}" if m in ratios else "1.00"
        print(f"{m:<12} {table['1'][m]['p50_ms']:>13.1f} {add:>13} {table['16'][m]['tokens_per_s']:>16.0f} {ratio:>8}")
    record = {
        "benchmark": "http_bench",
        "settings": vars(args) | {"workdir": str(args.workdir), "nodes": nodes, "greedy": True, "threads": 1},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": time.time() - started,
        "table": table,
        "added_p50_ms_at_1": added,
        "throughput_ratios_at_16": ratios,
        "throughput_ratio_at_16": {m: statistics.median(v) for m, v in ratios.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_bench.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    plot(table, RESULTS / "http_bench.png")
    print(f"wrote {RESULTS / 'http_bench.json'} and .png")
    print(f"http: added_p50_ms={added['http']:.1f} throughput_ratio={statistics.median(ratios['http']):.2f}")


if __name__ == "__main__":
    main()
