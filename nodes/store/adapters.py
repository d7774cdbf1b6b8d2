"""Read and write LoRA adapters in PEFT's on-disk format (safetensors + adapter_config.json).

Internally an adapter is a map from a linear layer's module name in the base
model (``model.layers.0.self_attn.q_proj``) to its :class:`LoraFactors`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hierarchy.chain import LoraFactors
from nodes.errors import AdapterError, IntegrityError
from nodes.store.digest import sha256_file

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterWeights",
    "find_adapter_dir",
    "read_adapter",
    "write_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter: its settings and the factors of every layer it adapts."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]
    factors: Mapping[str, LoraFactors] = field(repr=False)  # module name -> factors
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def nbytes(self) -> int:
        return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size() for f in self.factors.values())

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.factors.values()), default=0)


def find_adapter_dir(path: str | Path) -> Path:
    """The folder that holds adapter_config.json: ``path`` itself, or its single sub-folder.

    PEFT saves an adapter with a non-default name into a sub-folder of that name.
    """
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if path.is_dir():
        subs = [p for p in path.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file()]
        if len(subs) == 1:
            return subs[0]
    raise AdapterError(f"no PEFT adapter ({ADAPTER_CONFIG}) found in {path}")


def _pattern_value(patterns: Mapping[str, float] | None, module: str, default: float) -> float:
    # PEFT matches pattern keys as regex suffixes of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(
    path: str | Path, *, expected_sha256: Mapping[str, str] | None = None, dtype: torch.dtype = torch.float32
) -> AdapterWeights:
    """Load an adapter dir; with ``expected_sha256`` ({file name: sha256}) every file is verified first."""
    folder = find_adapter_dir(path)
    if expected_sha256:
        for name, digest in expected_sha256.items():
            file = folder / name
            if not file.is_file():
                raise IntegrityError(f"{file} is missing (expected sha256 {digest[:12]}...)")
            actual = sha256_file(file)
            if actual != digest:
                raise IntegrityError(
                    f"{file} has sha256 {actual[:12]}..., expected {digest[:12]}...: the file was changed on disk"
                )
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read {folder / ADAPTER_CONFIG}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: only LoRA adapters are supported, got {config.get('peft_type')}")
    if config.get("use_rslora") or config.get("use_dora"):
        raise AdapterError(f"{folder}: rsLoRA and DoRA adapters are not supported")
    weights_file = folder / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise AdapterError(f"{folder}: missing {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise AdapterError(f"cannot read {weights_file}: {exc}") from exc
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        m = _KEY_RE.match(name)
        if not m:
            continue  # e.g. modules_to_save or bias entries; not part of the low-rank term
        pairs.setdefault(m["module"], {})[m["which"]] = tensor.to(dtype)
    factors: dict[str, LoraFactors] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_file}: module {module} lacks lora_{'A' if 'A' not in ab else 'B'}")
        mod_r = int(_pattern_value(config.get("rank_pattern"), module, r))
        mod_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        factors[module] = LoraFactors(A=ab["A"], B=ab["B"], scale=mod_alpha / mod_r)
    if not factors:
        raise AdapterError(f"{weights_file}: no LoRA weights found")
    targets = config.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in factors})
    if isinstance(targets, str):
        targets = sorted({m.rsplit(".", 1)[-1] for m in factors})
    return AdapterWeights(
        r=r,
        alpha=alpha,
        target_modules=tuple(targets),
        factors=factors,
        dropout=float(config.get("lora_dropout", 0.0)),
    )


def write_adapter(
    adapter: AdapterWeights,
    path: str | Path,
    *,
    base_model_name_or_path: str | None = None,
) -> dict[str, str]:
    """Write ``adapter`` as a PEFT LoRA adapter dir; returns {file name: sha256}.

    Every module's factors must have rank ``adapter.r`` and scale ``alpha / r``;
    pad or pre-scale before writing (see hierarchy.chain.pad_rank / flatten_chain).
    """
    from peft import LoraConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, f in adapter.factors.items():
        if f.rank != adapter.r:
            raise AdapterError(f"module {module} has rank {f.rank}, adapter rank is {adapter.r}")
        if abs(f.scale - adapter.scale) > 1e-12 * max(1.0, abs(adapter.scale)):
            raise AdapterError(f"module {module} has scale {f.scale}, adapter scale is {adapter.scale}")
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = f.A.detach().contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = f.B.detach().contiguous().cpu()
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft annotates int, but only divides it by r: floats work
        lora_dropout=adapter.dropout,
        target_modules=sorted(adapter.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(path))
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return {name: sha256_file(path / name) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
