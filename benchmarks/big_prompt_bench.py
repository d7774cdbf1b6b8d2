"""Benchmark: another tenant's latency while one tenant sends 3.9 MB prompts (issue 21's attack).

    .venv/bin/python benchmarks/big_prompt_bench.py                 # about a minute on 2 cores
    .venv/bin/python benchmarks/big_prompt_bench.py --server-repo ../other-checkout   # its server

One `treelm serve` process (the tiny Llama tree of grpc_bench.py, one torch thread, auth on, gRPC
and the OpenAI HTTP API). Tenant B (``acme``) sends ``--requests`` one-token greedy requests over
gRPC, one after another. Phases, measured in the same run:

  alone       B alone
  grpc-flood  the same while ``--flooders`` processes of tenant A (``globex``) each send
              Inference.Generate with a 3.9 MB prompt, again as soon as it is answered
  http-flood  the same with 3.9 MB POST /v1/completions bodies instead

Reported per phase: B's p50, p90 and max latency, their ratio to ``alone`` (issue 21's goal: within
2x), the server's CPU share and its CPU time per flood call beyond B's own (from /proc), and the
flood's answers (status code -> count) and calls per second. The flooders run in their own
processes so their CPU time is theirs, as on a network; ``--cpus split`` (the default) also puts
them on cores of their own, ``--cpus shared`` lets them share the server's (benchmarks/placement.py).
A flooder waits for each answer, as the issue's attack did; past ``--refusals-per-s`` refusals a
second the server answers it only after half a second (cluster/service/refusals.py). ``--server-repo`` runs the server (and nothing else) from another
checkout, for before/after figures on the same machine. Writes
benchmarks/results/big_prompt_bench.json and .png; the last line printed is
``big_prompt: grpc_p50_ratio=X.XX grpc_max_ratio=X.XX http_p50_ratio=X.XX http_max_ratio=X.XX``.
"""

from __future__ import annotations

import argparse
import collections
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

from grpc_bench import prepare  # noqa: E402 (the same tree, registry and token)
from placement import Placement, server_cpu_seconds  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NODE = "bench/en/medical"
PHASES = ("alone", "grpc-flood", "http-flood")
PROMPT_WORDS = 780_000  # "word " x 780,000 = 3.9 MB, as in issue 21

_GRPC_FLOOD = """
import sys, grpc
from protos.treelm.v1 import inference_pb2, inference_pb2_grpc
target, token, node, words = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = [("grpc.max_send_message_length", 8 << 20)]
with grpc.insecure_channel(target, options=options) as channel:
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.GenerateRequest(node=node, prompt="word " * words)
    while True:
        try:
            stub.Generate(request, metadata=[("authorization", "Bearer " + token)], timeout=60)
            print("OK", flush=True)
        except grpc.RpcError as exc:
            print(exc.code().name, flush=True)
"""

_HTTP_FLOOD = """
import http.client, json, sys
url, token, node, words = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
host, _, port = url.split("//", 1)[1].split("/", 1)[0].partition(":")
body = json.dumps({"model": node, "prompt": "word " * words, "max_tokens": 1}).encode()
headers = {"authorization": "Bearer " + token, "content-type": "application/json"}
while True:
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", "/v1/completions", body, headers)
        response = conn.getresponse()
        response.read()
        print(response.status, flush=True)
    except OSError as exc:
        print(type(exc).__name__, flush=True)
    finally:
        conn.close()
"""


def start_server(
    paths: dict, server_repo: Path, place: Placement, extra: list[str]
) -> tuple[subprocess.Popen, str, str]:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(server_repo)}
    args = ["serve", paths["tree_dir"], "--db", paths["db"], "--port", "0", "--http-port", "0", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args, *extra, "--grace", "5"],
        cwd=server_repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=place.preexec(place.server),
    )
    assert proc.stdout is not None
    text = ""
    for line in proc.stdout:
        text += line
        found = re.search(r"serving \S+ on (\S+:\d+)[^;]*?OpenAI API at\s*(http://[0-9.:]+)/v1", " ".join(text.split()))
        if found:
            return proc, found.group(1), found.group(2)
    raise RuntimeError("treelm serve did not start")


def flood_token(paths: dict) -> str:
    from registry.access import create_tenant, issue_token
    from registry.db import open_registry

    with open_registry(paths["db"]) as reg:
        create_tenant(reg, "globex")
        return issue_token(reg, "globex").token


def trickle(client, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        client.generate(NODE, "hello", max_new_tokens=1)
        out.append(time.perf_counter() - started)
        time.sleep(0.02)  # a steady trickle, not a second flood
    return out


def flooded(
    client, script: str, endpoint: str, token: str, args: argparse.Namespace, place: Placement, server: int
) -> dict:
    """B's latencies while ``--flooders`` processes run ``script``, and what the flood was answered."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    flooders = [
        subprocess.Popen(
            [sys.executable, "-c", script, endpoint, token, NODE, str(PROMPT_WORDS)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=place.preexec(place.attacker),
        )
        for _ in range(args.flooders)
    ]
    try:
        for proc in flooders:  # each has had one answer: the flood is on
            assert proc.stdout is not None
            proc.stdout.readline()
        started, cpu = time.perf_counter(), server_cpu_seconds(server)
        latencies = trickle(client, args.requests)
        seconds, cpu = time.perf_counter() - started, server_cpu_seconds(server) - cpu
    finally:
        for proc in flooders:
            proc.send_signal(signal.SIGTERM)
        answers: collections.Counter = collections.Counter()
        for proc in flooders:
            answers.update(proc.communicate(timeout=60)[0].split())
    calls = sum(answers.values())
    return {
        "latencies": latencies,
        "answers": dict(answers),
        "flood_calls_per_s": calls / seconds,
        "server_cpu_share": cpu / seconds,
        "calls": calls,
        "seconds": seconds,
    }


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.27
    xs = range(len(PHASES))
    for i, (key, color) in enumerate((("p50_ms", "#39c"), ("p90_ms", "#6bd"), ("max_ms", "#c63"))):
        ax.bar([x + (i - 1) * width for x in xs], [table[p][key] for p in PHASES], width, label=key[:-3], color=color)
    ax.set_xticks(list(xs), list(PHASES))
    ax.set_yscale("log")
    ax.set_ylabel("tenant B latency (ms, log scale)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.suptitle("treelm serve: tenant B while tenant A sends 3.9 MB prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    import treelm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="tenant B's requests per phase")
    parser.add_argument("--flooders", type=int, default=2, help="tenant A's processes, one call at a time each")
    parser.add_argument("--server-repo", type=Path, default=REPO, help="the checkout whose server is measured")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "treelm-grpc-bench")
    parser.add_argument("--out", default="big_prompt_bench", help="file name (without suffix) under results/")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `treelm serve` argument")
    parser.add_argument("--cpus", choices=("split", "shared"), default="split", help="see benchmarks/placement.py")
    args = parser.parse_args()
    place = Placement(args.cpus)
    place.measured_here()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.workdir)
    token_a = flood_token(paths)
    server, target, http_url = start_server(paths, args.server_repo.resolve(), place, args.server_arg)
    started = time.time()
    runs: dict = {}
    try:
        with treelm.Client(target, token=paths["token"], retries=0, timeout=120) as b:
            trickle(b, 10)  # warm: adapters loaded, channel open
            began, cpu = time.perf_counter(), server_cpu_seconds(server.pid)
            runs["alone"] = {"latencies": trickle(b, args.requests), "answers": {}, "flood_calls_per_s": 0.0}
            runs["alone"]["server_cpu_share"] = (server_cpu_seconds(server.pid) - cpu) / (time.perf_counter() - began)
            runs["grpc-flood"] = flooded(b, _GRPC_FLOOD, target, token_a, args, place, server.pid)
            runs["http-flood"] = flooded(b, _HTTP_FLOOD, http_url, token_a, args, place, server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    def pct(values: list[float], q: int) -> float:
        return 1000 * statistics.quantiles(values, n=100)[q - 1]

    table = {
        p: {
            "p50_ms": 1000 * statistics.median(runs[p]["latencies"]),
            "p90_ms": pct(runs[p]["latencies"], 90),
            "max_ms": 1000 * max(runs[p]["latencies"]),
            "flood_answers": runs[p]["answers"],
            "flood_calls_per_s": runs[p]["flood_calls_per_s"],
            "server_cpu_share": runs[p]["server_cpu_share"],
            # The server's CPU time beyond what B's own calls took alone, per flood call.
            "server_cpu_ms_per_flood_call": (
                1000
                * max(0.0, runs[p]["server_cpu_share"] - runs["alone"]["server_cpu_share"])
                * runs[p].get("seconds", 0.0)
                / max(runs[p].get("calls", 0), 1)
            ),
        }
        for p in PHASES
    }
    for p in PHASES:
        table[p]["p50_ratio"] = table[p]["p50_ms"] / table["alone"]["p50_ms"]
        table[p]["max_ratio"] = table[p]["max_ms"] / table["alone"]["max_ms"]
    print(f"CPUs: {place.describe()}")
    head = f"{'phase':<11} {'B p50 ms':>9} {'B p90 ms':>9} {'B max ms':>9} {'p50 x':>6} {'max x':>6}"
    print(f"{head} {'server CPU':>10} {'ms/call':>8}  flood answers")
    for p in PHASES:
        t = table[p]
        rate = f" ({t['flood_calls_per_s']:.1f}/s)" if t["flood_answers"] else ""
        print(
            f"{p:<11} {t['p50_ms']:>9.1f} {t['p90_ms']:>9.1f} {t['max_ms']:>9.1f} {t['p50_ratio']:>6.2f} "
            f"{t['max_ratio']:>6.2f} {t['server_cpu_share']:>10.0%} {t['server_cpu_ms_per_flood_call']:>8.2f}"
            f"  {t['flood_answers'] or '-'}{rate}"
        )
    record = {
        "benchmark": "big_prompt_bench",
        "settings": vars(args)
        | {"workdir": str(args.workdir), "server_repo": str(args.server_repo), "node": NODE}
        | {"placement": place.describe()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": time.time() - started,
        "prompt_bytes": len("word " * PROMPT_WORDS),
        "table": table,
        "latencies_s": {p: runs[p]["latencies"] for p in PHASES},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    plot(table, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / (args.out + '.json')} and .png")
    g, h = table["grpc-flood"], table["http-flood"]
    print(
        f"big_prompt: grpc_p50_ratio={g['p50_ratio']:.2f} grpc_max_ratio={g['max_ratio']:.2f} "
        f"http_p50_ratio={h['p50_ratio']:.2f} http_max_ratio={h['max_ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
