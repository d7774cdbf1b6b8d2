"""Sizes, memory and speed estimates: pure arithmetic over a base's architecture facts.

    memory = weights + adapters + KV bytes/token x context x batch + runtime overhead

* weights: parameters x bytes of the serving dtype; variants with their own number
  format keep it (half-precision files 2 bytes, GGUF Q8_0/Q4_0 in GGML blocks; see
  :func:`weight_bytes`);
* adapters: the LoRA parameters a variant keeps beside the weights (chain, flat and
  LoRA GGUF variants; merged variants have none);
* KV cache: 2 (K and V) x layers x KV heads x head dim x dtype bytes per token;
* runtime overhead: a fixed allowance for the framework (CUDA context, allocator,
  interpreter) plus 10% of weights and adapters for activations and fragmentation.

Speed (decode, per sequence) is memory-bound: every step reads the weights,
the adapters and the KV cache once, so tokens/s ~= bandwidth / bytes read per
step; with a compute figure it is also capped at compute / (2 x parameters x batch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from registry.errors import InvalidHardware, InvalidMemorySize
from registry.records import BaseFacts

__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_DTYPE",
    "DEVICES",
    "DTYPE_BYTES",
    "FIT_BANDS",
    "HALF_KINDS",
    "MERGED_KINDS",
    "RUNTIME_OVERHEAD",
    "MemoryEstimate",
    "adapter_bytes",
    "classify_fit",
    "estimate_memory",
    "estimate_speed",
    "format_bytes",
    "kv_bytes_per_token",
    "max_context_that_fits",
    "parse_bandwidth",
    "parse_cache_size",
    "parse_compute",
    "parse_memory_size",
    "weight_bytes",
    "weights_format",
]

# The context a match estimates when the user asks for none (capped at each model's own limit).
DEFAULT_CONTEXT = 2048
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
DEVICES = ("cpu", "cuda", "mps")
# What each device computes in unless told otherwise: fp32 on CPU (PyTorch's fast path), fp16 on GPUs.
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "float16", "mps": "float16"}
_MIB = 1 << 20
RUNTIME_OVERHEAD = {"cpu": 256 * _MIB, "cuda": 512 * _MIB, "mps": 256 * _MIB}
ACTIVATION_SHARE_PERCENT = 10
# Utilisation upper bounds, as integer percentages so band edges compare exactly.
FIT_BANDS = (("perfect", 60), ("good", 85), ("marginal", 98))

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
_COMPUTE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([gtp]?)flops\s*$", re.IGNORECASE)


def parse_cache_size(text: str, *, field: str) -> int:
    """A cache bound: ``0`` or ``off`` turns the cache off, else a size as :func:`parse_memory_size` takes."""
    value = str(text).strip().lower()
    return 0 if value in ("0", "off") else parse_memory_size(value, field=field)


def parse_memory_size(text: str, *, field: str = "memory") -> int:
    """``512MiB``, ``8GiB``, ``8GB``, ``1.5 GiB`` -> bytes. Rejects ``eight gigs``, ``-1GiB``, ``0GB``, ``8``."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InvalidMemorySize(
            f"{field} {text!r} is not a size: use a positive number and a unit, e.g. 512MiB, 8GiB or 8GB",
            field=field,
        )
    value = math.floor(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise InvalidMemorySize(f"{field} {text!r} must be more than zero bytes", field=field)
    return value


def parse_bandwidth(text: str) -> float:
    """``50GB/s`` (or ``50GB``) -> bytes per second."""
    raw = str(text).strip()
    body = raw[:-2] if raw.lower().endswith("/s") else raw
    try:
        return float(parse_memory_size(body, field="bandwidth"))
    except InvalidMemorySize:
        raise InvalidHardware(
            f"bandwidth {text!r} is not a rate: use e.g. 50GB/s or 100GiB/s", field="bandwidth"
        ) from None


def parse_compute(text: str) -> float:
    """``10TFLOPS``, ``500GFLOPS`` -> FLOP/s."""
    match = _COMPUTE_RE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise InvalidHardware(f"compute {text!r} is not a rate: use e.g. 10TFLOPS or 500GFLOPS", field="compute")
    scale = {"": 1.0, "g": 1e9, "t": 1e12, "p": 1e15}[match.group(2).lower()]
    return float(match.group(1)) * scale


def format_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise InvalidHardware(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}", field="dtype") from None


def kv_bytes_per_token(base: BaseFacts, dtype: str) -> int:
    """K and V, for every layer and KV head: 2 x layers x kv_heads x head_dim x dtype bytes."""
    return 2 * base.layers * base.kv_heads * base.head_dim * _dtype_bytes(dtype)


# GGML block sizes: Q8_0 stores 32 weights in 34 bytes (int8 + an fp16 scale), Q4_0 in 18 bytes.
_Q8_0 = (34, 32)
_Q4_0 = (18, 32)
# Kinds whose weights keep their own number format whatever the device computes in.
HALF_KINDS = frozenset({"merged-fp16", "merged-bf16", "gguf-f16", "gguf-lora"})
MERGED_KINDS = frozenset({"merged", "merged-fp16", "merged-bf16", "merged-int8", "gguf-f16", "gguf-q4_0"})


def _blocks(count: int, block: tuple[int, int]) -> int:
    return -(-count * block[0] // block[1])


def weight_bytes(base: BaseFacts, kind: str, dtype: str) -> int:
    """Bytes of the model weights a variant keeps in memory.

    chain, flat, merged: every parameter in the serving dtype. merged-fp16/bf16, gguf-f16 and
    gguf-lora's base: 2 bytes each. merged-int8 (GGUF Q8_0, as llama.cpp holds it): every 2-D
    tensor, embeddings included, in Q8_0 blocks. gguf-q4_0: linear weights in Q4_0 blocks, the
    embeddings in Q8_0.
    """
    per = _dtype_bytes(dtype)
    if kind in HALF_KINDS:
        return base.parameter_count * 2
    if kind == "merged-int8":
        return _blocks(base.parameter_count, _Q8_0)
    if kind == "gguf-q4_0":
        rest = base.parameter_count - base.quantizable_parameter_count
        return _blocks(base.quantizable_parameter_count, _Q4_0) + _blocks(rest, _Q8_0)
    return base.parameter_count * per


_FORMATS = {
    "merged-fp16": "float16",
    "merged-bf16": "bfloat16",
    "gguf-f16": "GGUF F16",
    "gguf-lora": "GGUF F16",
    "merged-int8": "GGUF Q8_0",
    "gguf-q4_0": "GGUF Q4_0, embeddings Q8_0",
}


def weights_format(kind: str, dtype: str) -> str:
    """How a variant's weights are held: its own format, else the serving dtype."""
    return _FORMATS.get(kind, dtype)


def adapter_bytes(kind: str, adapter_parameters: int, dtype: str) -> int:
    """Bytes of the LoRA factors kept beside the weights: none when merged, float32 in LoRA GGUF files."""
    if kind in MERGED_KINDS:
        return 0
    return adapter_parameters * (4 if kind == "gguf-lora" else _dtype_bytes(dtype))


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory one variant needs on one device, in bytes, with its parts."""

    weights: int
    adapters: int
    kv_cache: int
    overhead: int
    kv_per_token: int
    context: int
    batch: int
    dtype: str

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.kv_cache + self.overhead

    @property
    def fixed(self) -> int:
        """Everything but the KV cache (what a shorter context cannot shrink)."""
        return self.weights + self.adapters + self.overhead


def estimate_memory(
    base: BaseFacts, kind: str, adapter_parameters: int, *, device: str, dtype: str, context: int, batch: int
) -> MemoryEstimate:
    if device not in RUNTIME_OVERHEAD:
        raise InvalidHardware(f"device {device!r} is not one of {', '.join(DEVICES)}", field="device")
    weights = weight_bytes(base, kind, dtype)
    adapters = adapter_bytes(kind, adapter_parameters, dtype)
    per_token = kv_bytes_per_token(base, dtype)
    overhead = RUNTIME_OVERHEAD[device] + (weights + adapters) * ACTIVATION_SHARE_PERCENT // 100
    return MemoryEstimate(
        weights=weights,
        adapters=adapters,
        kv_cache=per_token * context * batch,
        overhead=overhead,
        kv_per_token=per_token,
        context=context,
        batch=batch,
        dtype=dtype,
    )


def classify_fit(needed: int, available: int) -> str | None:
    """``perfect`` (<= 60% used), ``good`` (<= 85%), ``marginal`` (<= 98%), else None (does not fit)."""
    for band, percent in FIT_BANDS:
        if needed * 100 <= available * percent:
            return band
    return None


def max_context_that_fits(estimate: MemoryEstimate, available: int, percent: int = FIT_BANDS[-1][1]) -> int:
    """The longest context (tokens) whose estimate stays within ``percent`` of ``available``; 0 if none."""
    budget = available * percent // 100 - estimate.fixed
    per_context_token = estimate.kv_per_token * estimate.batch
    return max(0, budget // per_context_token) if budget > 0 else 0


def estimate_speed(
    estimate: MemoryEstimate,
    *,
    parameters: int,
    bandwidth: float | None,
    compute: float | None = None,
) -> float | None:
    """Decode tokens/s per sequence, or None when neither bandwidth nor compute is known."""
    rates = []
    if bandwidth:
        read_per_step = estimate.weights + estimate.adapters + estimate.kv_cache
        rates.append(bandwidth / read_per_step)
    if compute:
        rates.append(compute / (2.0 * parameters * estimate.batch))
    return min(rates) if rates else None
