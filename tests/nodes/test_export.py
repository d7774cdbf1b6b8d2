"""`treelm export`: flat / merged / merged-int8 (GGUF Q8_0) variants load with stock peft / transformers and
match the tree's own chain forward; model cards and manifests; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.cli import main
from hierarchy.spec import load_spec
from nodes.build.builder import build_tree
from nodes.build.export import export_node, load_chain_model
from nodes.build.training import perplexity, tokenize_text
from nodes.errors import ExportError, IntegrityError
from nodes.store.digest import sha256_file
from nodes.store.tree import open_tree
from tests.nodes.test_build import DATA, TINY_NODES, write_spec

NODE = "tt/en/medical/radiology"
PROMPTS = ["The patient", "FINDINGS: there is", "IMPRESSION:", "On Monday morning"]
NEW_TOKENS = 12
# Q8_0 weights (blocks of 32, one scale each) may move perplexity by at most this much.
INT8_PPL_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def tree_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    spec = write_spec(folder, {k: v for k, v in TINY_NODES.items() if k != "es"})
    assert build_tree(load_spec(spec), folder / "out").ok
    return folder / "out"


@pytest.fixture(scope="module")
def chain_outputs(tree_dir):
    """Greedy continuations and eval perplexity of the tree's own chain forward for NODE."""
    base, patch = load_chain_model(tree_dir, NODE)
    with patch:
        tokens = [_greedy(base.model, base.tokenizer, p) for p in PROMPTS]
        eval_ids = tokenize_text(base.tokenizer, (DATA / "en/medical/radiology/eval.txt").read_text())
        ppl = perplexity(base.model, eval_ids, 32)
    plain = [_greedy(base.model, base.tokenizer, p) for p in PROMPTS]  # the patch is removed: base only
    return {"tokens": tokens, "ppl": ppl, "eval_ids": eval_ids, "base_tokens": plain}


def _greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def _card(out: Path) -> dict:
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _check_manifest(out: Path, variant: str) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert {f["name"] for f in manifest["files"]} == files
    for info in manifest["files"]:
        name = info["name"]
        assert sha256_file(out / name) == info["sha256"] and (out / name).stat().st_size == info["length"]
    assert manifest["kind"] == variant and manifest["node"] == NODE
    assert [c["path"] for c in manifest["chain"]] == ["en", "en/medical", "en/medical/radiology"]
    return manifest


def test_flat_export_loads_in_stock_peft_and_matches_the_chain(tree_dir, chain_outputs, tmp_path):
    result = export_node(tree_dir, NODE, "flat", tmp_path / "flat")
    assert chain_outputs["tokens"] != chain_outputs["base_tokens"]  # the adapters do change the output
    tree = open_tree(tree_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tree.base_dir), result.out)
    config = model.peft_config["default"]
    assert config.r == 12 and config.lora_alpha == 12  # rank sum(r_i) = 3 x 4, scale 1
    tokenizer = AutoTokenizer.from_pretrained(tree.base_dir)
    assert [_greedy(model, tokenizer, p) for p in PROMPTS] == chain_outputs["tokens"]
    card = _card(result.out)
    assert card["base_model_relation"] == "adapter" and card["language"] == ["en"] and "treelm" in card["tags"]
    assert card["base_model"] and "radiology" in card["tags"]
    assert "Private node" in (result.out / "README.md").read_text()
    _check_manifest(result.out, "flat")


def test_merged_export_loads_in_stock_transformers_and_matches_the_chain(tree_dir, chain_outputs, tmp_path):
    result = export_node(tree_dir, "en/medical/radiology", "merged", tmp_path / "merged")  # a bare path works too
    model = AutoModelForCausalLM.from_pretrained(result.out)
    tokenizer = AutoTokenizer.from_pretrained(result.out)
    assert [_greedy(model, tokenizer, p) for p in PROMPTS] == chain_outputs["tokens"]
    assert _card(result.out)["base_model_relation"] == "finetune"
    _check_manifest(result.out, "merged")


def test_int8_export_is_a_q8_0_gguf_that_stock_transformers_loads(tree_dir, chain_outputs, tmp_path):
    merged = export_node(tree_dir, NODE, "merged", tmp_path / "merged")
    result = export_node(tree_dir, NODE, "merged-int8", tmp_path / "int8")
    (gguf_file,) = result.artifact.manifest.load["gguf"]
    model = AutoModelForCausalLM.from_pretrained(result.out, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(result.out, gguf_file=gguf_file)
    ppl = perplexity(model, chain_outputs["eval_ids"], 32)
    assert abs(ppl / chain_outputs["ppl"] - 1) <= INT8_PPL_TOLERANCE, (ppl, chain_outputs["ppl"])
    assert len(_greedy(model, tokenizer, PROMPTS[0])) == NEW_TOKENS
    assert (result.out / gguf_file).stat().st_size < 0.4 * (merged.out / "model.safetensors").stat().st_size
    manifest = _check_manifest(result.out, "merged-int8")
    assert (
        result.bytes_on_disk
        == sum(f["length"] for f in manifest["files"]) + (result.out / "manifest.json").stat().st_size
    )
    card = _card(result.out)
    assert "gguf" in card["tags"] and card["base_model_relation"] == "finetune" and card["library_name"] == "gguf"


def test_export_of_an_unknown_node_or_variant_writes_nothing(tree_dir, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"unknown node 'tt/en/legal'.*nodes: tt/en, tt/en/medical"):
        export_node(tree_dir, "tt/en/legal", "flat", tmp_path / "x")
    with pytest.raises(ExportError, match="is the base itself"):
        export_node(tree_dir, "tt", "flat", tmp_path / "x")
    with pytest.raises(ExportError, match="variant must be one of merged, merged-fp16, merged-bf16, flat"):
        export_node(tree_dir, NODE, "gguf", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    code = main(["export", str(tree_dir), "tt/en/nope", "--variant", "flat", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown node" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_export_refuses_a_non_empty_out_and_a_corrupted_chain(tree_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_node(tree_dir, NODE, "flat", taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    copy = tmp_path / "tree"
    shutil.copytree(tree_dir, copy)
    weights = copy / "nodes" / "en" / "medical" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="tt/en/medical: adapter_model.safetensors has sha256"):
        export_node(copy, NODE, "merged", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_prints_the_size(tree_dir, tmp_path, capsys):
    code = main(["export", str(tree_dir), NODE, "--variant", "merged-int8", "--out", str(tmp_path / "e"), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["variant"] == "merged-int8" and data["bytes"] > 0 and Path(data["out"]).is_dir()


def test_cli_export_of_lora_files_names_the_base_they_run_over(tree_dir, tmp_path, capsys):
    code = main(["export", str(tree_dir), NODE, "--variant", "gguf-lora", "--out", str(tmp_path / "l"), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["requires"] == {"variant": "gguf-f16", "node": "tt"} and data["version"] == 1
    code = main(["export", str(tree_dir), "tt", "--variant", "gguf-f16", "--out", str(tmp_path / "b"), "--json"])
    assert code == 0
    base = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert base["key"] == json.loads((tmp_path / "l" / "manifest.json").read_text())["requires"]["key"]
    code = main(["export", str(tree_dir), NODE, "--variant", "flat", "--version", "9", "--out", str(tmp_path / "v")])
    assert code == 2 and "built at version 1; version 9 is not stored" in capsys.readouterr().err
