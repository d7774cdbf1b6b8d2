"""Benchmark: the server's memory while huge update uploads are refused (issue 21, item 2).

    .venv/bin/python benchmarks/uploads_bench.py                       # about a minute on 2 cores
    .venv/bin/python benchmarks/uploads_bench.py --server-repo /path   # the same against another checkout

Starts ``treelm serve`` (a ~20M-parameter tiny Llama, a random tree, auth on, ``--upload-max-file
64MiB``) and, per scenario, streams 3 uploads of ``--mib`` MiB (1 MiB chunks) at once, one tenant
each, all refused:

  unknown-key   the envelope is signed by a key the registry does not know
  over-limit    a node key signs a manifest declaring one ``--mib`` MiB file (> --upload-max-file)
  overlong      a node key signs the real (KiB) adapter files, then ``--mib`` MiB are sent for one

The server's RSS (/proc/PID/status VmRSS) is sampled every 10 ms from before the streams start
until the last is answered; reported as the peak against the idle server's RSS just before, with
what the clients had sent when refused (gRPC pulls requests only as the server takes them, plus
flow-control windows). The spool must be empty afterwards.
Writes benchmarks/results/uploads_bench.json and .png. The last line printed is
``uploads: idle_mib=X peak_mib=Y``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from grpc_bench import tiny_tree  # noqa: E402 (the same tiny base and tree)

RESULTS = REPO / "benchmarks" / "results"
SCENARIOS = ("unknown-key", "over-limit", "overlong")
TENANTS = ("t1", "t2", "t3")
NODE = "en/medical/radiology"
MIB = 1 << 20


# ----------------------------------------------------------------------------- setup
def prepare(workdir: Path) -> dict:
    from cluster.tree_import import import_tree
    from cluster.updates.keys import register_key
    from hierarchy.updates.keys import SigningKey
    from registry.access import create_tenant, issue_token
    from registry.db import init_registry, open_registry

    _, tree_dir = tiny_tree(workdir)
    db = workdir / "registry.db"
    db.unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    init_registry(url)
    root, node_key = SigningKey.generate(), SigningKey.generate()
    with open_registry(url) as reg:
        import_tree(reg, tree_dir)
        register_key(reg, root, "root")
        register_key(reg, node_key, "node", f"bench/{NODE}", [root])
        tokens = {}
        for tenant in TENANTS:
            create_tenant(reg, tenant)
            tokens[tenant] = issue_token(reg, tenant).token
    return {"tree_dir": str(tree_dir), "db": url, "tokens": tokens, "node_key": node_key}


def envelopes(paths: dict, mib: int) -> dict:
    """Each scenario's envelope bytes and which file its junk chunks name."""
    from cluster.updates.make import adapter_files, build_manifest
    from hierarchy.updates.keys import SigningKey
    from hierarchy.updates.manifest import FileEntry, sign_manifest
    from nodes.store.adapters import read_adapter
    from nodes.store.tree import node_dir, open_tree

    tree = open_tree(paths["tree_dir"])
    node = tree.node(f"bench/{NODE}")
    adapter = read_adapter(node_dir(paths["tree_dir"], NODE))
    files = adapter_files(adapter)

    def manifest(files_: dict[str, bytes]):
        return build_manifest(
            f"bench/{NODE}", 1, node.version + 1, tree.base_digest, adapter, files_, b"bench", {"eval_ppl": 1.0}
        )

    honest = manifest(files)
    zeros = hashlib.sha256()
    for _ in range(mib):
        zeros.update(b"\0" * MIB)
    big = dataclasses.replace(honest, files=(FileEntry("huge.bin", zeros.hexdigest(), mib * MIB),))
    return {
        "unknown-key": (sign_manifest(honest, [SigningKey.generate()]).to_bytes(), "adapter_model.safetensors"),
        "over-limit": (sign_manifest(big, [paths["node_key"]]).to_bytes(), "huge.bin"),
        "overlong": (sign_manifest(honest, [paths["node_key"]]).to_bytes(), "adapter_model.safetensors"),
    }


def start_server(paths: dict, server_repo: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(server_repo)}
    command = [sys.executable, "-m", "cluster.cli", "serve", paths["tree_dir"], "--db", paths["db"]]
    command += ["--port", "0", "--threads", "1", "--grace", "5"]
    if server_repo == REPO:  # another checkout may predate the option
        command += ["--upload-max-file", "64MiB"]
    proc = subprocess.Popen(
        command, cwd=server_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"serving \S+ on (\S+:\d+)", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError("treelm serve did not start")


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


# ----------------------------------------------------------------------------- one scenario
def upload(target: str, token: str, envelope: bytes, file: str, mib: int) -> dict:
    import grpc

    from protos.treelm.v1 import updates_pb2, updates_pb2_grpc

    sent = [0]

    def chunks():
        yield updates_pb2.SubmitChunk(node=f"bench/{NODE}", envelope=envelope)
        piece = b"\0" * MIB
        for _ in range(mib):
            sent[0] += 1
            yield updates_pb2.SubmitChunk(file=file, data=piece)

    options = [("grpc.max_send_message_length", 8 * MIB)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = updates_pb2_grpc.UpdatesStub(channel)
        start = time.perf_counter()
        try:
            stub.Submit(chunks(), metadata=[("authorization", f"Bearer {token}")], timeout=600)
            code, details = "OK", ""
        except grpc.RpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        return {"code": code, "details": details[:160], "sent_mib": sent[0], "s": time.perf_counter() - start}


def scenario(proc: subprocess.Popen, target: str, paths: dict, envelope: bytes, file: str, mib: int) -> dict:
    time.sleep(1.0)  # let the last scenario's memory settle
    idle = rss_mib(proc.pid)
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_mib(proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results: list[dict] = [{} for _ in TENANTS]

    def one(i: int, tenant: str) -> None:
        results[i] = upload(target, paths["tokens"][tenant], envelope, file, mib)

    start = time.perf_counter()
    workers = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(TENANTS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    time.sleep(0.2)
    done.set()
    sampler.join()
    return {
        "idle_mib": idle,
        "peak_mib": max(samples),
        "added_mib": max(samples) - idle,
        "wall_s": wall,
        "uploads": results,
    }


# ----------------------------------------------------------------------------- report
def print_table(table: dict, mib: int) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title=f"server RSS while 3 x {mib} MiB uploads are refused")
    for col in ("scenario", "idle MiB", "peak MiB", "peak - idle", "refused with", "client sent (MiB)", "wall s"):
        out.add_column(col, justify="left" if col in ("scenario", "refused with") else "right")
    for name, row in table.items():
        codes = sorted({u["code"] for u in row["uploads"]})
        sent = "/".join(str(u["sent_mib"]) for u in row["uploads"])
        out.add_row(
            name,
            f"{row['idle_mib']:.0f}",
            f"{row['peak_mib']:.0f}",
            f"{row['added_mib']:.0f}",
            ", ".join(codes),
            sent,
            f"{row['wall_s']:.2f}",
        )
    Console(width=140).print(out)


def plot(table: dict, mib: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [table[n]["idle_mib"] for n in names], 0.4, label="idle")
    ax.bar([x + 0.2 for x in xs], [table[n]["peak_mib"] for n in names], 0.4, label=f"peak, 3 x {mib} MiB refused")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("server RSS (MiB)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("treelm serve memory while huge update uploads are refused")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=250, help="MiB each upload offers")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "treelm-uploads-bench")
    parser.add_argument("--server-repo", type=Path, default=REPO, help="the checkout whose server is measured")
    parser.add_argument("--out", default="uploads_bench", help="results file name (without extension)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.workdir)
    scenarios = envelopes(paths, args.mib)
    server_repo = args.server_repo.resolve()
    proc, target = start_server(paths, server_repo)
    started = time.time()
    table: dict = {}
    try:
        for name in SCENARIOS:
            envelope, file = scenarios[name]
            table[name] = scenario(proc, target, paths, envelope, file, args.mib)
            print(f"{name}: done", flush=True)
        hwm = rss_mib(proc.pid, "VmHWM")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    spool = Path(paths["tree_dir"]) / "spool"
    left = sorted(p.name for p in spool.iterdir()) if spool.is_dir() else []
    print_table(table, args.mib)
    record = {
        "benchmark": "uploads_bench",
        "settings": {"mib": args.mib, "uploads": len(TENANTS), "chunk_mib": 1, "server_repo": str(server_repo)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": time.time() - started,
        "table": table,
        "vm_hwm_mib": hwm,
        "spool_left": left,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    plot(table, args.mib, RESULTS / f"{args.out}.png")
    print(f"server VmHWM (whole life, model load included): {hwm:.0f} MiB; spool left behind: {left or 'nothing'}")
    print(f"wrote {RESULTS / (args.out + '.json')} and .png")
    idle = min(r["idle_mib"] for r in table.values())
    peak = max(r["peak_mib"] for r in table.values())
    print(f"uploads: idle_mib={idle:.0f} peak_mib={peak:.0f}")


if __name__ == "__main__":
    main()
