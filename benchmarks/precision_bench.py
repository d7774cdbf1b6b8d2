"""Benchmark: serving precision on the demo tree: fp32 against bf16 and int8 weight-only.

    .venv/bin/python benchmarks/precision_bench.py                  # the demo tree (make demo builds it)
    .venv/bin/python benchmarks/precision_bench.py --tree DIR --texts SPEC_DIR --threads 2

For each precision (``treelm serve --precision``), one engine over the tree measures:

- each node's perplexity on its own eval text (the file its node.json names, read relative to
  ``--texts``, the tree spec's folder), scored through the engine (``echo``, the bank's mixed
  path), and its change against fp32;
- tokens/s: one stream; 16 and 32 concurrent requests spread over every node (greedy,
  ``--tokens`` new tokens each, end of sequence ignored), best of ``--repeats``;
- the model's weight bytes in memory, and how many greedy tokens match fp32's on the first prompts.

Every precision runs in the same process, one after another, with the same threads. Writes
benchmarks/results/precision.json and .png; prints the table. Skipped with a message when the
tree is absent.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = REPO / "benchmarks" / "results"
PRECISIONS = ("fp32", "bf16", "int8")
PROMPTS = (
    "The patient was admitted with chest pain and shortness of breath.",
    "The contract was signed by both parties on the first of May.",
    "El paciente fue ingresado con dolor en el pecho.",
    "The radiologist reviewed the scan and found",
)
WINDOW = 384  # tokens per scored prompt (an eval text is ~1,000 tokens)


def eval_prompts(engine, node, texts: Path) -> list[str]:
    """The node's eval text, cut at document bounds into prompts of at most WINDOW tokens."""
    from nodes.runtime.requests import GenerationRequest

    text = (texts / node.data["eval"]["file"]).read_text(encoding="utf-8")
    out, current = [], ""
    for doc in (d.strip() for d in text.split("\n\n")):
        candidate = f"{current}\n\n{doc}" if current else doc
        if current and len(engine.encode(GenerationRequest(node=str(node.node_id), prompt=candidate))) > WINDOW:
            out.append(current)
            candidate = doc
        current = candidate
    return [*out, current] if current else out


async def perplexity(engine, node: str, prompts: list[str]) -> float:
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    total, count = 0.0, 0
    for prompt in prompts:
        params = SamplingParams(max_new_tokens=0, echo=True, logprobs=True)
        result = await engine.generate(GenerationRequest(node=node, prompt=prompt, params=params))
        scored = [t.logprob for t in result.echo.logprobs if t.logprob is not None]
        total -= sum(scored)
        count += len(scored)
    return math.exp(total / count)


async def throughput(engine, nodes: list[str], concurrent: int, tokens: int, repeats: int) -> dict:
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    requests = [
        GenerationRequest(node=nodes[i % len(nodes)], prompt=PROMPTS[i % len(PROMPTS)], params=params)
        for i in range(concurrent)
    ]
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        results = await asyncio.gather(*(engine.generate(r) for r in requests))
        elapsed = time.perf_counter() - start
        made = sum(len(r.token_ids) for r in results)
        if best is None or made / elapsed > best["tokens_per_s"]:
            best = {"tokens_per_s": made / elapsed, "seconds": elapsed, "tokens": made}
    assert best is not None
    return best


async def greedy(engine, nodes: list[str]) -> list[list[int]]:
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    out = []
    for node, prompt in zip(nodes, PROMPTS * len(nodes), strict=False):
        out.append(list((await engine.generate(GenerationRequest(node=node, prompt=prompt, params=params))).token_ids))
    return out


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


async def measure(precision: str, tree, texts: Path, args) -> dict:
    from nodes.runtime.engine import Engine, EngineConfig

    engine = Engine(tree.base_dir, tree.root, EngineConfig(max_batch_size=32, precision=precision))
    try:
        nodes = [str(n.node_id) for n in tree.nodes]
        ppl = {}
        for node in tree.nodes:
            ppl[str(node.node_id)] = await perplexity(engine, str(node.node_id), eval_prompts(engine, node, texts))
        await throughput(engine, nodes, 4, 8, 1)  # warm-up: every adapter active, kernels ready
        speed = {str(c): await throughput(engine, nodes, c, args.tokens, args.repeats) for c in (1, *args.concurrency)}
        return {
            "precision": engine.precision,
            "weight_bytes": weight_bytes(engine.base.model),
            "perplexity": ppl,
            "speed": speed,
            "greedy": await greedy(engine, nodes[:4]),
        }
    finally:
        engine.close()
        del engine
        gc.collect()


def summarise(record: dict) -> None:
    ref = record["runs"]["fp32"]
    for run in record["runs"].values():
        changes = {n: run["perplexity"][n] / ref["perplexity"][n] - 1 for n in ref["perplexity"]}
        run["ppl_change"] = changes
        run["ppl_change_max"] = max(changes.values(), key=abs)
        run["ppl_change_mean"] = sum(changes.values()) / len(changes)
        run["speed_vs_fp32"] = {
            c: run["speed"][c]["tokens_per_s"] / ref["speed"][c]["tokens_per_s"] for c in ref["speed"]
        }
        same = sum(
            sum(a == b for a, b in zip(x, y, strict=False)) for x, y in zip(run["greedy"], ref["greedy"], strict=True)
        )
        run["greedy_agreement"] = same / sum(len(x) for x in ref["greedy"])


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    levels = list(record["runs"]["fp32"]["speed"])
    table = Table(
        title=f"Serving precision on {record['tree']} ({record['threads']} threads, {record['tokens']} new tokens)"
    )
    for column in ("precision", "weights", "ppl change (max |.|)", "ppl change (mean)", "greedy = fp32"):
        table.add_column(column, justify="right")
    for level in levels:
        table.add_column(f"tok/s @{level} (x fp32)", justify="right")
    for name, run in record["runs"].items():
        table.add_row(
            name,
            f"{run['weight_bytes'] / 2**20:.0f} MiB",
            f"{run['ppl_change_max']:+.2%}",
            f"{run['ppl_change_mean']:+.2%}",
            f"{run['greedy_agreement']:.0%}",
            *(f"{run['speed'][c]['tokens_per_s']:.1f} ({run['speed_vs_fp32'][c]:.2f}x)" for c in levels),
        )
    Console().print(table)
    nodes = Table(title="Perplexity on each node's eval text")
    nodes.add_column("node")
    for name in record["runs"]:
        nodes.add_column(name, justify="right")
    for node, value in record["runs"]["fp32"]["perplexity"].items():
        cells = [f"{value:.2f}"]
        cells += [
            f"{r['perplexity'][node]:.2f} ({r['ppl_change'][node]:+.2%})"
            for n, r in record["runs"].items()
            if n != "fp32"
        ]
        nodes.add_row(node, *cells)
    Console().print(nodes)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = record["runs"]
    levels = list(runs["fp32"]["speed"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(runs)
    for i, (name, run) in enumerate(runs.items()):
        xs = [j + i * width for j in range(len(levels))]
        left.bar(xs, [run["speed"][c]["tokens_per_s"] for c in levels], width, label=name)
    left.set_xticks([j + width for j in range(len(levels))], [f"{c} concurrent" for c in levels])
    left.set_ylabel("tokens/s")
    left.set_title("Throughput (same threads, same process)")
    left.legend()
    nodes = list(runs["fp32"]["perplexity"])
    for i, (name, run) in enumerate((n, r) for n, r in runs.items() if n != "fp32"):
        xs = [j + i * 0.4 for j in range(len(nodes))]
        right.bar(xs, [100 * run["ppl_change"][n] for n in nodes], 0.4, label=name)
    right.axhline(0.5, color="tab:blue", ls=":", lw=1, label="bf16 bound 0.5%")
    right.axhline(2.0, color="tab:orange", ls=":", lw=1, label="int8 bound 2%")
    right.axhline(-0.5, color="tab:blue", ls=":", lw=1)
    right.axhline(-2.0, color="tab:orange", ls=":", lw=1)
    right.set_xticks(
        [j + 0.2 for j in range(len(nodes))], [n.split("/", 1)[-1] for n in nodes], rotation=45, ha="right"
    )
    right.set_ylabel("perplexity change vs fp32 (%)")
    right.set_title("Each node on its own eval text")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO / "examples" / "demo" / "build")
    parser.add_argument("--texts", type=Path, default=REPO / "examples" / "demo", help="the tree spec's folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="16,32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not (args.tree / "tree.json").is_file():
        print(
            f"precision_bench: skipped, no built tree at {args.tree} (make demo, or treelm tree build examples/demo/tree.yaml --out {args.tree})"
        )
        return
    import torch

    from nodes.base.precision import bf16_supported
    from nodes.store.tree import open_tree

    torch.set_num_threads(args.threads)
    tree = open_tree(args.tree)
    record: dict = {
        "tree": tree.name,
        "machine": platform.processor() or platform.machine(),
        "bf16_supported": bf16_supported(),
        "threads": args.threads,
        "tokens": args.tokens,
        "runs": {},
    }
    # fp32 first: every other precision is compared with it.
    for precision in ["fp32", *(p for p in args.precisions.split(",") if p != "fp32")]:
        print(f"== {precision}", flush=True)
        record["runs"][precision] = asyncio.run(measure(precision, tree, args.texts, args))
    summarise(record)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    plot(record, RESULTS / "precision.png")
    print_table(record)
    line = " ".join(
        f"{n}: ppl {r['ppl_change_max']:+.2%} x{r['speed_vs_fp32']['1']:.2f}@1 x{r['speed_vs_fp32'][str(args.concurrency[-1])]:.2f}@{args.concurrency[-1]}"
        for n, r in record["runs"].items()
    )
    print(f"precision: {line}")
    print(f"wrote {RESULTS / 'precision.json'} and .png")


if __name__ == "__main__":
    main()
