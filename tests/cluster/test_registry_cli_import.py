"""`treelm registry import`: architecture facts from a real base dir, variants and digests from a built tree."""

from __future__ import annotations

import json
import shutil

import pytest

from cluster.tree_import import base_facts_from_dir, safetensors_summary, tree_import
from registry import kv_bytes_per_token
from tests.registry.helpers import write_built_tree


@pytest.fixture(scope="module")
def built_tree(tmp_path_factory, tiny_base_dir):
    return write_built_tree(tmp_path_factory.mktemp("trees") / "demo", tiny_base_dir)


def test_base_facts_match_the_real_model(tiny_base_dir):
    import torch
    from transformers import AutoModelForCausalLM

    facts = base_facts_from_dir(tiny_base_dir, "0" * 64, "tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32, local_files_only=True)
    assert facts.parameter_count == model.num_parameters()
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    assert facts.quantizable_parameter_count == linear  # what nodes.build.quantize turns into int8
    cfg = model.config
    assert (facts.layers, facts.kv_heads, facts.head_dim) == (cfg.num_hidden_layers, cfg.num_key_value_heads, 16)
    assert (facts.max_context, facts.vocab_size, facts.weight_dtype) == (512, 400, "float32")
    # The KV-cache formula against the cache the model really allocates.
    tokens = 37
    with torch.no_grad():
        out = model(torch.arange(tokens).unsqueeze(0), use_cache=True)
    cache = out.past_key_values
    held = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )
    assert held == kv_bytes_per_token(facts, "float32") * tokens


def test_tree_import_reads_nodes_versions_and_variants(built_tree, tiny_base_dir):
    prepared = tree_import(built_tree)
    nodes = {n.path: n for n in prepared.nodes}
    assert nodes[""].level == "base" and nodes[""].manifest_digest == prepared.base.digest
    rad = nodes["en/medical/radiology"]
    assert (rad.language, rad.domain, rad.subdomain, rad.tags) == ("en", "medical", "radiology", ("imaging",))
    assert rad.metrics["eval_ppl"] == 8.0 and rad.parent_version == 1
    own = {
        p: safetensors_summary([built_tree / "nodes" / p / "adapter_model.safetensors"])["parameters"]
        for p in ("en", "en/medical", "en/medical/radiology")
    }
    chain = next(v for v in rad.variants if v.kind == "chain")
    assert chain.adapter_parameters == sum(own.values())  # the whole chain's adapters
    files = sum(
        f.stat().st_size
        for p in own
        for f in (built_tree / "nodes" / p).iterdir()
        if f.is_file() and f.name != "node.json"
    )
    assert chain.bytes == prepared.base.weights_bytes + files and not chain.bytes_estimated
    assert {v.kind: v.bytes_estimated for v in rad.variants} == {
        "chain": False,
        "flat": True,
        "merged": True,
        "merged-fp16": True,
        "merged-bf16": True,
        "merged-int8": True,
        "gguf-f16": True,
        "gguf-q4_0": True,
        "gguf-lora": True,
    }
    assert {v.kind for v in nodes[""].variants} == {
        "chain",
        "merged",
        "merged-fp16",
        "merged-bf16",
        "merged-int8",
        "gguf-f16",
        "gguf-q4_0",
    }
    oncology = nodes["en/medical/oncology"]
    assert (oncology.visibility, oncology.owner) == ("private", "st-marys")


def test_manifest_digest_pins_the_files(built_tree, tmp_path):
    copy = shutil.copytree(built_tree, tmp_path / "copy")
    before = {n.path: n.manifest_digest for n in tree_import(copy).nodes}
    assert before == {n.path: n.manifest_digest for n in tree_import(copy).nodes}  # deterministic
    record_file = copy / "nodes" / "en" / "legal" / "node.json"
    record = json.loads(record_file.read_text())
    record["files"]["adapter_model.safetensors"]["sha256"] = "f" * 64
    record_file.write_text(json.dumps(record))
    after = {n.path: n.manifest_digest for n in tree_import(copy).nodes}
    assert [p for p in before if before[p] != after[p]] == ["en/legal"]


def test_a_variant_built_in_the_cache_is_registered_as_measured(built_tree, tmp_path):
    from nodes.build.variants import VariantStore

    copy = shutil.copytree(built_tree, tmp_path / "copy")
    artifact = VariantStore(copy).build("demo/en/medical", "gguf-lora")
    node = next(n for n in tree_import(copy).nodes if n.path == "en/medical")
    lora = next(v for v in node.variants if v.kind == "gguf-lora")
    assert not lora.bytes_estimated and lora.uri == str(artifact.directory)
    f16 = next(v for v in node.variants if v.kind == "gguf-f16")  # the base the LoRA files run over, estimated
    assert lora.bytes == artifact.manifest.size + f16.bytes
    assert next(v for v in node.variants if v.kind == "merged").bytes_estimated  # not built: estimated


def test_an_exported_variant_is_registered_as_measured(built_tree, tmp_path):
    copy = shutil.copytree(built_tree, tmp_path / "copy")
    out = copy / "exports" / "en" / "medical" / "merged-int8"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"variant": "merged-int8", "bytes": 77_777}))
    node = next(n for n in tree_import(copy).nodes if n.path == "en/medical")
    int8 = next(v for v in node.variants if v.kind == "merged-int8")
    assert (int8.bytes, int8.bytes_estimated, int8.uri) == (77_777, False, str(out))


def test_a_tree_built_by_treelm_imports_and_matches(tmp_path, capsys, monkeypatch):
    """The real pipeline: `treelm tree build` (tiny base) -> `export` -> `registry import` -> `registry match`."""
    from cluster.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    words = [
        "the",
        "patient",
        "scan",
        "report",
        "heart",
        "lung",
        "doctor",
        "clinic",
        "image",
        "radiology",
        "lesion",
        "contrast",
    ]
    for name, offset in (("en", 0), ("rad", 7)):
        for split, n in (("train", 1500), ("eval", 300)):
            (tmp_path / f"{name}_{split}.txt").write_text(
                " ".join(words[(i * 7 + offset) % len(words)] for i in range(n)) + "\n"
            )
    (tmp_path / "tree.yaml").write_text(
        "name: mini\nbase: {model: tiny}\n"
        "defaults: {training: {steps: 3, batch_size: 2, max_seq_len: 32}, guard: {max_forgetting: 10.0}}\n"
        "nodes:\n"
        "  en: {level: language, language: en, train: en_train.txt, eval: en_eval.txt}\n"
        "  en/radiology: {level: subdomain, subdomain: radiology, tags: [imaging], train: rad_train.txt,"
        " eval: rad_eval.txt}\n"
    )
    tree_dir, db = tmp_path / "built", f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["tree", "build", str(tmp_path / "tree.yaml"), "--out", str(tree_dir)]) == 0
    exported = tree_dir / "exports" / "en" / "radiology" / "merged-int8"
    assert main(["export", str(tree_dir), "mini/en/radiology", "--variant", "merged-int8", "--out", str(exported)]) == 0
    assert main(["registry", "--db", db, "init"]) == 0
    assert main(["registry", "--db", db, "import", str(tree_dir)]) == 0
    capsys.readouterr()
    assert main(["registry", "--db", db, "show", "mini/en/radiology", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["subdomain"] == "radiology" and shown["tags"] == ["imaging"]
    assert isinstance(shown["versions"][0]["metrics"]["eval_ppl"], float)
    int8 = next(v for v in shown["variants"] if v["kind"] == "merged-int8")
    manifest = json.loads((exported / "manifest.json").read_text())
    assert int8["bytes"] == manifest["bytes"] and not int8["bytes_estimated"]
    assert main(["registry", "--db", db, "match", "--task", "en/radiology", "--context", "256", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["candidates"][0]
    assert best["node"] == "mini/en/radiology" and best["fit"] == "perfect"
    assert any(r.startswith("stable version 1 (accepted") and "eval score" in r for r in best["reasons"])
