"""GGUF variants: llama.cpp's conventions in the files (gguf's reader), stock transformers loads them, and
stock llama.cpp (llama-cpp-python, the `llama` extra) computes the same logits as torch for F32 files and
for the chain as LoRA files; quantized files are compared by perplexity and tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nodes.build.variants import VariantStore
from nodes.build.variants.check import agreement, engine_greedy, llama_available, llama_runner, load_llama, stock_runner
from nodes.build.variants.gguf_model import tokenizer_pre, write_gguf_model
from nodes.build.variants.writers import merged_model
from nodes.errors import ExportError
from tests.nodes.treefactory import RandomTreeSpec, make_random_tree

NODE = "rt/en/medical/cardiology"
TEXTS = ["The patient was admitted with chest pain.", "Room 12, bed 345: the scan.", "<|im_start|>user\nabc<|im_end|>"]
_NO_LLAMA = "llama-cpp-python is not installed (pip install 'treelm[llama]' or `make llama`)"


def needs_llama(test):
    return pytest.mark.llama(pytest.mark.skipif(not llama_available(), reason=_NO_LLAMA)(test))


@pytest.fixture(scope="module")
def tree_dir(tiny_base_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf") / "tree"
    make_random_tree(root, tiny_base_dir, RandomTreeSpec(init_scale=0.05))
    return root


@pytest.fixture(scope="module")
def store(tree_dir) -> VariantStore:
    return VariantStore(tree_dir)


def fields(file: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(file)
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    return kv, {t.name: t for t in reader.tensors}


def test_merged_gguf_files_follow_llama_cpps_converter(store, tiny_base_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    for kind, file_type, quant in (("gguf-f16", 1, "F16"), ("merged-int8", 7, "Q8_0"), ("gguf-q4_0", 2, "Q4_0")):
        kv, tensors = fields(store.build(NODE, kind).files("gguf")[0])
        assert kv["general.architecture"] == "llama" and kv["general.type"] == "model"
        assert kv["general.file_type"] == file_type and kv["general.name"] == NODE
        assert kv["llama.block_count"] == 2 and kv["llama.attention.head_count_kv"] == 2
        assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
        assert len(kv["tokenizer.ggml.tokens"]) == kv["llama.vocab_size"] == 400
        control = [i for i, t in enumerate(kv["tokenizer.ggml.token_type"]) if t == gguf.TokenType.CONTROL]
        assert control == sorted(
            tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"])
        )
        assert kv["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
        assert kv["tokenizer.ggml.add_bos_token"] is False
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        assert tensors["blk.1.ffn_down.weight"].tensor_type.name == quant
        assert tensors["token_embd.weight"].tensor_type.name == ("Q8_0" if quant == "Q4_0" else quant)
        assert "output.weight" in tensors  # the tiny base does not tie its head


def test_lora_gguf_files_carry_each_chain_adapter_with_its_alpha(store):
    artifact = store.build(NODE, "gguf-lora")
    chain = store.source(NODE).chain
    files = artifact.files("lora")
    assert len(files) == len(chain) == 3
    for file, node in zip(files, chain, strict=True):
        kv, tensors = fields(file)
        assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
        assert kv["adapter.lora.alpha"] == pytest.approx(node.lora["alpha"])
        a = next(t for n, t in tensors.items() if n.endswith(".lora_a"))
        assert a.tensor_type.name == "F32" and int(a.shape[1]) == node.lora["r"]  # GGUF shapes are reversed
        assert all(n.startswith("blk.") and n.endswith((".lora_a", ".lora_b")) for n in tensors)
    assert artifact.manifest.requires.kind == "gguf-f16"


def test_stock_transformers_loads_the_gguf_files_and_their_tokenizer(store, tiny_base_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    exact, _ = merged_model(store.source(NODE))
    ids = torch.tensor([tokenizer(TEXTS[0]).input_ids])
    with torch.no_grad():
        reference = exact(input_ids=ids).logits
    for kind, tolerance in (("gguf-f16", 0.01), ("merged-int8", 0.05), ("gguf-q4_0", 0.3)):
        artifact = store.build(NODE, kind)
        name = artifact.manifest.load["gguf"][0]
        model = AutoModelForCausalLM.from_pretrained(artifact.directory, gguf_file=name)
        loaded = AutoTokenizer.from_pretrained(artifact.directory, gguf_file=name)
        assert [loaded(t).input_ids for t in TEXTS] == [tokenizer(t).input_ids for t in TEXTS]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert (logits - reference).abs().max() < tolerance * reference.abs().max(), kind


def test_pre_tokenizers_llama_cpp_cannot_name_are_refused(tiny_base_dir, tmp_path):
    import json

    folder = tmp_path / "tok"
    shutil.copytree(tiny_base_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert tokenizer_pre(folder) == "gpt-2"
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="not one llama.cpp knows by structure"):
        tokenizer_pre(folder)


def _tied_copy(base_dir: Path, out: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def _llama_logprobs(runner, ids):
    return runner._llama_logprobs([*ids, 0])


def _torch_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()


@needs_llama
@pytest.mark.parametrize("tied", [False, True])
def test_llama_cpp_computes_torchs_logits_from_an_f32_gguf(tiny_base_dir, tmp_path, tied):
    base_dir = _tied_copy(tiny_base_dir, tmp_path / "tied") if tied else tiny_base_dir
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    file = tmp_path / "model-F32.gguf"
    write_gguf_model(model, Path(base_dir), file, "F32", name="tiny")
    assert ("output.weight" in fields(file)[1]) is not tied
    runner = load_llama(file)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert runner._model.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert np.abs(_llama_logprobs(runner, ids) - _torch_logprobs(model, ids)).max() < 2e-3


@needs_llama
def test_llama_cpp_applies_the_chain_as_lora_files_exactly(store, tmp_path):
    source = store.source(NODE)
    base, _ = merged_model(source.base_source)
    write_gguf_model(base, source.tree.base_dir, tmp_path / "base-F32.gguf", "F32", name="tiny")
    lora = store.build(NODE, "gguf-lora")
    runner = load_llama(tmp_path / "base-F32.gguf", lora.files("lora"))
    merged, tokenizer = merged_model(source)
    base_only = load_llama(tmp_path / "base-F32.gguf")
    for text in TEXTS[:2]:
        ids = tokenizer(text).input_ids
        expected = _torch_logprobs(merged, ids)
        assert np.abs(_llama_logprobs(runner, ids) - expected).max() < 2e-3
        assert np.abs(_llama_logprobs(base_only, ids) - expected).max() > 1e-2  # the LoRA files do matter


@needs_llama
def test_stock_llama_cpp_runs_the_merged_q8_0_file_and_the_lora_chain(store, tree_dir):
    answers = engine_greedy(tree_dir, NODE, TEXTS[:2], 16)
    int8 = llama_runner(store.build(NODE, "merged-int8"))
    lora = store.build(NODE, "gguf-lora")
    chain = llama_runner(lora, store.requirement(lora))
    exact = stock_runner(store.build(NODE, "merged"))
    stream = [t for ids, tokens in answers for t in (*ids, *tokens)]
    reference = exact.perplexity(stream, 16)
    for runner in (int8, chain):
        assert abs(runner.perplexity(stream, 16) / reference - 1) < 0.05, runner.name
        prefix, _ = agreement(answers[0][1], runner.greedy(answers[0][0], 16))
        assert prefix >= 1, runner.name
    with pytest.raises(ExportError, match="gguf-lora runs over the base's GGUF"):
        llama_runner(lora)


def test_gguf_needs_a_llama_base(tmp_path, tiny_base_dir):
    import json

    folder = tmp_path / "other"
    shutil.copytree(tiny_base_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    with pytest.raises(ExportError, match="GGUF variants support LlamaForCausalLM; the base is Qwen2ForCausalLM"):
        write_gguf_model(model, folder, tmp_path / "x.gguf", "F16", name="x")
    assert not (tmp_path / "x.gguf").exists()
