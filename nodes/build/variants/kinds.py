"""The variant kinds: the ways one node version ships to a device, and what each one needs.

    kind          what the artifact holds                          stock loader
    merged        HF safetensors dir, chain folded in, float32     transformers ``AutoModelForCausalLM.from_pretrained(DIR)``
    merged-fp16   the same in float16
    merged-bf16   the same in bfloat16
    flat          ONE PEFT adapter of rank sum(r_i)                peft ``PeftModel.from_pretrained(base, DIR)``; vLLM, LoRAX
                  (+ the base: ``merged`` of the tree's base)
    merged-int8   GGUF, merged model in Q8_0                       llama.cpp; transformers ``from_pretrained(DIR, gguf_file=F)``
    gguf-f16      GGUF, merged model in F16                        llama.cpp; transformers ``gguf_file=``
    gguf-q4_0     GGUF, merged model in Q4_0 (embeddings Q8_0)     llama.cpp
    gguf-lora     one LoRA GGUF per chain element, F32             llama.cpp ``--lora`` per file, over the base
                  (+ the base: ``gguf-f16`` of the tree's base)

Why the int8 variant is a GGUF Q8_0 file: it is the one int8 format that both stock stacks
load from the same bytes. llama.cpp keeps it int8 in memory and runs it on CPU, CUDA and Metal;
transformers loads it with ``gguf_file=`` (de-quantized to the dtype asked for), so a device
without llama.cpp still runs the file it downloaded. bitsandbytes int8 wants a CUDA GPU,
torchao/compressed-tensors files need packages most devices lack, and TreeLM's own int8
safetensors (:mod:`nodes.build.quantize`) need TreeLM. ``gguf-q8_0`` is accepted as another
name for it.

Q4: convert_hf_to_gguf.py writes F32/F16/BF16/Q8_0 only; K-quants need llama.cpp's C++
quantizer. The ``gguf`` package quantizes Q4_0 itself (the same numpy code path the converter
uses for Q8_0), so ``gguf-q4_0`` is built with it; like llama-quantize, the token embedding
(also the output head when tied) stays at higher precision (Q8_0).
"""

from __future__ import annotations

from dataclasses import dataclass

from nodes.errors import ExportError

__all__ = ["ALIASES", "KINDS", "VariantKind", "canonical_kind"]


@dataclass(frozen=True)
class VariantKind:
    """One kind of variant: its file family, number format and what it needs beside it."""

    name: str
    family: str  # hf | peft | gguf | gguf-lora
    dtype: str  # hf: a torch dtype name; gguf: a GGML type name (F16, Q8_0, Q4_0); peft/gguf-lora: float32
    needs_adapters: bool  # only for nodes below the base (a chain to flatten or to ship)
    requires: str | None  # the kind of the *base's* variant it runs over (flat, gguf-lora)
    library: str  # model card ``library_name``
    summary: str

    @property
    def is_gguf(self) -> bool:
        return self.family in ("gguf", "gguf-lora")


KINDS: dict[str, VariantKind] = {
    k.name: k
    for k in (
        VariantKind("merged", "hf", "float32", False, None, "transformers", "merged model, float32"),
        VariantKind("merged-fp16", "hf", "float16", False, None, "transformers", "merged model, float16"),
        VariantKind("merged-bf16", "hf", "bfloat16", False, None, "transformers", "merged model, bfloat16"),
        VariantKind("flat", "peft", "float32", True, "merged", "peft", "the chain as one PEFT adapter"),
        VariantKind("merged-int8", "gguf", "Q8_0", False, None, "gguf", "merged model, GGUF Q8_0"),
        VariantKind("gguf-f16", "gguf", "F16", False, None, "gguf", "merged model, GGUF F16"),
        VariantKind("gguf-q4_0", "gguf", "Q4_0", False, None, "gguf", "merged model, GGUF Q4_0"),
        VariantKind("gguf-lora", "gguf-lora", "float32", True, "gguf-f16", "gguf", "the chain as LoRA GGUF files"),
    )
}
ALIASES = {"gguf-q8_0": "merged-int8", "int8": "merged-int8"}


def canonical_kind(name: str) -> VariantKind:
    """The kind called ``name`` (or one of its aliases); ExportError naming the known kinds otherwise."""
    text = str(name).strip().lower()
    kind = KINDS.get(ALIASES.get(text, text))
    if kind is None:
        known = ", ".join([*KINDS, *ALIASES])
        raise ExportError(f"variant must be one of {known}; got {name!r}")
    return kind
