"""Serving precision of a base model: fp32, bf16, or int8 weight-only (bf16 activations).

    precision = resolve_precision("auto")     # "bf16" on a CPU with bf16 instructions, else "fp32"
    apply_precision(model, precision)         # converts the model in place

- ``fp32``: the weights as trained; the engine's tokens equal the merged model's exactly.
- ``bf16``: every weight and activation in bfloat16. Decoding one row is memory-bound, so halving
  the bytes read per step about halves a step's time; several rows run on the CPU's bf16 units
  (AVX512-BF16 / AMX) where fp32 has none.
- ``int8``: the linear layers' weights in int8 with one scale per output channel (symmetric
  absmax), activations and everything else in bf16. The product is ``torch._weight_int8pack_mm``,
  ATen's CPU kernel for exactly this (int8 weights, bf16 rows, per-channel scales); it reads a
  quarter of fp32's bytes. torchao's ``Int8WeightOnlyConfig`` was measured here too: without
  ``torch.compile`` its linear dequantizes the weight to bf16 on every call, slower than plain bf16.

Adapters are applied in the model's activation dtype (the bank lays them out in it), and logits
are read as fp32 before sampling, so logprobs and penalties keep fp32 arithmetic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nodes.errors import BaseModelError

__all__ = ["PRECISIONS", "Int8Linear", "apply_precision", "bf16_supported", "precision_of", "resolve_precision"]

PRECISIONS = ("fp32", "bf16", "int8")
# ATen's int8 kernel reads the reduction dimension in blocks; other widths stay in bf16.
_INT8_K_MULTIPLE = 32


def bf16_supported() -> bool:
    """True where bf16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    cpu: Any = torch.backends.cpu
    capability = str(cpu.get_cpu_capability()) if hasattr(cpu, "get_cpu_capability") else ""
    if capability not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(name: str) -> str:
    """``fp32``/``bf16``/``int8`` as given; ``auto``: bf16 where :func:`bf16_supported`, else fp32."""
    if name == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if name not in PRECISIONS:
        raise BaseModelError(f"precision must be one of {', '.join(PRECISIONS)} or auto, got {name!r}")
    return name


class Int8Linear(torch.nn.Linear):
    """A linear layer whose weight is int8 with a bf16 scale per output row (weight-only quantization).

    A subclass of ``nn.Linear`` so that code looking for linear layers (the adapter bank) finds it;
    ``weight`` is the dequantized weight, computed when asked (nothing on the forward path asks).
    """

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w = linear.weight.detach().to(torch.float32)
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(torch.bfloat16), False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.qweight.to(torch.bfloat16) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def _replace_linears(module: torch.nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear and child.in_features % _INT8_K_MULTIPLE == 0:
            setattr(module, name, Int8Linear(child))
            count += 1
        else:
            count += _replace_linears(child)
    return count


def apply_precision(model: Any, precision: str) -> int:
    """Convert ``model`` in place to ``precision``; returns the number of int8 layers converted now.

    A model already at ``precision`` is left as it is; one at another precision than fp32 is
    refused (converting again would compound the rounding). For int8 a head tied to the input embedding gets its own quantized copy: the embedding
    stays bf16 (a lookup reads one row; the head reads every row every step).
    """
    precision = resolve_precision(precision)
    current = precision_of(model)
    if current == precision:
        return 0
    if current != "fp32":
        raise BaseModelError(f"the model is already {current}; load it again to serve it as {precision}")
    if precision == "bf16":
        model.to(torch.bfloat16)
        return 0
    # Quantized from the fp32 weights, before the rest of the model goes to bf16.
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and head.weight is model.get_input_embeddings().weight:
        untied = torch.nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        untied.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        untied.bias = head.bias
        model.set_output_embeddings(untied)
        model.config.tie_word_embeddings = False
    count = _replace_linears(model)
    model.to(torch.bfloat16)  # embeddings, norms, scales and biases; int8 buffers keep their dtype
    return count


def precision_of(model: torch.nn.Module) -> str:
    """What a model is served in: int8 if any layer is :class:`Int8Linear`, else its parameters' dtype."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8"
    dtype = next(iter(model.parameters())).dtype
    return "bf16" if dtype == torch.bfloat16 else "fp32" if dtype == torch.float32 else str(dtype)
