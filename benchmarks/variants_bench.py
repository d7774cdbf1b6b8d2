"""Correctness of every variant of every node of the demo tree, measured against the engine in the same run.

For each node and variant: the variant is built through the tree's variant cache (or found
there), loaded the way a device loads it (stock transformers / peft, and stock llama.cpp through
llama-cpp-python for GGUF files), and compared with TreeLM itself:

* greedy tokens (16 by default) for prompts taken from the node's own eval text, against the
  engine's answers for the same node and prompt ids (the baseline, measured in this run):
  ``exact`` = prompts whose tokens are all identical, ``prefix`` = mean leading tokens equal;
* perplexity on the node's eval text (windows of 64 predictions, as the tree builder measures),
  as a ratio to the float32 merged model's (which computes what the engine computes);
* for GGUF in llama.cpp, whether llama.cpp tokenizes the prompts to the same ids.

    python benchmarks/variants_bench.py [--tree examples/demo/build] [--nodes en,en/medical] [--kinds merged,flat]

Build the demo tree first (`make demo`, or `treelm tree build examples/demo/tree.yaml --out examples/demo/build`).
Writes benchmarks/results/variants_bench.{json,png}; the last line printed summarises exactness.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from nodes.build.training import tokenize_text  # noqa: E402
from nodes.build.variants import KINDS, VariantStore  # noqa: E402
from nodes.build.variants.check import (  # noqa: E402
    agreement,
    engine_answers,
    llama_available,
    llama_runner,
    stock_runner,
)
from nodes.store.versions import open_served_tree  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# (kind, runtime): how a device runs each variant. transformers loads the Q8_0 GGUF too (de-quantized).
PLAN = [
    ("merged", "transformers"),
    ("merged-fp16", "transformers"),
    ("merged-bf16", "transformers"),
    ("flat", "peft"),
    ("merged-int8", "transformers"),
    ("merged-int8", "llama.cpp"),
    ("gguf-f16", "llama.cpp"),
    ("gguf-q4_0", "llama.cpp"),
    ("gguf-lora", "llama.cpp"),
]


def prompts_of(text: str, count: int, words: int = 8) -> list[str]:
    """The first ``words`` words of the first ``count`` documents of an eval text."""
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    return [" ".join(d.split()[:words]) for d in docs[:count]]


def eval_stream(tree, node, tokenizer, limit: int) -> list[int]:
    spec_dir = REPO / "examples" / "demo"
    file = spec_dir / node.data["eval"]["file"]
    return tokenize_text(tokenizer, file.read_text())[:limit].tolist()


def measure(runner, answers, stream, window) -> dict:
    exact, prefixes, same = 0, [], []
    for ids, tokens in answers:
        got = runner.greedy(ids, len(tokens) if tokens else 16)
        prefix, share = agreement(tokens, got)
        exact += got == tokens
        prefixes.append(prefix)
        same.append(share)
    started = time.perf_counter()
    ppl = runner.perplexity(stream, window)
    return {
        "exact": exact,
        "prompts": len(answers),
        "prefix": sum(prefixes) / len(prefixes),
        "positions_equal": sum(same) / len(same),
        "ppl": ppl,
        "ppl_seconds": time.perf_counter() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=str(REPO / "examples" / "demo" / "build"))
    parser.add_argument("--nodes", default="", help="comma-separated node paths (default: every node)")
    parser.add_argument("--kinds", default="", help="comma-separated variant kinds (default: all)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new", type=int, default=16, help="greedy tokens compared per prompt")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=1024, help="eval text tokens for perplexity")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if not (Path(args.tree) / "tree.json").is_file():
        # `make bench` on a fresh machine: the demo tree takes ~10 minutes to build, which `make demo` does.
        print(
            f"skipped: no built tree at {args.tree}; build it with `make demo` (or `treelm tree build "
            "examples/demo/tree.yaml --out examples/demo/build`) and run this again"
        )
        return 0
    tree = open_served_tree(args.tree)
    store = VariantStore(args.tree)
    nodes = [n for n in tree.nodes if not args.nodes or str(n.path) in args.nodes.split(",")]
    kinds = set(args.kinds.split(",")) if args.kinds else set(KINDS)
    plan = [(k, rt) for k, rt in PLAN if k in kinds and (rt != "llama.cpp" or llama_available())]
    if not llama_available():
        print("llama-cpp-python is not installed: llama.cpp rows are skipped (`make llama`)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tree.base_dir)
    prompts = {
        str(n.node_id): prompts_of((REPO / "examples" / "demo" / n.data["eval"]["file"]).read_text(), args.prompts)
        for n in nodes
    }
    started = time.perf_counter()
    pairs = [(node, p) for node, ps in prompts.items() for p in ps]
    flat_answers = engine_answers(args.tree, pairs, args.new)
    engine_seconds = time.perf_counter() - started
    answers: dict[str, list] = {}
    for (node, _), answer in zip(pairs, flat_answers, strict=True):
        answers.setdefault(node, []).append(answer)
    rows = []
    for node in nodes:
        node_id = str(node.node_id)
        stream = eval_stream(tree, node, tokenizer, args.eval_tokens)
        reference_ppl = None
        for kind, runtime in plan:
            t0 = time.perf_counter()
            artifact = store.build(node_id, kind)
            build_s = time.perf_counter() - t0
            base = store.requirement(artifact)
            runner = llama_runner(artifact, base) if runtime == "llama.cpp" else stock_runner(artifact, base)
            row = {
                "node": node_id,
                "version": artifact.manifest.version,
                "variant": kind,
                "runtime": runtime,
                "bytes": artifact.manifest.size + (base.manifest.size if base else 0),
                "build_seconds": round(build_s, 2),
                "built_now": artifact.built,
            }
            row |= measure(runner, answers[node_id], stream, args.window)
            if runtime == "llama.cpp":
                row["tokenizer_same"] = all(
                    runner._model.tokenize(p.encode(), add_bos=False, special=True) == ids
                    for p, (ids, _) in zip(prompts[node_id], answers[node_id], strict=True)
                )
            if kind == "merged" and runtime == "transformers":
                reference_ppl = row["ppl"]
            row["ppl_ratio"] = row["ppl"] / reference_ppl if reference_ppl else None
            rows.append(row)
            print(
                f"{node_id:32s} {kind:12s} {runtime:12s} exact {row['exact']}/{row['prompts']} "
                f"prefix {row['prefix']:.1f} ppl {row['ppl']:.3f}",
                flush=True,
            )
            del runner
            gc.collect()
    report(rows, args, engine_seconds)
    return 0


def report(rows: list[dict], args, engine_seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"variants vs the engine on {args.tree} ({args.new} greedy tokens, ppl window {args.window})")
    for col in ("node", "variant", "runtime", "MB", "exact", "prefix", "ppl", "ppl / fp32", "tokenizer"):
        table.add_column(col, justify="left" if col in ("node", "variant", "runtime") else "right")
    for r in rows:
        table.add_row(
            r["node"],
            r["variant"],
            r["runtime"],
            f"{r['bytes'] / 1e6:.0f}",
            f"{r['exact']}/{r['prompts']}",
            f"{r['prefix']:.1f}/{args.new}",
            f"{r['ppl']:.3f}",
            "-" if r["ppl_ratio"] is None else f"{r['ppl_ratio']:.4f}",
            {True: "same", False: "differs"}.get(r.get("tokenizer_same"), "-"),
        )
    Console(width=160).print(table)
    summary = {}
    for r in rows:
        s = summary.setdefault((r["variant"], r["runtime"]), {"exact": 0, "prompts": 0, "prefix": [], "ratio": []})
        s["exact"] += r["exact"]
        s["prompts"] += r["prompts"]
        s["prefix"].append(r["prefix"])
        if r["ppl_ratio"] is not None:
            s["ratio"].append(r["ppl_ratio"])
    totals = [
        {
            "variant": v,
            "runtime": rt,
            "exact": s["exact"],
            "prompts": s["prompts"],
            "prefix": sum(s["prefix"]) / len(s["prefix"]),
            "ppl_ratio": sum(s["ratio"]) / len(s["ratio"]),
        }
        for (v, rt), s in summary.items()
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"args": vars(args), "engine_seconds": engine_seconds, "rows": rows, "summary": totals}
    (RESULTS / "variants_bench.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(totals, args.new)
    exact_fp32 = [t for t in totals if t["variant"] in ("merged", "flat")]
    text = ", ".join(f"{t['variant']} {t['exact']}/{t['prompts']}" for t in exact_fp32)
    print(f"exact greedy matches with the engine: {text}")


def plot(totals: list[dict], new_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [f"{t['variant']} ({t['runtime']})" for t in totals]
    xs = list(range(len(totals)))
    left.bar(xs, [t["prefix"] for t in totals], color="tab:blue")
    left.set_xticks(xs, labels, rotation=35, ha="right", fontsize=8)
    left.set_ylim(0, new_tokens)
    left.set_ylabel(f"leading greedy tokens equal to the engine's (of {new_tokens})")
    left.set_title("greedy agreement with TreeLM, mean over nodes and prompts")
    right.bar(xs, [t["ppl_ratio"] for t in totals], color="tab:orange")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_ylim(0.9, max(1.1, max(t["ppl_ratio"] for t in totals) * 1.05))
    right.set_xticks(xs, labels, rotation=35, ha="right", fontsize=8)
    right.set_ylabel("eval perplexity / float32 merged (same run)")
    right.set_title("perplexity on each node's eval text")
    fig.tight_layout()
    fig.savefig(RESULTS / "variants_bench.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
