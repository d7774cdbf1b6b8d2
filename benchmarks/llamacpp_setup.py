"""What llamacpp_bench.py runs against: llama-server, the demo tree as GGUF files, and both servers.

* :func:`find_llama_server`: ``$LLAMA_SERVER``, else the newest ``make llama-server`` build in
  ``~/.cache/treelm/llama-server/<flags digest>/llama-server``.
* :func:`export_tree`: the tree's base as GGUF F32 and Q8_0 and every distinct chain element
  (path, version, adapter digest) as one LoRA GGUF file, written once into a cache directory
  keyed by the base and adapter digests (``~/.cache/treelm/llamacpp-bench/<key>/``), with
  ``export.json`` mapping each node to the LoRA files of its chain (top first).
* :func:`start_llama` and :func:`start_treelm`: the two servers as subprocesses, each started
  alone, each stopped with :func:`stop`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "treelm"
EXPORT_VERSION = 1  # bump when the GGUF writers change what they write


def find_llama_server() -> Path | None:
    """``$LLAMA_SERVER`` if set, else the newest `make llama-server` build, else None."""
    named = os.environ.get("LLAMA_SERVER")
    if named:
        return Path(named) if Path(named).is_file() else None
    built = sorted((CACHE / "llama-server").glob("*/llama-server"), key=lambda p: p.stat().st_mtime)
    return built[-1] if built else None


@dataclass(frozen=True)
class Export:
    """The demo tree as llama.cpp files."""

    base: dict[str, Path]  # GGUF type ("F32", "Q8_0") -> base model file
    loras: tuple[Path, ...]  # every chain element's LoRA file; its index is llama-server's adapter id
    chains: dict[str, tuple[int, ...]]  # node ("demo/en/medical") -> LoRA ids of its chain, top first
    eos: tuple[int, ...]  # the base's end-of-sequence ids


def _eos(base_dir: Path) -> tuple[int, ...]:
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = base_dir / name
        if file.is_file():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids |= set(value if isinstance(value, list) else [value] if value is not None else [])
    return tuple(sorted(ids))


def export_tree(tree_dir: Path, types: tuple[str, ...] = ("F32", "Q8_0")) -> Export:
    """Write (or find) the GGUF files of every node of the built tree at ``tree_dir``."""
    from nodes.build.variants.gguf_lora import write_gguf_lora
    from nodes.build.variants.gguf_model import write_gguf_model
    from nodes.build.variants.source import resolve_source
    from nodes.build.variants.writers import merged_model
    from nodes.store.adapters import read_adapter
    from nodes.store.versions import open_served_tree

    tree = open_served_tree(tree_dir)
    sources = {str(n.node_id): resolve_source(tree_dir, str(n.node_id)) for n in tree.nodes}
    elements: dict[tuple[str, int, str], int] = {}
    for source in sources.values():
        for link in source.chain:
            elements.setdefault((str(link.path), link.version, link.adapter_digest), len(elements))
    digest = hashlib.sha256(json.dumps([EXPORT_VERSION, tree.base_digest, list(elements)]).encode()).hexdigest()
    out = CACHE / "llamacpp-bench" / digest[:16]
    names = [f"{i:02d}-{path.replace('/', '-')}-v{version}-LoRA-F32.gguf" for (path, version, _), i in elements.items()]
    chains = {
        node: tuple(elements[(str(x.path), x.version, x.adapter_digest)] for x in s.chain)
        for node, s in sources.items()
    }
    if not (out / "export.json").is_file():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        print(f"exporting {tree_dir} to GGUF in {out} (once) ...", flush=True)
        base_source = next(iter(sources.values())).base_source
        model, _ = merged_model(base_source)
        for kind in types:
            write_gguf_model(model, tree.base_dir, partial / f"{tree.name}-base-{kind}.gguf", kind, name=tree.name)
        del model
        done: set[tuple[str, int, str]] = set()
        for source in sources.values():
            for link in source.chain:
                key = (str(link.path), link.version, link.adapter_digest)
                if key in done:
                    continue
                adapter = read_adapter(link.directory, expected_sha256=link.sha256)
                name = f"{link.node_id} v{link.version}"
                write_gguf_lora(adapter, tree.base_dir, partial / names[elements[key]], name=name)
                done.add(key)
        (partial / "export.json").write_text(json.dumps({"chains": chains, "loras": names}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    base = {kind: out / f"{tree.name}-base-{kind}.gguf" for kind in types}
    return Export(base=base, loras=tuple(out / n for n in names), chains=chains, eos=_eos(tree.base_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ok(url: str, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")


def start_llama(
    binary: Path, export: Export, kind: str, *, threads: int, slots: int, ctx_per_slot: int, log: Path
) -> tuple[subprocess.Popen, str]:
    """llama-server over the base ``kind`` with every LoRA file loaded at scale 0 (requests choose)."""
    port = free_port()
    loras = [arg for f in export.loras for arg in ("--lora", str(f))]
    args = [str(binary), "-m", str(export.base[kind]), *loras, "--lora-init-without-apply"]
    args += ["--threads", str(threads), "--threads-batch", str(threads), "-np", str(slots)]
    args += ["-c", str(slots * ctx_per_slot), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait_ok(url + "/health", proc, "llama-server")
    return proc, url


def start_treelm(
    tree_dir: Path, work: Path, *, threads: int, batch: int, extra: list[str]
) -> tuple[subprocess.Popen, str, str]:
    """`treelm serve --http-port` over a copy of the tree (the source is only read); (proc, /v1 URL, token)."""
    from cluster.tree_import import import_tree
    from registry.access import create_tenant, issue_token, list_tenants
    from registry.db import init_registry, open_registry

    copy = work / "tree"
    if not copy.exists():
        shutil.copytree(tree_dir, copy, ignore=shutil.ignore_patterns("variants"))
    url = f"sqlite:///{work / 'registry.db'}"
    init_registry(url)
    with open_registry(url) as reg:
        import_tree(reg, copy)
        # The owner of a private node (the demo's oncology belongs to st-marys) may call every node.
        owners = [t.name for t in list_tenants(reg)]
        tenant = owners[0] if owners else create_tenant(reg, "bench").name
        token = issue_token(reg, tenant).token
    args = ["serve", str(copy), "--db", url, "--port", "0", "--http-port", "0", "--threads", str(threads)]
    args += ["--max-batch", str(batch), "--tenant-max-running", str(2 * batch), "--tenant-max-queued", "256"]
    args += ["--prefix-cache", "0", "--no-updates", "--no-feedback", "--grace", "5", *extra]
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    text = ""
    for line in proc.stdout:
        text += line
        found = re.search(r"OpenAI API at\s*(http://[0-9.:]+/v1)", " ".join(text.split()))
        if found:  # keep reading what it prints, so that a full pipe never blocks it
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, found.group(1), token
    raise RuntimeError(f"treelm serve did not start:\n{text[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
