"""Tables, JSON summary and plot for benchmarks/engine_bench.py (kept apart to keep both files short)."""

from __future__ import annotations

import statistics
from pathlib import Path

from engine_bench import CONCURRENCY, CONTENDERS, LABELS

__all__ = ["plot", "print_memory", "print_tables", "summarise"]


def summarise(model: str, runs: dict) -> dict:
    summary = {}
    for leaves, by in runs.items():
        ref = by["treelm"]["outputs"]
        entry = {"requests": len(ref)}
        for clock, key in (("wall", "tokens_per_s"), ("cpu", "tokens_per_cpu_s")):
            tps = {c: by[c][key] for c in CONTENDERS}
            entry[clock] = {
                "tokens_per_s": tps,
                "d_over_a": tps["treelm"] / tps["peft_per_request"],
                "d_over_b": tps["treelm"] / tps["peft_grouped"],
                "d_over_c": tps["treelm"] / tps["peft_mixed_flat"],
                "d_over_e": tps["treelm"] / tps["base"],
                "d_over_e_hf": tps["treelm"] / tps["base_hf"],
            }
        entry["same_tokens_as"] = {
            c: sum(a == b for a, b in zip(ref, by[c]["outputs"], strict=False))
            for c in ("peft_per_request", "peft_mixed_flat")
        }
        summary[leaves] = entry
    return summary


def print_tables(model: str, runs: dict, summary: dict, settings: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    table = Table(
        title=f"engine_bench [{model}]: {settings['tokens']} new tokens/request, {CONCURRENCY} in flight, "
        "greedy fp32, 1 thread; tok/s = fastest wall-clock run, tok/cpu-s = fastest CPU-time run"
    )
    for col in ("leaves", "contender", "tok/s", "tok/cpu-s", "p50 s", "p95 s", "peak RSS MiB", "runs"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for leaves, by in runs.items():
        for c in CONTENDERS:
            r = by[c]
            table.add_row(
                leaves,
                f"({LABELS[c]}) {c}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_cpu_s']:.1f}",
                f"{r['p50_s']:.2f}",
                f"{r['p95_s']:.2f}",
                f"{r['peak_rss_bytes'] / 2**20:.0f}",
                str(len(r["samples"])),
            )
        table.add_section()
    console.print(table)
    ratios = Table(title=f"TreeLM engine (d) against the others [{model}] (wall-clock tok/s; CPU time in brackets)")
    for col in (
        "leaves",
        "d/a per-request",
        "d/b grouped",
        "d/c mixed-flat",
        "d/e base",
        "d/e' base_hf",
        "same tokens d=a, d=c",
    ):
        ratios.add_column(col, justify="right")
    for leaves, s in summary.items():
        w, c, same = s["wall"], s["cpu"], s["same_tokens_as"]
        cells = [f"{w[k]:.2f} [{c[k]:.2f}]" for k in ("d_over_a", "d_over_b", "d_over_c", "d_over_e", "d_over_e_hf")]
        n = s["requests"]
        ratios.add_row(leaves, *cells, f"{same['peft_per_request']}/{n}, {same['peft_mixed_flat']}/{n}")
    console.print(ratios)


def print_memory(model: str, memory: dict) -> None:
    from rich.console import Console

    mib, first = 2**20, memory["samples"][0]
    low, high = memory["ratio_range"]
    after = statistics.median(r["ratio_after_serving"] for r in memory["samples"])
    Console(width=150).print(
        f"[{model}] memory, {first['adapters_resident']} adapters resident ({memory['leaves']} leaves + ancestors), "
        f"adapter files {first['adapter_file_bytes'] / mib:.1f} MiB, tensors {first['adapter_tensor_bytes'] / mib:.1f} MiB: "
        f"RSS {first['rss_base_bytes'] / mib:.1f} MiB (base, warm) -> base + {memory['ratio_median']:.2f}x adapter bytes "
        f"(median of {len(memory['samples'])} processes, range {low:.2f}-{high:.2f}; target <= 1.2); "
        f"after serving them: base + {after:.2f}x",
        highlight=False,
    )


def plot(model: str, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(k) for k in summary]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in CONTENDERS:
        ax.plot(xs, [summary[str(x)]["wall"]["tokens_per_s"][c] for x in xs], marker="o", label=f"({LABELS[c]}) {c}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("distinct leaf nodes in the workload (chains of depth 3)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"TreeLM engine vs PEFT [{model}], {CONCURRENCY} requests in flight, 1 thread")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
