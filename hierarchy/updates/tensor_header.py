"""Tensor shapes from a safetensors file's bytes, without torch or the safetensors package.

A safetensors file starts with an 8-byte little-endian header length N and N bytes
of JSON: ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``.
Reading only that header lets the pure verifier compare an adapter's real LoRA
shapes with what its manifest declares.
"""

from __future__ import annotations

import json
import re

from hierarchy.errors import ShapeMismatchError

__all__ = ["lora_shapes", "read_tensor_shapes"]

_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_PEFT_PREFIX = "base_model.model."
# Same key grammar as nodes.store.adapters: <module>.lora_A[.<adapter>].weight
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def read_tensor_shapes(data: bytes, name: str = "file") -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from safetensors bytes; ShapeMismatchError when unreadable."""
    if len(data) < 8:
        raise ShapeMismatchError(f"{name}: too short to be a safetensors file", file=name)
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER):
        raise ShapeMismatchError(f"{name}: safetensors header length {n} exceeds the file", file=name)
    try:
        header = json.loads(data[8 : 8 + n])
        return {key: tuple(int(d) for d in info["shape"]) for key, info in header.items() if key != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ShapeMismatchError(f"{name}: unreadable safetensors header: {exc}", file=name) from exc


def lora_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module: {"A": shape, "B": shape}}`` for the LoRA tensors among ``shapes``."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        m = _LORA_KEY.match(name)
        if m:
            out.setdefault(m["module"], {})[m["which"]] = shape
    return out
