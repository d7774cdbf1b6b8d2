"""The running batch's KV cache: one left-padded Hugging Face DynamicCache, rows joining and leaving.

Every row keeps its own keys and values (a per-request cache); rows are
right-aligned so that each decode step appends one column for all of them.
A joining row is left-padded to the batch's length (or the batch to its);
a leaving row is dropped, and columns that are padding in every remaining row
are trimmed. Padding never enters attention: ``mask`` excludes it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from nodes.errors import BaseModelError

if TYPE_CHECKING:  # transformers is imported by whoever makes the cache (keeps `import nodes` light)
    from transformers import DynamicCache

__all__ = ["BatchKV", "check_supported", "left_pad_batch"]


def check_supported(config) -> None:
    """The engine's cache handling assumes full attention in every layer (Llama, SmolLM2, Qwen2, ...)."""
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = any(t != "full_attention" for t in layer_types) or (
        not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    )
    if sliding:
        raise BaseModelError("the engine supports full-attention models only, not sliding-window attention")


def left_pad_batch(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], mask [B, T])`` with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """True token positions [B, T] of a left-padded mask (padding gets 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class BatchKV:
    """Keys/values of the running rows plus which columns are real tokens."""

    cache: DynamicCache  # per layer keys/values [B, kv_heads, T, head_dim]
    mask: torch.Tensor  # [B, T] int64: 1 = a real token of that row, 0 = left padding

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attention_mask [B, T+1], position_ids [B, 1])`` for one decode step."""
        mask = F.pad(self.mask, (0, 1), value=1)
        return mask, self.mask.sum(-1, keepdim=True)

    def after_step(self, step_mask: torch.Tensor) -> None:
        self.mask = step_mask

    def merge(self, other: BatchKV) -> None:
        """Append ``other``'s rows (left-padding whichever side is shorter)."""
        width = max(self.width, other.width)
        mine_layers: list[Any] = list(self.cache.layers)  # full-attention layers: .keys/.values [B, H, T, D]
        their_layers: list[Any] = list(other.cache.layers)
        for mine, theirs in zip(mine_layers, their_layers, strict=False):
            mine.keys = torch.cat([_pad_seq(mine.keys, width), _pad_seq(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad_seq(mine.values, width), _pad_seq(theirs.values, width)], dim=0)
        self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(other.mask, (width - other.width, 0))])

    def split(self, rows: Sequence[int]) -> BatchKV:
        """Move ``rows`` (in that order) out into a BatchKV of their own; this one keeps the others."""
        cache = copy.copy(self.cache)  # a new cache object whose layers are new objects too
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        moved = BatchKV(cache, self.mask)
        moved.keep(rows)  # index_select copies: nothing is shared with this batch's tensors
        leaving = set(rows)
        self.keep([i for i in range(self.rows) if i not in leaving])
        return moved

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order) and trim all-padding columns on the left."""
        index = torch.tensor(list(rows), dtype=torch.long)
        mask = self.mask.index_select(0, index)
        real = mask.sum(-1)
        drop = int(self.width - real.max()) if len(rows) else self.width
        self.mask = mask[:, drop:]
        layers: list[Any] = list(self.cache.layers)
        for layer in layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, drop:]
            layer.values = layer.values.index_select(0, index)[:, :, drop:]


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad [B, H, T, D] along T to ``width``."""
    extra = width - t.shape[2]
    return F.pad(t, (0, 0, extra, 0)) if extra else t
