"""Base models: make the tiny random Llama used by tests, resolve and load a base dir.

Every base is an ordinary Hugging Face model directory loadable offline by
stock ``transformers.AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nodes.errors import BaseModelError
from nodes.store.digest import dir_digest

if TYPE_CHECKING:  # transformers is imported where a model is loaded, not with this module
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_TOKENIZER_TEXT",
    "LoadedBase",
    "TinyBaseConfig",
    "base_digest",
    "load_base",
    "make_tiny_base",
]

# ChatML, as SmolLM2 uses, so chat requests work the same on the tiny base.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_TOKENIZER_TEXT = (
    "TreeLM serves a tree of language models. The base model sits at the root; language models, "
    "domain models and sub-domain models sit below it. The patient was admitted with chest pain. "
    "The radiologist reviewed the scan. The contract was signed by both parties. "
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\"
)

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@dataclass(frozen=True)
class TinyBaseConfig:
    """Sizes of a tiny random Llama (tests build these in seconds)."""

    hidden: int = 64
    layers: int = 2
    vocab: int = 512
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_position: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "vocab", "heads", "kv_heads", "intermediate", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BaseModelError(f"tiny base: {name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise BaseModelError(f"tiny base: hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise BaseModelError(f"tiny base: heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.vocab < 300:
            raise BaseModelError(f"tiny base: vocab must be >= 300 (256 bytes + merges), got {self.vocab}")


@dataclass
class LoadedBase:
    """A base model in memory with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    digest: str


def _train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_base(out: str | Path, config: TinyBaseConfig = TinyBaseConfig(), texts: Iterable[str] = ()) -> Path:
    """Write a random Llama + byte-level BPE tokenizer to ``out`` (atomically)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    corpus = [t for t in texts if t.strip()] or [DEFAULT_TOKENIZER_TEXT]
    tokenizer = _train_tokenizer(corpus, config.vocab)
    if len(tokenizer) > config.vocab:
        raise BaseModelError(f"tokenizer has {len(tokenizer)} tokens, more than vocab={config.vocab}")
    llama = LlamaConfig(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        model = LlamaForCausalLM(llama)
        # A larger init than HF's default 0.02 gives the random model non-trivial logits.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 0.08)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "treelm_base.json").write_text(
            json.dumps({"kind": "tiny", "config": config.__dict__}, indent=2, sort_keys=True)
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def base_digest(path: str | Path) -> str:
    """sha256 over the base dir's files (weights, config, tokenizer)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path} is not a model directory (no config.json)")
    return dir_digest(path)


def load_base(path: str | Path, *, dtype: str = "float32", digest: str | None = None) -> LoadedBase:
    """Load a base dir offline; when ``digest`` is given the files must match it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BaseModelError(f"base model directory not found or incomplete: {path}")
    actual = base_digest(path)
    if digest is not None and actual != digest:
        raise BaseModelError(
            f"base at {path} has digest {actual[:12]}..., expected {digest[:12]}...: "
            "this tree was built over a different base"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load base model from {path}: {exc}") from exc
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(model=model, tokenizer=tokenizer, path=path, digest=actual)
