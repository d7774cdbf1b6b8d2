"""One chain adapter as a LoRA GGUF file, written the way llama.cpp's convert_lora_to_gguf.py writes it.

Reference: ``LoraModel`` in convert_lora_to_gguf.py. The file carries ``general.type =
adapter``, ``adapter.type = lora`` and ``adapter.lora.alpha``; for every adapted linear layer
``<gguf name>.lora_a`` (A, [r, in]) and ``<gguf name>.lora_b`` (B, [out, r]), F32 (the
converter's default ``--outtype f32``). The converter runs the base model's
``modify_tensors`` on the (A, B) pair, so for ``q_proj``/``k_proj`` the permutation of the
weight's rows lands on B's rows; we do the same. llama.cpp scales each layer by
``alpha / rank`` (rank read from the tensor), which is PEFT's scale; where a layer's scale
differs (PEFT ``rank_pattern``/``alpha_pattern``) the difference is folded into B so the
product stays exact.

A node's chain becomes one such file per chain element, applied together at scale 1.0
(``llama-cli -m base.gguf --lora a.gguf --lora b.gguf``): the sum of their deltas is the
node's effective weight, exactly as TreeLM serves it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nodes.build.variants.gguf_model import gguf_hparams, llama_permute
from nodes.errors import ExportError
from nodes.store.adapters import AdapterWeights

__all__ = ["write_gguf_lora"]

Progress = Callable[[int, int], None]


def write_gguf_lora(
    adapter: AdapterWeights, base_dir: Path, out: Path, *, name: str, progress: Progress | None = None
) -> int:
    """Write ``adapter`` (over the base at ``base_dir``) as a LoRA GGUF file; returns the tensor count."""
    import gguf

    hp = gguf_hparams(base_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["blocks"])
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    alpha = float(adapter.alpha)
    total = len(adapter.factors)
    for done, (module, f) in enumerate(sorted(adapter.factors.items()), 1):
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(f"adapter layer {module!r} has no GGUF name for a llama model")
        a, b = f.A.detach().float().cpu(), f.B.detach().float().cpu()
        llama_scale = alpha / f.rank
        if abs(f.scale - llama_scale) > 1e-12 * max(1.0, abs(f.scale)):
            b = b * (f.scale / llama_scale)
        if module.endswith("q_proj"):
            b = llama_permute(b, hp["heads"], hp["heads"])
        elif module.endswith("k_proj"):
            b = llama_permute(b, hp["heads"], hp["kv_heads"])
        f32 = gguf.GGMLQuantizationType.F32
        writer.add_tensor(target + ".lora_a", gguf.quants.quantize(a.contiguous().numpy(), f32), raw_dtype=f32)
        writer.add_tensor(target + ".lora_b", gguf.quants.quantize(b.contiguous().numpy(), f32), raw_dtype=f32)
        if progress:
            progress(done, total)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    gguf.Metadata(name=name).set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return 2 * total
