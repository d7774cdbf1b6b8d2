"""(3b) The clinician's laptop pulls cardiology and runs it offline; (4e) after the update, `pull
--check` on the laptop's copy. Everything the laptop does goes through the SDK's pull (the
signed, resumable download) and stock tools: transformers, and llama.cpp when installed."""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from examples.demo.scenario.setup import HOSPITAL, DemoState
from examples.demo.scenario.steps import Table
from treelm import Client, TreeLMError

PROMPT = "The patient was admitted with chest pain and an abnormal ECG. The cardiologist"
HARDWARE = "cpu:2GiB"  # the laptop's profile, as in step 1
HF_KINDS = ("merged", "merged-fp16", "merged-bf16")  # what stock transformers loads as it is


@dataclass
class Laptop:
    """The laptop's pulled models and what it was told to trust."""

    dir: Path
    root_key: str  # root's fingerprint, given to the laptop out of band (here: read from keys/root)
    table: Table
    chosen: Path | None = None  # the registry's pick for the laptop


def _chain(manifest_file: Path) -> str:
    from hierarchy.updates.variants import parse_variant_manifest

    manifest = parse_variant_manifest(manifest_file.read_bytes())
    return " -> ".join(f"{x.path or 'base'}@v{x.version}" for x in manifest.chain)


def agreement(reference: list[int], tokens: list[int]) -> str:
    """ "N/M": how many of the reference's M tokens the other sequence repeats before it differs."""
    same = next((i for i, (a, b) in enumerate(zip(reference, tokens, strict=False)) if a != b), None)
    n = min(len(reference), len(tokens)) if same is None else same
    return f"{n}/{len(reference)}"


def transformers_greedy(folder: Path, prompt: str, max_new: int) -> tuple[list[int], list[int]]:
    """``(prompt ids, greedy tokens)`` of a pulled HF directory, loaded offline by stock transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = list(tokenizer(prompt).input_ids)
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False)
    return ids, [int(t) for t in out[0, len(ids) :]]


def llama_installed() -> bool:
    """Whether llama-cpp-python is importable (the demo never installs or compiles it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def llama_greedy(gguf: Path, ids: list[int], max_new: int) -> list[int]:
    """Greedy tokens of a GGUF file in stock llama.cpp (llama-cpp-python), stopping at its end token."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=1, verbose=False)
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) >= max_new or token == llm.token_eos():
            break
    llm.close()
    return out


def pull_and_run(
    address: str, state: DemoState, laptop_dir: Path, max_new_tokens: int, echo: Callable[[str], None]
) -> Laptop:
    """Pull the registry's pick for a 2 GiB CPU laptop, the fp32 merged model for transformers and,
    when llama.cpp is installed, the Q8_0 GGUF file; run them offline and compare their greedy
    tokens with the server's answer."""
    from cluster.updates.keys import load_public_key

    shutil.rmtree(laptop_dir, ignore_errors=True)
    table = Table("pull", "3b. The clinician's laptop pulls cardiology and runs it offline", ["step", "result"])
    laptop = Laptop(laptop_dir, load_public_key(state.keys / "root").keyid, table)
    node = f"{state.tree_name}/en/medical/cardiology"
    pulled: dict[str, Path] = {}
    with Client(address, token=state.tokens[HOSPITAL], timeout=600) as client:
        for variant in (None, "merged", *(["merged-int8"] if llama_installed() else [])):
            if variant in pulled:
                continue  # the registry's pick was this one already
            started = time.monotonic()
            try:
                result = client.pull(
                    "en/medical/cardiology" if variant is None else node,
                    variant=variant,
                    hardware=HARDWARE,
                    root_keys=[laptop.root_key],
                    out=laptop_dir / (f"cardiology-{variant}" if variant else "cardiology"),
                    server=address,
                )
            except TreeLMError as exc:
                table.rows.append([f"treelm pull {variant or 'the pick'} ({HARDWARE})", f"refused: {exc}"])
                continue
            pulled[result.variant] = result.directory
            laptop.chosen = laptop.chosen or result.directory
            how = "the registry's pick for" if variant is None else "asked for, fits"
            table.rows.append(
                [
                    f"treelm pull ({how} {HARDWARE})",
                    f"{result.node} v{result.version} {result.variant}: {len(result.files)} files, "
                    f"{result.bytes_total / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s; every file's "
                    f"sha256 and the manifest's signature verified from root {laptop.root_key[:12]}...",
                ]
            )
            echo(f"pulled {result.node} {result.variant} into {result.directory}")
        served = client.generate(node, PROMPT, max_new_tokens=max_new_tokens, temperature=0, echo=True)
    reference = list(served.token_ids)
    table.rows.append(["the server's greedy answer", f"{len(reference)} tokens: {served.text.strip()!r}"])
    ids = list(served.echo.token_ids) if served.echo is not None else []  # the server's tokenization
    hf = next((pulled[k] for k in HF_KINDS if k in pulled), None)
    if hf is not None:
        own, tokens = transformers_greedy(hf, PROMPT, len(reference))
        table.rows.append(
            [
                f"stock transformers, offline ({hf.name})",
                f"greedy tokens equal to the server's: {agreement(reference, tokens)}; "
                f"prompt tokenized as the server did: {own == ids}",
            ]
        )
        ids = own  # from here on the laptop's own tokenization
    gguf = next((f for p in pulled.values() for f in sorted(p.glob("*.gguf"))), None)
    if not llama_installed():
        note = "llama.cpp: llama-cpp-python is not installed (pip install 'treelm[llama]'), so no GGUF run"
        echo(note)
        table.notes.append(note)
    elif gguf is not None:
        tokens = llama_greedy(gguf, ids, len(reference))
        table.rows.append(
            [
                f"llama.cpp (llama-cpp-python), offline ({gguf.parent.name}/{gguf.name})",
                f"greedy tokens equal to the server's: {agreement(reference, tokens)} (quantized weights)",
            ]
        )
    if laptop.chosen is not None:
        table.notes.append(f"the laptop's copy serves the chain {_chain(laptop.chosen / 'manifest.json')}")
    return laptop


def check_after_update(address: str, state: DemoState, laptop: Laptop) -> None:
    """`treelm pull --check` on the laptop's copy, then `--upgrade` when the server serves newer weights
    (a new version, or the same version re-pinned over a new parent version)."""
    from treelm._pull import check, upgrade

    if laptop.chosen is None:
        return
    table = laptop.table
    with Client(address, token=state.tokens[HOSPITAL], timeout=600) as client:
        found = check(client, laptop.chosen)
        if found.repinned:
            verdict = f"newer: re-pinned over {found.stable_chain} (the laptop has {found.current_chain})"
        elif found.newer:
            verdict = f"newer: v{found.stable} is stable ({found.note})"
        else:
            verdict = "no newer version"
        table.rows.append(
            [
                "after the update: treelm pull --check",
                f"{found.node} {found.variant}: pulled v{found.current}, stable v{found.stable}: {verdict}",
            ]
        )
        if not found.newer:
            return
        started = time.perf_counter()
        result = upgrade(client, laptop.chosen)
    seconds = time.perf_counter() - started
    moved = getattr(result, "bytes_transferred", 0) / 1e6
    table.rows.append(
        [
            "treelm pull --upgrade (verified, then switched atomically)",
            f"the laptop now has {_chain(laptop.chosen / 'manifest.json')} ({moved:.1f} MB in {seconds:.1f} s)",
        ]
    )
