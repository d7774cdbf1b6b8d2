"""The adapter bank: each row of one forward equals its node's merged model, for every bucket kind."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hierarchy.chain import LoraFactors
from nodes.base.model import load_base
from nodes.build.compose import merge_chain
from nodes.errors import AdapterError
from nodes.runtime.bank import AdapterBank, BankLinear, prepare_adapter
from nodes.runtime.plan import BucketKind
from nodes.store.adapters import AdapterWeights, read_adapter
from tests.nodes.treefactory import make_random_tree

PROMPTS = [
    "The patient was admitted with chest pain.",
    "The contract was signed by both parties",
    "TreeLM serves a tree of language models. The base model sits at the root",
]


@pytest.fixture(scope="module")
def setup(tiny_base_dir, tmp_path_factory):
    tree = make_random_tree(tmp_path_factory.mktemp("bank") / "tree", tiny_base_dir)
    base = load_base(tiny_base_dir)
    bank = AdapterBank(copy.deepcopy(base.model))
    for node in tree.nodes:
        bank.add(prepare_adapter(str(node.path), read_adapter(node.directory), bank.shapes, torch.float32))
    chains = {"": ()} | {str(n.path): tuple(str(p) for p in n.path.lineage()) for n in tree.nodes}
    merged = {}
    for path, chain in chains.items():
        model = copy.deepcopy(base.model)
        merge_chain(model, [read_adapter(tree.node(f"{tree.name}/{p}").directory) for p in chain])
        merged[path] = model
    width = 8
    ids = [base.tokenizer(p).input_ids[:width] for p in PROMPTS]
    assert all(len(i) == width for i in ids)
    reference = {}
    with torch.no_grad():
        for path, model in merged.items():
            out = model(input_ids=torch.tensor(ids)).logits
            for k in range(len(ids)):
                reference[(path, k)] = out[k]
    bank.tree = tree  # for tests that need an adapter dir
    return bank, chains, ids, reference


def _forward(bank, chains, rows, ids, tokens):
    """rows: [(node path, prompt index)]; returns logits [len(rows), tokens, V] through the bank."""
    x = torch.tensor([ids[k][:tokens] for _, k in rows])
    plan = bank.plan([chains[p] for p, _ in rows], tokens)
    with torch.no_grad(), bank.use(plan):
        return bank.model(input_ids=x).logits, plan


def _check(bank, chains, ids, reference, rows, tokens):
    logits, plan = _forward(bank, chains, rows, ids, tokens)
    for i, (path, k) in enumerate(rows):
        torch.testing.assert_close(logits[i], reference[(path, k)][:tokens], rtol=0, atol=2e-5)
    return plan


def _kinds(plan):
    return {w.bucket.kind for layer in plan.layers.values() for w in layer.weights}


@pytest.mark.parametrize("tokens", [1, 5])
def test_every_bucket_kind_matches_the_merged_model(setup, tokens):
    bank, chains, ids, reference = setup
    # Sorted by chain: every adapter's rows are one range -> FULL / SLICE / RUN.
    rows = [("en/medical/radiology", 0), ("en/medical/radiology", 1), ("en/medical/cardiology", 2), ("en/legal", 0)]
    plan = _check(bank, chains, ids, reference, rows, tokens)
    assert _kinds(plan) >= {BucketKind.FULL, BucketKind.SLICE}
    leaves = [("en/medical/radiology", 0), ("en/medical/cardiology", 1), ("en/legal/contracts", 2)]
    assert BucketKind.RUN in _kinds(_check(bank, chains, ids, reference, leaves, tokens))
    # Interleaved rows: gather/scatter buckets, with padding when counts differ.
    mixed = [
        ("en/medical/radiology", 0),
        ("fr/medical", 1),
        ("en/medical/radiology", 2),
        ("", 0),
        ("fr/medical", 2),
        ("en/medical/cardiology", 1),
        ("en/medical/radiology", 1),
        ("fr", 0),
        ("en/legal/contracts", 1),
        ("en/medical/cardiology", 0),
        ("fr/medical", 0),
        ("en", 2),
    ]
    plan = _check(bank, chains, ids, reference, mixed, tokens)
    assert _kinds(plan) >= {BucketKind.SUBSET, BucketKind.STACKED}
    assert any(layer.needs_zero_row for layer in plan.layers.values())


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_mixes_match_the_merged_model(setup, data):
    bank, chains, ids, reference = setup
    paths = sorted(chains)
    rows = data.draw(
        st.lists(st.tuples(st.sampled_from(paths), st.integers(0, len(ids) - 1)), min_size=1, max_size=12), label="rows"
    )
    tokens = data.draw(st.sampled_from([1, 3, 8]), label="tokens")
    _check(bank, chains, ids, reference, rows, tokens)


def test_a_shared_ancestor_is_computed_once_and_ranks_are_not_padded(setup):
    bank, chains, _ids, _ = setup
    rows = ["en/medical/radiology", "en/medical/cardiology", "en/legal/contracts", "en/medical", "en", "fr/medical"]
    random.Random(1).shuffle(rows)
    plan = bank.plan([chains[p] for p in rows], 4)
    ranks = {}
    for layer_name, layer in plan.layers.items():
        seen = [k for w in layer.weights for k in w.bucket.keys]
        assert len(seen) == len(set(seen)), f"{layer_name}: an adapter is applied twice"
        for w in layer.weights:
            assert w.a.shape[-1] == w.b.shape[-2] == w.bucket.rank  # exactly the adapter's rank
            for key in w.bucket.keys:
                ranks.setdefault(key, set()).add(w.bucket.rank)
    # "en" is shared by five of the six rows and is one bucket entry per layer: computed once over its 20 rows.
    q0 = plan.layers["model.layers.0.self_attn.q_proj"]
    en = [w for w in q0.weights if "en" in w.bucket.keys]
    assert len(en) == 1
    assert ranks == {
        "en": {8},
        "en/medical": {4},
        "en/medical/radiology": {2},
        "en/medical/cardiology": {2},
        "en/legal": {3},
        "en/legal/contracts": {5},
        "fr": {4},
        "fr/medical": {2},
    }


def test_the_base_alone_is_untouched_and_unwrap_restores_the_model(setup, tiny_base_dir):
    bank, chains, ids, reference = setup
    logits, plan = _forward(bank, chains, [("", 0), ("", 1)], ids, 8)
    assert plan.layers == {}
    torch.testing.assert_close(logits[0], reference[("", 0)], rtol=0, atol=0)

    base = load_base(tiny_base_dir)
    names = set(base.model.state_dict())
    other = AdapterBank(base.model)
    adapter = read_adapter(bank.tree.node("rt/en").directory)
    other.add(prepare_adapter("en", adapter, other.shapes, torch.float32))
    assert sum(isinstance(m, BankLinear) for m in base.model.modules()) == len(adapter.factors)
    other.unwrap()
    assert not any(isinstance(m, BankLinear) for m in base.model.modules())
    assert set(base.model.state_dict()) == names and len(other) == 0


def test_adapters_that_do_not_fit_the_base_are_refused(setup):
    bank = setup[0]
    shapes = bank.shapes
    name = "model.layers.0.self_attn.q_proj"
    fan_in, fan_out = shapes[name]
    wrong = AdapterWeights(
        r=2,
        alpha=2.0,
        target_modules=("q_proj",),
        factors={name: LoraFactors(A=torch.zeros(2, fan_in + 1), B=torch.zeros(fan_out, 2), scale=1.0)},
    )
    with pytest.raises(AdapterError, match="q_proj"):
        prepare_adapter("wrong", wrong, shapes, torch.float32)
    stray = AdapterWeights(
        r=2,
        alpha=2.0,
        target_modules=("nope",),
        factors={"model.layers.0.nope": LoraFactors(A=torch.zeros(2, 4), B=torch.zeros(4, 2), scale=1.0)},
    )
    with pytest.raises(AdapterError, match="not a linear layer"):
        prepare_adapter("stray", stray, shapes, torch.float32)
    with pytest.raises(AdapterError, match="not active"):
        bank.plan([("missing",)], 1)
    assert "wrong" not in bank and "stray" not in bank


@pytest.mark.parametrize("tokens", [1, 4])
def test_a_chain_over_the_same_rows_is_one_fused_bucket(setup, tokens):
    bank, chains, ids, reference = setup
    # Every row on one node: the whole chain covers every row, one FULL bucket of concatenated factors.
    rows = [("en/medical/radiology", 0), ("en/medical/radiology", 1)]
    plan = _check(bank, chains, ids, reference, rows, tokens)
    ranks = {"en": 8, "en/medical": 4, "en/medical/radiology": 2}
    for layer in plan.layers.values():
        (w,) = layer.weights  # the adapters of the chain that adapt this layer (not all adapt every layer)
        assert w.bucket.kind is BucketKind.FULL and set(w.bucket.keys) <= set(ranks)
        assert w.a.shape[-1] == w.b.shape[-2] == w.bucket.rank == sum(ranks[k] for k in w.bucket.keys)
    assert any(len(layer.weights[0].bucket.keys) == 3 for layer in plan.layers.values())
    # The last rows on one node below a shared ancestor: that node's chain below "en" is one SLICE bucket.
    rows = [("en/legal", 0), ("en/medical/radiology", 1), ("en/medical/radiology", 2)]
    plan = _check(bank, chains, ids, reference, rows, tokens)
    fused = {(w.bucket.kind, frozenset(w.bucket.keys)) for layer in plan.layers.values() for w in layer.weights}
    assert (BucketKind.SLICE, frozenset({"en/medical", "en/medical/radiology"})) in fused
