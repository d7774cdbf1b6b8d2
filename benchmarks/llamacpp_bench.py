"""TreeLM against llama.cpp's llama-server on the same tree, the same threads and the same prompts.

    make llama-server                                         # once per machine (~10 min on 2 cores)
    .venv/bin/python benchmarks/llamacpp_bench.py [--tree examples/demo/build] [--threads 2]

The demo tree is exported once to GGUF (llamacpp_setup.py): the base as F32 and Q8_0, every
chain element as a LoRA GGUF file. llama-server loads the base with *every* node's LoRA files
(``--lora F ... --lora-init-without-apply``) and each request names its node's chain in its
``lora`` list (scale 1.0 each: the sum of the chain's deltas is the node's effective weight,
as TreeLM serves it). TreeLM serves the same tree with ``treelm serve --http-port``. One
server runs at a time, each with ``--threads`` threads (llama-server: ``--threads`` and
``--threads-batch``), batch/slots 32, prompt caches off on both.

Every request: a prompt of ``--prompt-words`` words from its node's eval text (all distinct),
greedy, exactly ``--tokens`` new tokens (llama-server ``ignore_eos``; TreeLM a -100 bias on
the end-of-sequence ids), tokens counted from each answer (``usage`` / ``tokens_predicted``).
Cases, each as that many closed-loop callers sending ``--rounds`` requests each:

  one stream        1 caller, the deepest node (chain of 3)
  one node x16      16 callers, the deepest node
  mixed x16 / x32   16 / 32 callers over all nodes in turn

Reported: tokens/s per case and server, and TreeLM / llama.cpp at the same precision (TreeLM
fp32 against F32; TreeLM ``--treelm-precision`` (default int8: ``treelm serve --precision
int8``) against Q8_0). Greedy agreement at F32 is measured on
one prompt per node (texts equal, and leading tokens equal), not asserted.
Writes benchmarks/results/llamacpp.json and .png. Skips (exit 0) with a message where
llama-server or the built tree is absent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llamacpp_setup import (  # noqa: E402
    Export,
    export_tree,
    find_llama_server,
    start_llama,
    start_treelm,
    stop,
)

RESULTS = REPO / "benchmarks" / "results"
SLOTS = 32
# (case, callers, one node?) -- the goals: TreeLM / llama.cpp at the same precision.
CASES = [("one stream", 1, True), ("one node x16", 16, True), ("mixed x16", 16, False), ("mixed x32", 32, False)]
GOALS = {"one stream": 1.0, "one node x16": 1.2, "mixed x16": 5.0, "mixed x32": 5.0}
Call = Callable[[str, str], Awaitable[tuple[int, str]]]  # (node, prompt) -> (completion tokens, text)


def prompts_for(tree_dir: Path, nodes: list[str], words: int, count: int) -> dict[str, list[str]]:
    """``count`` distinct prompts per node: consecutive ``words``-word windows of its eval text."""
    from nodes.store.versions import open_served_tree

    tree = open_served_tree(tree_dir)
    spec = REPO / "examples" / "demo"
    out: dict[str, list[str]] = {}
    for node in nodes:
        built = tree.node(node)
        text = (spec / "data" / str(built.path) / "eval.txt").read_text().split()
        step = max(1, min(words, (len(text) - words) // count))
        out[node] = [" ".join(text[i * step : i * step + words]) for i in range(count)]
    return out


class Servers:
    """One HTTP client; a TreeLM call and a llama-server call with the same meaning."""

    def __init__(self, tokens: int, export: Export):
        import aiohttp
        from transformers import AutoTokenizer

        from nodes.store.versions import open_served_tree

        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2 * SLOTS), timeout=aiohttp.ClientTimeout(total=1800)
        )
        self.tokens = tokens
        self.export = export
        self.tokenizer = AutoTokenizer.from_pretrained(open_served_tree(ARGS.tree).base_dir)

    def treelm(self, base_url: str, token: str) -> Call:
        bias = {str(e): -100 for e in self.export.eos}

        async def call(node: str, prompt: str) -> tuple[int, str]:
            body = {"model": node, "prompt": prompt, "max_tokens": self.tokens, "temperature": 0, "logit_bias": bias}
            headers = {"Authorization": f"Bearer {token}"}
            async with self.http.post(base_url + "/completions", json=body, headers=headers) as answer:
                answer.raise_for_status()
                data = await answer.json()
            return int(data["usage"]["completion_tokens"]), data["choices"][0]["text"]

        return call

    def llama(self, url: str) -> Call:
        async def call(node: str, prompt: str) -> tuple[int, str]:
            body = {
                "prompt": list(self.tokenizer(prompt).input_ids),  # the ids TreeLM's engine encodes
                "n_predict": self.tokens,
                "temperature": 0,
                "ignore_eos": True,
                "cache_prompt": False,
                "lora": [{"id": i, "scale": 1.0} for i in self.export.chains[node]],
            }
            async with self.http.post(url + "/completion", json=body) as answer:
                answer.raise_for_status()
                data = await answer.json()
            return int(data["tokens_predicted"]), data["content"]

        return call


async def run_case(call: Call, callers: int, work: list[list[tuple[str, str]]]) -> dict:
    """``callers`` closed-loop callers; caller k sends ``work[k]`` one after another."""
    latencies: list[float] = []
    tokens = [0]

    async def caller(jobs: list[tuple[str, str]]) -> None:
        for node, prompt in jobs:
            started = time.perf_counter()
            got, _ = await call(node, prompt)
            tokens[0] += got
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(jobs) for jobs in work))
    wall = time.perf_counter() - started
    return {
        "callers": callers,
        "requests": len(latencies),
        "tokens": tokens[0],
        "wall_s": round(wall, 3),
        "tokens_per_s": tokens[0] / wall,
        "p50_ms": 1000 * statistics.median(latencies),
    }


def workloads(prompts: dict[str, list[str]], deep: str, rounds: int) -> dict[str, list[list[tuple[str, str]]]]:
    """Per case, per caller: its (node, prompt) requests; every request's prompt is a different one."""
    nodes = sorted(prompts)
    out = {}
    for case, callers, one in CASES:
        per = rounds * (4 if callers == 1 else 1)  # one stream: more requests for a steadier figure
        work = []
        for k in range(callers):
            jobs = []
            for r in range(per):
                i = k + r * callers
                node = deep if one else nodes[i % len(nodes)]
                jobs.append((node, prompts[node][i % len(prompts[node])]))
            work.append(jobs)
        out[case] = work
    return out


async def measure(call: Call, label: str, prompts: dict[str, list[str]], deep: str) -> dict[str, dict]:
    for node in sorted(prompts):  # warm: adapters loaded, connections open
        await call(node, prompts[node][-1])
    rows = {}
    for case, work in workloads(prompts, deep, ARGS.rounds).items():
        row = await run_case(call, len(work), work)
        rows[case] = row
        print(f"  {label:<14} {case:<13} {row['tokens_per_s']:7.1f} tok/s  p50 {row['p50_ms']:7.0f} ms", flush=True)
    return rows


async def texts(call: Call, prompts: dict[str, list[str]]) -> dict[str, str]:
    return {node: (await call(node, ps[0]))[1] for node, ps in sorted(prompts.items())}


def agreement(tokenizer, ours: dict[str, str], theirs: dict[str, str]) -> dict:
    """Texts equal, and mean leading tokens equal (both texts re-tokenized)."""
    same, leading = 0, []
    for node in ours:
        a, b = tokenizer(ours[node]).input_ids, tokenizer(theirs[node]).input_ids
        same += ours[node] == theirs[node]
        leading.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))))
    return {"prompts": len(ours), "texts_equal": same, "mean_leading_tokens_equal": statistics.mean(leading)}


async def run_all(export: Export, binary: Path, prompts: dict[str, list[str]], deep: str, work: Path) -> dict:
    servers = Servers(ARGS.tokens, export)
    table: dict[str, dict[str, dict]] = {}
    outputs: dict[str, dict[str, str]] = {}
    runs: list[tuple[str, list[str]]] = [("treelm fp32", [])]
    if ARGS.treelm_precision != "fp32":
        runs.append((f"treelm {ARGS.treelm_precision}", ["--precision", ARGS.treelm_precision]))
    try:
        for label, extra in runs:
            proc, base_url, token = start_treelm(ARGS.tree, work, threads=ARGS.threads, batch=SLOTS, extra=extra)
            try:
                call = servers.treelm(base_url, token)
                table[label] = await measure(call, label, prompts, deep)
                if label == "treelm fp32":
                    outputs[label] = await texts(call, prompts)
            finally:
                stop(proc)
        for kind in ("F32", "Q8_0"):
            label = f"llama.cpp {kind}"
            log = work / f"llama-server-{kind}.log"
            proc, url = start_llama(
                binary, export, kind, threads=ARGS.threads, slots=SLOTS, ctx_per_slot=ARGS.ctx_per_slot, log=log
            )
            try:
                call = servers.llama(url)
                table[label] = await measure(call, label, prompts, deep)
                if kind == "F32":
                    outputs[label] = await texts(call, prompts)
            finally:
                stop(proc)
    finally:
        await servers.http.close()
    agree = agreement(servers.tokenizer, outputs["treelm fp32"], outputs["llama.cpp F32"])
    return {"table": table, "agreement": agree, "texts": outputs}


def comparisons(table: dict[str, dict[str, dict]]) -> list[tuple[str, str, str]]:
    """(label, TreeLM run, llama.cpp run) pairs at the same precision, then the labelled fallback."""
    pairs = [("fp32 vs F32", "treelm fp32", "llama.cpp F32")]
    low = next((k for k in table if k.startswith("treelm ") and k != "treelm fp32"), "treelm fp32")
    pairs.append((f"{low[7:]} vs Q8_0", low, "llama.cpp Q8_0"))
    return pairs


def print_table(table: dict[str, dict[str, dict]]) -> list[dict]:
    runs = list(table)
    print(f"{'case':<14}" + "".join(f"{r:>16}" for r in runs) + "   (tokens/s)")
    for case, _, _ in CASES:
        print(f"{case:<14}" + "".join(f"{table[r][case]['tokens_per_s']:>16.1f}" for r in runs))
    ratios = []
    for label, ours, theirs in comparisons(table):
        print(f"\nTreeLM / llama.cpp, {label}")
        for case, _, _ in CASES:
            ratio = table[ours][case]["tokens_per_s"] / table[theirs][case]["tokens_per_s"]
            goal = GOALS[case]
            met = "met" if ratio >= goal else "not met"
            print(f"  {case:<14} {ratio:6.2f}x   goal >= {goal:.1f}x: {met}")
            ratios.append({"comparison": label, "case": case, "ratio": ratio, "goal": goal, "met": ratio >= goal})
    return ratios


def plot(table: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    runs = list(table)
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(CASES))]
        bars = ax.bar(xs, [table[run][c]["tokens_per_s"] for c, _, _ in CASES], width, label=run)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(CASES)), [c for c, _, _ in CASES])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"TreeLM vs llama-server on the demo tree ({ARGS.threads} threads, {ARGS.tokens} greedy tokens)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ARGS = argparse.Namespace()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=REPO / "examples" / "demo" / "build")
    parser.add_argument("--threads", type=int, default=2, help="for both servers")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per caller (one stream: 4x)")
    parser.add_argument("--prompt-words", type=int, default=10)
    parser.add_argument("--ctx-per-slot", type=int, default=256)
    parser.add_argument(
        "--treelm-precision",
        default="int8",
        choices=("int8", "bf16", "fp32"),
        help="TreeLM's precision against Q8_0 (fp32: none)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.parse_args(namespace=ARGS)
    binary = find_llama_server()
    if binary is None:
        print("skipped: llama-server not found; build it with `make llama-server` (or set $LLAMA_SERVER)")
        return 0
    if not (ARGS.tree / "tree.json").is_file():
        print(
            f"skipped: no built tree at {ARGS.tree}; build it with `make demo` (or `treelm tree build "
            f"examples/demo/tree.yaml --out {ARGS.tree}`) and run this again"
        )
        return 0
    started = time.time()
    export = export_tree(ARGS.tree)
    nodes = sorted(export.chains)
    deep = max(nodes, key=lambda n: (len(export.chains[n]), n))
    per_node = max(32, 4 * ARGS.rounds) * 2
    prompts = prompts_for(ARGS.tree, nodes, ARGS.prompt_words, per_node)
    with tempfile.TemporaryDirectory(prefix="llamacpp-bench-") as scratch:
        result = asyncio.run(run_all(export, binary, prompts, deep, Path(scratch)))
    print()
    ratios = print_table(result["table"])
    agree = result["agreement"]
    print(
        f"\ngreedy agreement at F32 (one prompt per node): texts equal {agree['texts_equal']}/{agree['prompts']}, "
        f"mean leading tokens equal {agree['mean_leading_tokens_equal']:.1f}/{ARGS.tokens}"
    )
    record = {
        "benchmark": "llamacpp_bench",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(ARGS).items()}
        | {"slots": SLOTS, "llama_server": str(binary), "deep_node": deep, "nodes": nodes},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": round(time.time() - started, 1),
        "table": result["table"],
        "ratios": ratios,
        "agreement": agree,
        "texts": result["texts"],
    }
    ARGS.out.mkdir(parents=True, exist_ok=True)
    (ARGS.out / "llamacpp.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(result["table"], ARGS.out / "llamacpp.png")
    print(f"wrote {ARGS.out / 'llamacpp.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
