"""What a fine-tuning job asks for, checked before anything is stored.

``hyperparameters`` take OpenAI's names and values (``"auto"`` keeps the server's default) plus
two of ours: ``n_epochs`` (1..``customize.max_epochs``), ``learning_rate_multiplier`` (times the
default learning rate), ``learning_rate`` (absolute), ``lora_rank`` (1..``customize.max_rank``) and
``batch_size``. Anything else is refused with its name. The new node is ``parent/suffix``: the
suffix is one node-path segment (lower-case letters, digits, ``-`` and ``_``), and the parent must
have room below it (a sub-domain node is the deepest level).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cluster.errors import BadArgument
from cluster.updates.policy import CustomizePolicy
from hierarchy.ids import MAX_NODE_ID_SEGMENTS, SEGMENT_PATTERN, Level, NodeId

__all__ = ["Hyperparameters", "new_node_id", "parse_hyperparameters"]

_SEGMENT = re.compile(rf"^{SEGMENT_PATTERN}$")
_LEVELS = (Level.LANGUAGE, Level.DOMAIN, Level.SUBDOMAIN)


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int
    learning_rate: float
    lora_rank: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Hyperparameters:
        return cls(int(obj["n_epochs"]), float(obj["learning_rate"]), int(obj["lora_rank"]), int(obj["batch_size"]))


def _int(name: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise BadArgument(f"hyperparameters.{name}", f"must be an integer from 1 to {high} or 'auto', got {value!r}")
    return value


def _float(name: str, value: Any, low: float, high: float) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not low < value <= high:
        raise BadArgument(
            f"hyperparameters.{name}", f"must be a number in ({low:g}, {high:g}] or 'auto', got {value!r}"
        )
    return float(value)


def parse_hyperparameters(obj: Mapping[str, Any] | None, policy: CustomizePolicy) -> Hyperparameters:
    """The job's hyperparameters over the policy's defaults; BadArgument naming the field otherwise."""
    values = {k: v for k, v in dict(obj or {}).items() if v is not None and v != "auto"}
    known = ("n_epochs", "learning_rate_multiplier", "learning_rate", "lora_rank", "batch_size")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BadArgument(f"hyperparameters.{unknown[0]}", f"unknown hyperparameter (known: {', '.join(known)})")
    if "learning_rate" in values and "learning_rate_multiplier" in values:
        raise BadArgument("hyperparameters.learning_rate", "give learning_rate or learning_rate_multiplier, not both")
    lr = policy.learning_rate
    if "learning_rate_multiplier" in values:
        lr *= _float("learning_rate_multiplier", values["learning_rate_multiplier"], 0.0, 10.0)
    if "learning_rate" in values:
        lr = _float("learning_rate", values["learning_rate"], 0.0, 0.1)
    return Hyperparameters(
        n_epochs=_int("n_epochs", values.get("n_epochs", policy.n_epochs), policy.max_epochs),
        learning_rate=lr,
        lora_rank=_int("lora_rank", values.get("lora_rank", policy.lora_rank), policy.max_rank),
        batch_size=_int("batch_size", values.get("batch_size", policy.batch_size), 64),
    )


def new_node_id(parent: str, suffix: object) -> tuple[str, Level]:
    """``parent/suffix`` and its level; BadArgument naming ``suffix`` (or ``model``) otherwise."""
    if not isinstance(suffix, str) or not _SEGMENT.match(suffix):
        raise BadArgument(
            "suffix",
            f"must be one node name segment: lower-case letters, digits, '-' and '_', starting with a letter or "
            f"digit, at most 63 characters, e.g. 'st-marys-oncology'; got {str(suffix)[:80]!r}",
        )
    key = NodeId.parse(parent)
    depth = 0 if key.is_base else len(str(key.path).split("/"))
    if depth + 1 >= MAX_NODE_ID_SEGMENTS:
        raise BadArgument(
            "model", f"{parent} is a {Level.SUBDOMAIN.value} node, the deepest level: fine-tune its parent instead"
        )
    return f"{parent}/{suffix}", _LEVELS[depth]
