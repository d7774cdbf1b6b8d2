"""A 3-level chain with mixed ranks: PEFT's multi-adapter forward (chain applied), our
flattened single adapter loaded by stock PEFT, and our merged model loaded by stock
transformers all give the same logits; a naive average of the factors does not."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hierarchy.chain import LoraFactors, pad_rank
from nodes.base.model import load_base
from nodes.build.compose import flatten_adapters, merge_chain
from nodes.store.adapters import AdapterWeights, read_adapter, write_adapter

# (rank, alpha, target modules) for language -> domain -> subdomain
CHAIN = [
    (8, 16.0, ("q_proj", "v_proj")),
    (2, 4.0, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (4, 2.0, ("v_proj", "up_proj")),
]


def random_adapter(model, r, alpha, targets, seed) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            factors[name] = LoraFactors(
                A=torch.randn(r, module.in_features, generator=g) * 0.2,
                B=torch.randn(module.out_features, r, generator=g) * 0.2,
                scale=alpha / r,
            )
    return AdapterWeights(r=r, alpha=alpha, target_modules=targets, factors=factors)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_chain_flat_and_merged_agree(tiny_base_dir, tmp_path):
    base = load_base(tiny_base_dir)
    ids = torch.tensor([base.tokenizer("The radiologist reviewed the scan of the patient.").input_ids])
    chain = [random_adapter(base.model, r, a, t, seed=i) for i, (r, a, t) in enumerate(CHAIN)]
    dirs = []
    for i, adapter in enumerate(chain):
        d = tmp_path / f"node{i}"
        write_adapter(adapter, d, base_model_name_or_path=str(tiny_base_dir))
        dirs.append(d)
    # The written adapters read back identically.
    back = read_adapter(dirs[1])
    assert back.r == 2 and back.scale == 2.0 and set(back.factors) == set(chain[1].factors)

    plain = logits(base.model, ids)

    # 1. Chain applied: stock PEFT with all three adapters active at once.
    peft_model = PeftModel.from_pretrained(load_base(tiny_base_dir).model, dirs[0], adapter_name="n0")
    peft_model.load_adapter(dirs[1], adapter_name="n1")
    peft_model.load_adapter(dirs[2], adapter_name="n2")
    peft_model.base_model.set_adapter(["n0", "n1", "n2"])
    chained = logits(peft_model, ids)

    # 2. Flattened: ONE adapter of rank sum(r_i), loaded by stock PEFT.
    flat = flatten_adapters([read_adapter(d) for d in dirs])
    assert flat.r == sum(r for r, _, _ in CHAIN) - 0  # q/v see all ranks; others are zero-padded
    write_adapter(flat, tmp_path / "flat", base_model_name_or_path=str(tiny_base_dir))
    flat_model = PeftModel.from_pretrained(load_base(tiny_base_dir).model, tmp_path / "flat")
    flattened = logits(flat_model, ids)

    # 3. Merged: a standalone model dir, loaded by stock transformers.
    merged_model = merge_chain(load_base(tiny_base_dir).model, [read_adapter(d) for d in dirs])
    merged_model.save_pretrained(tmp_path / "merged")
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True), ids)

    assert (chained - plain).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(flattened, chained, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, chained, rtol=0, atol=1e-5)

    # 4. A naive average of the factors is NOT the chain.
    rank = max(a.r for a in chain)
    naive_factors = {}
    for name in flat.factors:
        parts = [pad_rank(a.factors[name], rank) for a in chain if name in a.factors]
        naive_factors[name] = LoraFactors(
            A=sum(p.A for p in parts) / len(parts), B=sum(p.B for p in parts) / len(parts), scale=1.0
        )
    naive = AdapterWeights(r=rank, alpha=float(rank), target_modules=flat.target_modules, factors=naive_factors)
    naive_model = merge_chain(load_base(tiny_base_dir).model, [naive])
    assert (logits(naive_model, ids) - chained).abs().max() > 1e-3
