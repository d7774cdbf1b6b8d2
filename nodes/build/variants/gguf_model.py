"""A merged model as one GGUF file, written the way llama.cpp's convert_hf_to_gguf.py writes it.

The reference is llama.cpp's converter (``ModelBase.prepare_tensors``, ``TextModel``'s
``set_gguf_parameters``, ``get_vocab_base`` and ``_set_vocab_gpt2``, ``LlamaModel``); every
byte is written by the ``gguf`` package (``GGUFWriter``, ``TensorNameMap``, ``quants``,
``SpecialVocab``, ``Metadata``), never by hand:

* hyper-parameters under ``llama.*`` (blocks, context, sizes, heads, rope, norm epsilon,
  vocabulary size, rope dimensions) and ``general.file_type``;
* the vocabulary: token list with types (NORMAL, CONTROL for special added tokens,
  USER_DEFINED for other added tokens, UNUSED ``[PAD<i>]`` up to ``vocab_size``), merges,
  special token ids, chat template, ``add_bos``/``add_eos`` as the tokenizer really does,
  and the pre-tokenizer name (see :func:`tokenizer_pre`);
* tensors renamed by ``TensorNameMap``; ``q_proj``/``k_proj`` rows permuted into GGML's
  rotary layout (``LlamaModel.permute``); 1-D tensors and norms F32, the rest in the file's
  type (F16, Q8_0, Q4_0 via ``gguf.quants``; a tensor the type cannot hold falls back to F16
  as the converter does); in Q4_0 files the token embedding stays Q8_0, as llama-quantize
  keeps the output tensor at a higher precision. A tied output head is not written
  (llama.cpp ties it to the token embedding itself).

Llama-architecture models with a byte-level BPE tokenizer are supported (TreeLM's tiny bases,
SmolLM2); anything else is refused with an ExportError naming what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nodes.errors import ExportError

__all__ = [
    "GGUF_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "gguf_hparams",
    "llama_permute",
    "tokenizer_pre",
    "write_gguf_model",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}
Progress = Callable[[int, int], None]


def llama_permute(weights: Any, n_head: int, n_head_kv: int | None) -> Any:
    """convert_hf_to_gguf's ``LlamaModel.permute``: HF's rotary halves -> GGML's interleaved pairs (rows)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tokenizer_pre(model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (``tokenizer.ggml.pre``), read from tokenizer.json.

    llama.cpp recognises a pre-tokenizer by hashing the tokens of a test string, which only
    works for published vocabularies; TreeLM's tiny bases train their own. Both pre-tokenizers
    TreeLM's bases use are recognised by their structure instead: byte-level BPE with GPT-2's
    split regex (``gpt-2``), and the same after single-digit splitting (``smollm``).
    """
    file = model_dir / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"GGUF needs the base's tokenizer.json: cannot read {file}: {exc}") from exc
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            f"{file}: GGUF variants need a byte-level BPE tokenizer (tokenizer.ggml.model gpt2); "
            f"this one is {model.get('type')!r} with decoder {(spec.get('decoder') or {}).get('type')!r}"
        )
    if spec.get("normalizer") is not None:
        raise ExportError(f"{file}: a tokenizer normalizer has no GGUF equivalent in TreeLM's writer")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def byte_level(step: dict[str, Any]) -> bool:
        return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")

    if len(steps) == 1 and byte_level(steps[0]):
        return "gpt-2"
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and byte_level(steps[1])
    ):
        return "smollm"
    raise ExportError(
        f"{file}: pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows by structure "
        "(supported: byte-level BPE with GPT-2 splitting, optionally after single-digit splitting)"
    )


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"GGUF variants support {', '.join(SUPPORTED_ARCHITECTURES)}; the base is {arch}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ExportError(
            f"rope scaling {rope.get('rope_type') or rope.get('type')!r} is not written to GGUF by TreeLM"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ExportError("Llama bases with attention or MLP biases are not written to GGUF by TreeLM")
    return config


def gguf_hparams(model_dir: Path) -> dict[str, Any]:
    """What the GGUF writers need from config.json (refusing architectures they cannot write)."""
    config = _config(model_dir)
    heads = int(config["num_attention_heads"])
    rope = config.get("rope_parameters") or {}
    return {
        "config": config,
        "blocks": int(config["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or config["hidden_size"] // heads),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def _add_parameters(writer: Any, gguf: Any, hp: dict[str, Any], file_type: str) -> None:
    """TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters for a plain Llama."""
    c = hp["config"]
    writer.add_block_count(hp["blocks"])
    writer.add_context_length(int(c["max_position_embeddings"]))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    if c.get("head_dim") is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[file_type]))
    writer.add_vocab_size(int(c["vocab_size"]))
    writer.add_rope_dimension_count(hp["head_dim"])


def _does_token_look_special(token: str) -> bool:
    # TextModel.does_token_look_special
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _add_vocab(writer: Any, gguf: Any, model_dir: Path, vocab_size: int) -> None:
    """TextModel.get_vocab_base + _set_vocab_gpt2, and add_bos/add_eos as the tokenizer behaves."""
    from transformers import AutoTokenizer

    pre = tokenizer_pre(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())}, beyond vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = str(tokenizer.decode(tokenizer.encode(token, add_special_tokens=False)))
            if decoder[i].special or _does_token_look_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # Say what the tokenizer really does: llama.cpp would otherwise guess from the vocabulary type.
    probe = tokenizer("a").input_ids
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1
    special.add_to_gguf(writer, quiet=True)


def _tensor_type(gguf: Any, name: str, data: np.ndarray, file_type: str) -> Any:
    """ModelBase.prepare_tensors' choice of type for one tensor."""
    t = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or name[-7:] != ".weight":
        return t.F32
    if file_type == "Q4_0" and name in ("token_embd.weight", "output.weight"):
        return t.Q8_0
    return getattr(t, file_type)


def _tensors(state: dict[str, Any], hp: dict[str, Any], gguf: Any) -> Iterator[tuple[str, np.ndarray]]:
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["blocks"])
    for name, tensor in state.items():
        if name.endswith(".rotary_emb.inv_freq") or (hp["tied"] and name == "lm_head.weight"):
            continue
        data = tensor.detach().float().cpu()
        if name.endswith("q_proj.weight"):
            data = llama_permute(data, hp["heads"], hp["heads"])
        elif name.endswith("k_proj.weight"):
            data = llama_permute(data, hp["heads"], hp["kv_heads"])
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"tensor {name!r} has no GGUF name for a llama model")
        yield new, data.numpy()


def write_gguf_model(
    model: Any, model_dir: Path, out: Path, file_type: str, *, name: str, progress: Progress | None = None
) -> dict[str, int]:
    """Write ``model`` (an in-memory Llama whose config and tokenizer are in ``model_dir``) to ``out``.

    Returns the count of tensors per GGML type. ``progress(done, total)`` is called per tensor.
    """
    import gguf

    if file_type not in GGUF_TYPES:
        raise ExportError(f"GGUF file type must be one of {', '.join(GGUF_TYPES)}, got {file_type!r}")
    hp = gguf_hparams(model_dir)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    state = dict(model.state_dict())
    total = len(state)
    counts: dict[str, int] = {}
    for done, (new, data) in enumerate(_tensors(state, hp, gguf), 1):
        qtype = _tensor_type(gguf, new, data, file_type)
        try:
            raw = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # e.g. a row size the block type cannot hold: the converter's fallback
            qtype = gguf.GGMLQuantizationType.F16
            raw = gguf.quants.quantize(data, qtype)
        writer.add_tensor(new, raw, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        if progress:
            progress(done, total)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata = gguf.Metadata(name=name)
    metadata.size_label = gguf.size_label(*writer.get_total_parameter_count())
    metadata.set_gguf_meta_model(writer)
    _add_parameters(writer, gguf, hp, file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, gguf, model_dir, int(hp["config"]["vocab_size"]))
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return counts
