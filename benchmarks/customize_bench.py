"""Benchmark: a fine-tuning job, from its submission to the new node's first token (issue 16).

    .venv/bin/python benchmarks/customize_bench.py [--tree examples/demo/build] [--repeats 1]

On the demo tree (SmolLM2-135M, built by `make demo` or `treelm tree build examples/demo/tree.yaml
--out examples/demo/build`), one `treelm serve --http-port` process with the demo's update policy
(``customize.key``: the service key signs the new nodes) and one torch thread for the engine and one
for the job's worker process. A second clinic (tenant northfield) uploads its notes
(examples/demo/northfield-notes.txt) with the official `openai` client, creates a job under
``demo/en/medical`` and, once it succeeded, streams its first answer from the new node. The time is
split into the phases the issue names:

  upload        POST /v1/files (the checks of cluster/jobs/data.py, the row in the registry)
  queue         job created -> claimed by the runner (the job's ``queue_s``)
  worker start  the worker process starts, loads the base and the parent's chain, tokenizes
                (``worker_s`` - ``train_s`` - ``gate_s``)
  training      the worker process: base + parent chain loaded, LoRA trained (``train_s``)
  gate          held-out perplexity of the parent and the new node (``gate_s``)
  registration  node files, tree.json, registry, signed version 1, snapshot switch (``register_s``)
  first load    the job's end -> the new node's first streamed token (its chain loads on first use)

Baseline measured in the same run: the first-token latency of the parent node, warm, so
``first_load_ratio`` = the new node's first token over a served node's. Writes
benchmarks/results/customize_bench.json and .png; the last line printed is
``customize: total_s=X first_load_ratio=Y``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
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

RESULTS = REPO / "benchmarks" / "results"
PHASES = ("upload", "queue", "worker start", "training", "gate", "registration", "first load")
QUESTION = "Write a short clinic note for a toddler with a fever and ear pain."


def start_server(tree: Path, db: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    args = ["serve", str(tree), "--db", db, "--port", "0", "--http-port", "0", "--threads", "1", "--job-threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args, "--grace", "5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"OpenAI API at (\S+/v1)", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError("treelm serve did not start")


def first_token_s(client, model: str) -> float:
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0, stream=True
    )
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{model} streamed no text")
    return first


def run_once(base_url: str, token: str, tree: str, notes: Path, suffix: str) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=1800)
    parent = f"{tree}/en/medical"
    first_token_s(client, parent)  # the parent's chain is loaded: its later first tokens are warm
    warm = statistics.median(first_token_s(client, parent) for _ in range(3))
    submitted = time.perf_counter()
    with notes.open("rb") as fh:
        uploaded = client.files.create(file=(notes.name, fh), purpose="fine-tune")
    upload_s = time.perf_counter() - submitted
    job = client.fine_tuning.jobs.create(model=parent, training_file=uploaded.id, suffix=suffix)
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    ended = time.perf_counter()
    if job.status != "succeeded":
        raise RuntimeError(f"job {job.id} ended {job.status}: {job.error}")
    new_first = first_token_s(client, job.fine_tuned_model)
    done = time.perf_counter()
    result = dict((job.model_extra or {}).get("result") or {})
    phases = {
        "upload": upload_s,
        "queue": float(result.get("queue_s", 0.0)),
        "worker start": float(result.get("worker_s", 0.0))
        - float(result.get("train_s", 0.0))
        - float(result.get("gate_s", 0.0)),
        "training": float(result.get("train_s", 0.0)),
        "gate": float(result.get("gate_s", 0.0)),
        "registration": float(result.get("register_s", 0.0)),
        "first load": done - ended,  # includes up to 0.2 s of polling for the job's end
    }
    return {
        "node": job.fine_tuned_model,
        "phases_s": phases,
        "total_s": done - submitted,
        "job_s": ended - submitted - upload_s,
        "unaccounted_s": (ended - submitted) - sum(phases[p] for p in PHASES[:-1]),
        "new_first_token_s": new_first,
        "parent_first_token_s": warm,
        "first_load_ratio": new_first / warm,
        "held_out_ppl": result.get("held_out_ppl"),
        "parent_held_out_ppl": result.get("parent_held_out_ppl"),
        "steps": result.get("steps"),
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = record["runs"][-1]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for phase in PHASES:
        width = run["phases_s"][phase]
        ax.barh([0], [width], left=left, label=f"{phase} {width:.1f} s")
        left += width
    ax.set_yticks([])
    ax.set_xlabel("seconds from submission")
    ax.set_title(f"fine-tuning job -> first token of {run['node']} ({record['device']})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO / "examples" / "demo" / "build")
    parser.add_argument("--notes", type=Path, default=REPO / "examples" / "demo" / "northfield-notes.txt")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not (args.tree / "tree.json").is_file():
        # `make bench` on a fresh machine: as forgetting_bench, skip rather than build for ~10 minutes.
        print(f"skipped: no built tree at {args.tree}; build it with `make demo` (or `treelm tree build ...`)")
        return 0
    from rich.console import Console
    from rich.table import Table

    from examples.demo.scenario.setup import CLINIC, prepare

    work = Path(tempfile.mkdtemp(prefix="treelm-customize-bench-"))
    proc = None
    try:
        state = prepare(args.tree, work / "state")
        shutil.copyfile(REPO / "examples" / "demo" / "update-policy.yaml", state.tree / "update-policy.yaml")
        proc, base_url = start_server(state.tree, state.url)
        runs = [
            run_once(base_url, state.tokens[CLINIC], state.tree_name, args.notes, f"northfield-bench-{i}")
            for i in range(args.repeats)
        ]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "customize",
        "tree": str(args.tree),
        "device": f"{platform.machine()} {os.cpu_count()} cpus, 1 engine thread, 1 job thread",
        "runs": runs,
    }
    table = Table(title="fine-tuning job: submission -> the new node's first token (seconds)")
    table.add_column("phase")
    table.add_column("s", justify="right")
    table.add_column("share", justify="right")
    last = runs[-1]
    for phase in PHASES:
        seconds = last["phases_s"][phase]
        table.add_row(phase, f"{seconds:.2f}", f"{seconds / last['total_s']:.0%}")
    table.add_row("total", f"{last['total_s']:.2f}", "100%")
    console = Console()
    console.print(table)
    console.print(
        f"held-out perplexity: parent {last['parent_held_out_ppl']:.3f} -> new node {last['held_out_ppl']:.3f}; "
        f"first token: new node {last['new_first_token_s'] * 1000:.0f} ms vs the parent warm "
        f"{last['parent_first_token_s'] * 1000:.0f} ms"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "customize_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(record, RESULTS / "customize_bench.png")
    print(f"customize: total_s={last['total_s']:.1f} first_load_ratio={last['first_load_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
