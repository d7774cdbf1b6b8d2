"""Run a built variant with stock tools and compare it with the engine: greedy tokens and perplexity.

    runner = stock_runner(artifact, base)          # transformers / peft (GGUF: transformers' gguf_file=)
    runner = llama_runner(artifact, base)          # llama.cpp through llama-cpp-python (optional extra)
    runner.greedy(prompt_ids, 16), runner.perplexity(stream, 64)
    engine_greedy(tree_dir, node, ["prompt", ...], 16)      # what TreeLM itself answers: (ids, tokens)
    agreement(reference, tokens)                   # (equal leading tokens, share of equal positions)

Nothing here is TreeLM's own model code: a variant is checked the way a device would run it.
Greedy sequences stop at the end-of-sequence token, as the engine's do.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.build.variants.store import VariantArtifact
from nodes.errors import ExportError

__all__ = [
    "Runner",
    "agreement",
    "engine_answers",
    "engine_greedy",
    "llama_available",
    "llama_runner",
    "load_llama",
    "stock_runner",
]


def llama_available() -> bool:
    """Whether llama-cpp-python (the ``llama`` extra) is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def agreement(reference: Sequence[int], tokens: Sequence[int]) -> tuple[int, float]:
    """``(leading tokens equal, share of positions equal)`` over the reference's length."""
    prefix = 0
    for a, b in zip(reference, tokens, strict=False):
        if a != b:
            break
        prefix += 1
    if not reference:
        return 0, 1.0 if not tokens else 0.0
    same = sum(1 for a, b in zip(reference, tokens, strict=False) if a == b)
    return prefix, same / max(len(reference), len(tokens))


def engine_greedy(
    tree_dir: str | Path, node: str, prompts: Sequence[str], max_new: int
) -> list[tuple[list[int], list[int]]]:
    """TreeLM's own greedy answers (the generation engine serving the tree dir): ``(prompt ids, tokens)`` each."""
    return engine_answers(tree_dir, [(node, p) for p in prompts], max_new)


def engine_answers(
    tree_dir: str | Path, requests: Sequence[tuple[str, str]], max_new: int
) -> list[tuple[list[int], list[int]]]:
    """Greedy answers of one engine for ``(node, prompt)`` pairs: ``(prompt ids, tokens)`` each, in order."""
    from nodes.runtime.engine import Engine, EngineConfig
    from nodes.runtime.requests import GenerationRequest, SamplingParams
    from nodes.store.versions import open_served_tree

    tree = open_served_tree(tree_dir)
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0)

    async def run(engine: Engine) -> list[tuple[list[int], list[int]]]:
        asked = [GenerationRequest(node=node, prompt=prompt, params=params) for node, prompt in requests]
        results = await asyncio.gather(*(engine.generate(r) for r in asked))  # one mixed batch, as served
        return [(list(engine.encode(r)), list(res.token_ids)) for r, res in zip(asked, results, strict=True)]

    with Engine(tree.base_dir, tree_dir, EngineConfig(max_batch_size=max(1, min(len(requests), 32)))) as engine:
        return asyncio.run(run(engine))


@dataclass
class Runner:
    """One loaded variant: greedy tokens and perplexity the way its stock loader runs it."""

    name: str
    eos: set[int]
    _model: Any = field(repr=False)
    _llama: bool = False

    def greedy(self, prompt: Sequence[int], max_new: int) -> list[int]:
        out = self._llama_greedy(prompt, max_new) if self._llama else self._hf_greedy(prompt, max_new)
        cut = next((i for i, t in enumerate(out) if t in self.eos), None)
        return out[:cut] if cut is not None else out

    def perplexity(self, stream: Sequence[int], window: int) -> float:
        """exp(mean next-token NLL) in windows of ``window`` predictions (as nodes.build.training.perplexity)."""
        ids = list(stream)
        windows = [ids[i : i + window + 1] for i in range(0, len(ids) - 1, window)]
        windows = [w for w in windows if len(w) >= 2]
        nll, count = 0.0, 0
        for w in windows:
            logprobs = self._llama_logprobs(w) if self._llama else self._hf_logprobs(w)
            nll -= sum(float(logprobs[i][w[i + 1]]) for i in range(len(w) - 1))
            count += len(w) - 1
        return math.exp(nll / count)

    def _hf_greedy(self, prompt: Sequence[int], max_new: int) -> list[int]:
        import torch

        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            out = self._model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, pad_token_id=0
            )
        return [int(t) for t in out[0, ids.shape[1] :]]

    def _hf_logprobs(self, window: Sequence[int]) -> Any:
        import torch

        with torch.no_grad():
            logits = self._model(input_ids=torch.tensor([list(window[:-1])]), use_cache=False).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def _llama_greedy(self, prompt: Sequence[int], max_new: int) -> list[int]:
        out: list[int] = []
        for token in self._model.generate(list(prompt), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) >= max_new or token in self.eos:
                break
        return out

    def _llama_logprobs(self, window: Sequence[int]) -> Any:
        import numpy as np

        self._model.reset()
        self._model.eval(list(window[:-1]))
        logits = np.asarray(self._model.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def _eos(config: Any) -> set[int]:
    eos = getattr(config, "eos_token_id", None)
    return set(eos) if isinstance(eos, (list, tuple)) else ({int(eos)} if eos is not None else set())


def stock_runner(artifact: VariantArtifact, base: VariantArtifact | None = None) -> Runner:
    """Load ``artifact`` with stock transformers (and peft for ``flat``, over ``base``); float32 compute.

    GGUF files load through transformers' ``gguf_file=`` (de-quantized); LoRA GGUF files have no
    transformers loader, so ``gguf-lora`` needs :func:`llama_runner`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kind, folder = artifact.kind, artifact.directory
    model: Any
    if kind.family == "hf":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, kind.dtype))
        model = model.float()  # compute in fp32: the weights keep their stored precision
    elif kind.family == "peft":
        from peft import PeftModel

        if base is None:
            raise ExportError(f"{kind.name} runs over its base: pass the base's {artifact.manifest.requires} variant")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.directory), folder)
    elif kind.family == "gguf":
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=artifact.manifest.load["gguf"][0])
    else:
        raise ExportError("LoRA GGUF files load in llama.cpp only: use llama_runner")
    model.eval()
    return Runner(f"transformers {kind.name}", _eos(model.config), model)


def llama_runner(artifact: VariantArtifact, base: VariantArtifact | None = None, *, n_ctx: int = 512) -> Runner:
    """Load a GGUF variant in llama.cpp (``gguf-lora``: the base GGUF plus every LoRA file at scale 1)."""
    if not llama_available():
        raise ExportError("llama.cpp checks need llama-cpp-python: pip install 'treelm[llama]'")
    kind = artifact.kind
    if kind.family == "gguf":
        model_file = artifact.files("gguf")[0]
    elif kind.family == "gguf-lora":
        if base is None:
            raise ExportError("gguf-lora runs over the base's GGUF: pass the base variant")
        model_file = base.files("gguf")[0]
    else:
        raise ExportError(f"{kind.name} is not a GGUF variant")
    loras = artifact.files("lora") if kind.family == "gguf-lora" else []
    return load_llama(model_file, loras, name=f"llama.cpp {kind.name}", n_ctx=n_ctx)


def load_llama(model_file: Path, loras: Sequence[Path] = (), *, name: str = "llama.cpp", n_ctx: int = 512) -> Runner:
    """A GGUF model in stock llama.cpp, with LoRA GGUF files applied together at scale 1.0."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model_file), n_ctx=n_ctx, n_threads=1, n_batch=n_ctx, logits_all=True, verbose=False
    )
    if loras:
        adapters = []
        for file in loras:
            adapter = llama_cpp.llama_adapter_lora_init(llm._model.model, str(file).encode())
            if not adapter:
                raise ExportError(f"llama.cpp refused the LoRA file {file}")
            llm._stack.callback(llama_cpp.llama_adapter_lora_free, adapter)
            adapters.append(adapter)
        array = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
        scales = (ctypes.c_float * len(adapters))(*([1.0] * len(adapters)))
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, array, len(adapters), scales):
            raise ExportError(f"llama.cpp could not apply the LoRA files {[str(f) for f in loras]}")
    return Runner(name, {int(llm.token_eos())}, llm, _llama=True)
