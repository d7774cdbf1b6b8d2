"""Variants of any stored node version: built once and cached, manifests, exactness against the engine,
versions made by updates, and bad input (nothing half-written, typed errors)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hierarchy.chain import LoraFactors
from hierarchy.updates.variants import parse_variant_manifest
from nodes.build.variants import KINDS, MANIFEST_FILE, VariantStore, canonical_kind, variant_key
from nodes.build.variants.check import agreement, engine_greedy, stock_runner
from nodes.errors import ExportError, IntegrityError
from nodes.store.adapters import AdapterWeights, read_adapter
from nodes.store.digest import sha256_file
from nodes.store.versions import ServedNode, VersionStore
from tests.nodes.treefactory import RandomTreeSpec, make_random_tree

NODE = "rt/en/medical/radiology"
PROMPTS = ["The patient was admitted with chest pain.", "The radiologist reviewed the scan. The", "abc"]
NEW = 12


@pytest.fixture(scope="module")
def tree_dir(tiny_base_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("variants") / "tree"
    make_random_tree(root, tiny_base_dir, RandomTreeSpec(init_scale=0.1))
    return root


@pytest.fixture(scope="module")
def store(tree_dir) -> VariantStore:
    return VariantStore(tree_dir)


@pytest.fixture(scope="module")
def engine_answers(tree_dir):
    return engine_greedy(tree_dir, NODE, PROMPTS, NEW)


def listed(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST_FILE}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_is_built_once_with_a_manifest_of_every_file(store, kind):
    artifact = store.build(NODE, kind)
    again = store.build(NODE, kind)
    assert again.directory == artifact.directory and not again.built
    manifest = parse_variant_manifest((artifact.directory / MANIFEST_FILE).read_bytes())  # canonical bytes only
    assert manifest == artifact.manifest and manifest.kind == kind
    assert {f.name for f in manifest.files} == listed(artifact.directory)
    for f in manifest.files:
        assert sha256_file(artifact.directory / f.name) == f.sha256
        assert (artifact.directory / f.name).stat().st_size == f.length
    assert [x.path for x in manifest.chain] == ["en", "en/medical", "en/medical/radiology"]
    assert artifact.directory.name == manifest.key == variant_key(store.source(NODE), KINDS[kind])
    assert "README.md" in manifest.load["card"] and all(manifest.load.values())
    if KINDS[kind].requires:
        base = store.requirement(artifact)
        assert base is not None and base.key == manifest.requires.key and base.manifest.chain == ()
    else:
        assert manifest.requires is None


def test_aliases_share_the_cache_and_unknown_kinds_write_nothing(store, tree_dir):
    assert store.build(NODE, "gguf-q8_0").directory == store.build(NODE, "merged-int8").directory
    assert canonical_kind("INT8").name == "merged-int8"
    before = sorted(p.name for p in (tree_dir / "variants").iterdir())
    with pytest.raises(ExportError, match="variant must be one of merged, merged-fp16"):
        store.build(NODE, "onnx")
    with pytest.raises(ExportError, match="is the base itself: flat needs a node with adapters"):
        store.build("rt", "flat")
    with pytest.raises(ExportError, match=r"unknown node 'rt/en/surgery'.*nodes: rt/en, rt/en/medical"):
        store.build("rt/en/surgery", "merged")
    assert sorted(p.name for p in (tree_dir / "variants").iterdir()) == before


def test_merged_fp32_and_flat_give_the_engines_tokens_exactly(store, engine_answers):
    merged = stock_runner(store.build(NODE, "merged"))
    flat = store.build(NODE, "flat")
    peft = stock_runner(flat, store.requirement(flat))
    base_only = stock_runner(store.build("rt", "merged"))
    changed = 0
    for ids, tokens in engine_answers:
        assert merged.greedy(ids, NEW) == tokens
        assert peft.greedy(ids, NEW) == tokens
        changed += base_only.greedy(ids, NEW) != tokens
    assert changed  # the chain does change the answers: the comparison can fail


@pytest.mark.parametrize(("kind", "dtype"), [("merged-fp16", torch.float16), ("merged-bf16", torch.bfloat16)])
def test_half_precision_variants_store_half_weights_and_stay_close(store, engine_answers, kind, dtype):
    artifact = store.build(NODE, kind)
    model = AutoModelForCausalLM.from_pretrained(artifact.directory, dtype="auto")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    reference = stock_runner(store.build(NODE, "merged"))._model
    ids = torch.tensor([engine_answers[0][0]])
    with torch.no_grad():
        ours = model.float()(input_ids=ids).logits
        exact = reference(input_ids=ids).logits
    assert (ours - exact).abs().max() < 0.05 * exact.abs().max()
    runner = stock_runner(artifact)
    ids, tokens = engine_answers[0]
    assert agreement(tokens, runner.greedy(ids, NEW))[0] >= 1  # half precision: the first token at least


def test_progress_is_reported_while_a_variant_is_built(tree_dir):
    events = []

    class Recorder:
        def started(self, label):
            events.append(("started", label))

        def advance(self, label, what, done, total):
            events.append(("advance", what, done, total))

        def finished(self, label, artifact):
            events.append(("finished", artifact.built))

    VariantStore(tree_dir).build("rt/en/legal", "gguf-f16", progress=Recorder())
    assert events[0] == ("started", "rt/en/legal v1 gguf-f16") and events[-1] == ("finished", True)
    tensors = [e for e in events if e[0] == "advance" and e[1] == "tensors"]
    assert tensors[-1][2] == tensors[-1][3] > 1


def test_concurrent_requests_for_one_variant_build_it_once(tree_dir):
    store = VariantStore(tree_dir)
    results, errors = [], []

    def build():
        try:
            results.append(store.build("rt/fr/medical", "merged-bf16"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(r.built for r in results) == [False, False, True]
    assert len({r.directory for r in results}) == 1


def _bumped(adapter: AdapterWeights, factor: float) -> AdapterWeights:
    factors = {m: LoraFactors(f.A, f.B * factor, f.scale) for m, f in adapter.factors.items()}
    return AdapterWeights(adapter.r, adapter.alpha, adapter.target_modules, factors)


@pytest.fixture
def updated_tree(tree_dir, tmp_path):
    """The tree with a snapshot, and en/medical v4 (as an update makes it) served under radiology."""
    root = tmp_path / "tree"
    shutil.copytree(tree_dir, root, ignore=shutil.ignore_patterns("variants"))
    versions = VersionStore(root)
    nodes = versions.genesis_nodes()
    versions.write_snapshot(nodes)
    old = nodes["en/medical"].link
    record = {k: v for k, v in versions.node(old).raw.items() if k != "files"}
    new = versions.put_adapter("en/medical", 4, _bumped(versions.adapter(old), 1.5), record)
    served = dict(nodes)
    served["en/medical"] = ServedNode("en/medical", (nodes["en"].link, new))
    served["en/medical/radiology"] = ServedNode(NODE[3:], (nodes["en"].link, new, nodes[NODE[3:]].link))
    versions.write_snapshot(served)
    return root, old, new


def test_variants_of_versions_made_by_updates(updated_tree):
    root, old, new = updated_tree
    store = VariantStore(root)
    current = store.build("rt/en/medical", "merged")
    assert current.manifest.version == 4 and current.manifest.chain[-1].adapter == new.adapter
    previous = store.build("rt/en/medical", "merged", version=3)  # not served any more: its chain from node.json
    assert previous.manifest.chain[-1].adapter == old.adapter and previous.key != current.key
    leaf = store.build(NODE, "flat")  # radiology v1, re-pinned over en/medical v4
    assert [x.version for x in leaf.manifest.chain] == [1, 4, 1]
    answers = engine_greedy(root, "rt/en/medical", PROMPTS[:2], NEW)  # the engine serves the snapshot
    merged = stock_runner(current)
    assert [merged.greedy(ids, NEW) for ids, _ in answers] == [tokens for _, tokens in answers]
    before = stock_runner(previous)
    assert [before.greedy(ids, NEW) for ids, _ in answers] != [tokens for _, tokens in answers]
    with pytest.raises(ExportError, match=r"has no stored version 7; stored versions: \[3, 4\]"):
        store.build("rt/en/medical", "merged", version=7)


def test_a_corrupted_chain_builds_nothing_and_a_changed_cached_file_is_caught(tree_dir, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(tree_dir, root, ignore=shutil.ignore_patterns("variants"))
    weights = root / "nodes" / "en" / "medical" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="rt/en/medical: adapter_model.safetensors has sha256"):
        VariantStore(root).build(NODE, "merged")
    assert not (root / "variants" / "merged").exists() or not any((root / "variants" / "merged").iterdir())
    weights.write_bytes(good)
    artifact = VariantStore(root).build(NODE, "flat")
    target = artifact.directory / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors has sha256"):
        artifact.verify()
    target.write_bytes(bytes(data[:-5]))
    with pytest.raises(IntegrityError, match="its manifest says"):
        VariantStore(root).build(NODE, "flat")  # a cache hit checks the lengths


def test_a_failed_write_leaves_no_partial_variant(tree_dir, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    shutil.copytree(tree_dir, root, ignore=shutil.ignore_patterns("variants"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nodes.build.variants.writers.write_gguf_model", full_disk)
    with pytest.raises(ExportError, match="No space left on device"):
        VariantStore(root).build(NODE, "gguf-f16")
    leftovers = [p for p in (root / "variants").rglob("*") if p.is_dir() and p.parent.name == "gguf-f16"]
    assert leftovers == []


def test_the_variant_manifest_refuses_non_canonical_or_inconsistent_bytes(store):
    from hierarchy.errors import ManifestError

    manifest = store.build(NODE, "flat").manifest
    data = json.loads(manifest.to_bytes())
    with pytest.raises(ManifestError, match="canonical form"):
        parse_variant_manifest(json.dumps(data, indent=1).encode())
    bad = dict(data, chain=data["chain"][:2])
    with pytest.raises(ManifestError, match="field 'chain' must name"):
        parse_variant_manifest(json.dumps(bad, sort_keys=True, separators=(",", ":")).encode())
    bad = dict(data, load={"adapter": ["missing.bin"]})
    with pytest.raises(ManifestError, match="names files the manifest does not list"):
        parse_variant_manifest(json.dumps(bad, sort_keys=True, separators=(",", ":")).encode())
    bad = dict(data, files=[dict(data["files"][0], name="../escape")])
    with pytest.raises(ManifestError, match="relative path"):
        parse_variant_manifest(json.dumps(bad, sort_keys=True, separators=(",", ":")).encode())


def test_flat_adapter_is_exact_in_stock_peft_after_an_update_too(updated_tree):
    root, _, _ = updated_tree
    store = VariantStore(root)
    flat = store.build(NODE, "flat")
    adapter = read_adapter(flat.directory)
    assert adapter.r == sum(n.lora["r"] for n in store.source(NODE).chain)
    answers = engine_greedy(root, NODE, PROMPTS[:2], NEW)
    runner = stock_runner(flat, store.requirement(flat))
    assert [runner.greedy(ids, NEW) for ids, _ in answers] == [tokens for _, tokens in answers]


def test_the_cache_evicts_least_recently_used_variants_but_never_kept_or_read_ones(tiny_base_dir, tmp_path):
    import os

    root = tmp_path / "tree"
    make_random_tree(root, tiny_base_dir, RandomTreeSpec(init_scale=0.1))
    store = VariantStore(root)
    a, b, c = (store.build(n, "merged-bf16") for n in (NODE, "rt/en/legal", "rt/fr/medical"))
    for i, x in enumerate((b, a, c)):  # b used longest ago, then a, then c
        os.utime(x.directory, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    sa, sb, sc = (x.manifest.size for x in (a, b, c))
    assert store.size() == sa + sb + sc
    assert store.evict(sa + sb + sc) == []  # under the bound: nothing to do
    with store.reading(b.key):  # b is being downloaded: a goes instead
        assert [x.key for x in store.evict(sb + sc)] == [a.key]
    assert sorted(x.key for x in store.artifacts()) == sorted([b.key, c.key]) and store.size() == sb + sc
    assert [x.key for x in store.evict(0, keep={c.key})] == [b.key]  # the bound wins over all but kept ones
    assert [x.key for x in store.artifacts()] == [c.key]
    assert not [p for p in store.root.glob("*/.*") if p.is_dir()]  # no evicted or temp dirs left
    rebuilt = store.build(NODE, "merged-bf16")
    assert rebuilt.built and rebuilt.key == a.key and rebuilt.manifest.files == a.manifest.files
