"""Int8 variant of a merged model: int8 linear weights on disk and in memory, no pickle.

Every ``nn.Linear`` except the output head gets symmetric per-output-channel
int8 weights (``w ~ q * scale``, q in [-127, 127]); the head, embeddings and
norms stay float (tied embeddings stay tied). Two ways to run the same file:

* ``activations="float"`` (default): :class:`Int8Linear` keeps the int8 weights
  resident and dequantizes them inside each matmul (weight-only int8). On the
  demo's SmolLM2 radiology node: perplexity 22.16 -> 22.25 (+0.4%), same greedy text.
* ``activations="int8"``: torch's own dynamic quantization
  (``torch.ao.nn.quantized.dynamic.Linear``: activations quantized per batch to
  7-8 bits, int8 GEMMs). SmolLM2 has large activation outliers (down_proj inputs
  above all), so this costs far more there (perplexity 22.2 -> 125); fine on
  models without outliers (the tiny test bases stay within 5%).

On disk (``save_int8``): ``config.json`` + tokenizer files + ``model.int8.safetensors``
holding per quantized layer ``<name>.weight_int8`` [out, in] int8,
``<name>.weight_scale`` [out] float32 and ``<name>.bias`` [out] (if any), plus every
other float tensor under its state-dict name; ``quantization.json`` names the layers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nodes.errors import ExportError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["ACTIVATIONS", "INT8_RECORD", "INT8_WEIGHTS", "Int8Linear", "load_int8", "quantize_weight", "save_int8"]

INT8_WEIGHTS = "model.int8.safetensors"
INT8_RECORD = "quantization.json"
ACTIVATIONS = ("float", "int8")
_METHOD = "int8 weights, symmetric per output channel (q in [-127, 127], scale = max|w| / 127)"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [out, in] int8, scale [out] float32)`` with ``weight ~ q * scale[:, None]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer with resident int8 weights, dequantized per matmul (weight-only int8)."""

    weight_int8: torch.Tensor  # buffers, declared for the type checker
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = int(q.shape[1]), int(q.shape[0])
        self.register_buffer("weight_int8", q)  # [out, in] int8
        self.register_buffer("weight_scale", scale)  # [out] float32
        self.register_buffer("bias", bias)  # [out] or None

    @property
    def weight(self) -> torch.Tensor:  # [out, in], dequantized (HF code may read .weight.dtype)
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def _targets(model: PreTrainedModel) -> list[str]:
    head = model.get_output_embeddings()  # the head stays float: it is tied to the embeddings
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def save_int8(model: PreTrainedModel, out: str | Path) -> list[str]:
    """Write ``model`` (float) with int8 linear weights to ``out``; returns the quantized layer names."""
    out = Path(out)
    names = _targets(model)
    if not names:
        raise ExportError("the model has no linear layers to quantize")
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        q, scale = quantize_weight(modules[name].weight)
        tensors[f"{name}.weight_int8"] = q.contiguous()
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        if modules[name].bias is not None:
            tensors[f"{name}.bias"] = modules[name].bias.detach().float().contiguous()
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if any(key.startswith(n + ".") for n in names):
            continue
        if value.data_ptr() in seen:  # tied weights are stored once; tie_weights() restores them
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().contiguous()
    save_file(tensors, str(out / INT8_WEIGHTS), metadata={"format": "pt", "treelm": "int8-weights"})
    model.config.save_pretrained(out)
    record = {
        "method": _METHOD,
        "activations": list(ACTIVATIONS),
        "torch": torch.__version__,
        "quantized_layers": names,
    }
    (out / INT8_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return names


def _dynamic_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, still shipped
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        layer = DynamicLinear(q.shape[1], q.shape[0], bias_=bias is not None, dtype=torch.qint8)
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        layer.set_weight_bias(weight, bias)
    return layer


def load_int8(path: str | Path, *, activations: str = "float") -> tuple[nn.Module, Any]:
    """Load an int8 export: ``(model, tokenizer)``, ready for ``model.generate``.

    ``activations``: ``"float"`` (weight-only int8, default) or ``"int8"`` (torch dynamic quantization).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if activations not in ACTIVATIONS:
        raise ExportError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    path = Path(path)
    for name in ("config.json", INT8_WEIGHTS, INT8_RECORD):
        if not (path / name).is_file():
            raise ExportError(f"{path} is not an int8 export (no {name})")
    names = json.loads((path / INT8_RECORD).read_text())["quantized_layers"]
    tensors = load_file(str(path / INT8_WEIGHTS))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG as it was
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    float_tensors = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in names)}
    missing, unexpected = model.load_state_dict(float_tensors, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    missing = [k for k in missing if not any(k in (f"{n}.weight", f"{n}.bias") for n in names)]
    if missing or unexpected:
        raise ExportError(
            f"{path / INT8_WEIGHTS} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name in names:
        try:
            q, scale = tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"]
        except KeyError:
            raise ExportError(f"{path / INT8_WEIGHTS} lacks the int8 weights of {name}") from None
        bias = tensors.get(f"{name}.bias")
        layer = Int8Linear(q, scale, bias) if activations == "float" else _dynamic_linear(q, scale, bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
