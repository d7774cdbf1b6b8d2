"""nodes.store.versions: immutable content-addressed versions, snapshots switched atomically, per-node
pinned chains, and an engine that serves each request from exactly one snapshot."""

from __future__ import annotations

import asyncio

import pytest

from hierarchy.chain import LoraFactors
from nodes.errors import EngineConfigError, IntegrityError, NodesError
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, SamplingParams
from nodes.store.adapters import AdapterWeights
from nodes.store.versions import ChainLink, ServedNode, VersionStore, open_served_tree
from tests.nodes.treefactory import MergedReference, RandomTreeSpec, make_random_tree


@pytest.fixture
def store(tmp_path, tiny_base_dir):
    make_random_tree(tmp_path / "tree", tiny_base_dir)
    return VersionStore(tmp_path / "tree")


def _scaled(adapter: AdapterWeights, factor: float) -> AdapterWeights:
    factors = {m: LoraFactors(f.A, f.B * factor, f.scale) for m, f in adapter.factors.items()}
    return AdapterWeights(adapter.r, adapter.alpha, adapter.target_modules, factors)


def test_genesis_versions_are_content_addressed_and_idempotent(store):
    first = store.genesis_nodes()
    files = sorted(p for p in (store.root / "versions").rglob("*") if p.is_file())
    again = store.genesis_nodes()
    assert first == again and sorted(p for p in (store.root / "versions").rglob("*") if p.is_file()) == files
    medical = first["en/medical"]
    assert [x.path for x in medical.chain] == ["en", "en/medical"] and medical.version == 3  # node.json's version
    built = store.tree.node("rt/en/medical")
    assert medical.link.adapter == built.adapter_digest
    assert store.version_dir(medical.link).name == f"@v3-{built.adapter_digest[:12]}"
    assert store.node(medical.link).cache_key == f"en/medical@v3-{built.adapter_digest[:12]}"


def test_snapshots_switch_whole_and_refuse_unstored_versions(store):
    assert store.read_snapshot() is None
    assert [n.cache_key for n in open_served_tree(store.root).nodes] == [str(n.path) for n in store.tree.nodes]
    nodes = store.genesis_nodes()
    first = store.write_snapshot(nodes)
    assert first.serial == 1 and store.read_snapshot().same_chains(first)
    ghost = ChainLink("en", 9, "0" * 64)
    bad = dict(nodes) | {"en": ServedNode("en", (ghost,))}
    before = store.snapshot_file.read_bytes()
    with pytest.raises(IntegrityError, match="not stored"):
        store.write_snapshot(bad)
    assert store.snapshot_file.read_bytes() == before
    with pytest.raises(NodesError, match="names"):
        ServedNode("en/medical", (nodes["en"].link,))  # a chain must name the whole lineage
    assert not list(store.root.glob(".snapshot.json.tmp-*"))


def test_a_held_node_keeps_its_old_chain_while_its_sibling_moves_on(store, tiny_base_dir):
    nodes = store.genesis_nodes()
    en = store.adapter(nodes["en"].link)
    record = {k: v for k, v in store.node(nodes["en"].link).raw.items() if k != "files"}
    en_v2 = store.put_adapter("en", 2, _scaled(en, 0.5), record)
    assert en_v2 != nodes["en"].link and store.has(en_v2)
    moved = {p: s for p, s in nodes.items()}
    for path in ("en", "en/medical", "en/medical/radiology", "en/legal"):
        chain = (en_v2, *nodes[path].chain[1:])
        moved[path] = ServedNode(path, chain)
    moved["en/medical/cardiology"] = ServedNode(
        "en/medical/cardiology", nodes["en/medical/cardiology"].chain, "held", "probe regressed"
    )
    snapshot = store.write_snapshot(moved)
    tree = store.served_tree(snapshot)
    radiology, cardiology = tree.chain("rt/en/medical/radiology"), tree.chain("rt/en/medical/cardiology")
    assert radiology[0].version == 2 and cardiology[0].version == 1
    assert radiology[0].cache_key != cardiology[0].cache_key  # two versions of en, two cache entries
    assert tree.served["en/medical/cardiology"].status == "held"

    # The engine serves exactly these chains, and a newer snapshot on disk from the next request on.
    with Engine(tiny_base_dir, store.root, EngineConfig(max_batch_size=4)) as engine:
        assert engine.tree.serial == snapshot.serial
        reference = MergedReference(tiny_base_dir, engine.tree)
        ids = engine.tokenizer("The patient").input_ids
        for node in ("rt/en/medical/radiology", "rt/en/medical/cardiology"):
            request = GenerationRequest(node=node, prompt="The patient", params=SamplingParams(max_new_tokens=5))
            result = asyncio.run(engine.generate(request))
            assert list(result.token_ids) == reference.tokens(node, ids, 5)
        store.write_snapshot(nodes)
        assert engine.refresh() and engine.tree.chain("rt/en/medical/radiology")[0].version == 1
        assert not engine.refresh()
        other = make_random_tree(store.root.parent / "other", tiny_base_dir, RandomTreeSpec(name="other"))
        with pytest.raises(EngineConfigError, match="only snapshots of the same tree"):
            engine.use_tree(other)
        assert engine.tree.name == "rt"


def test_a_changed_version_file_is_refused_on_load(store):
    nodes = store.genesis_nodes()
    link = nodes["en/legal"].link
    weights = store.version_dir(link) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="changed on disk"):
        store.adapter(link)
    with pytest.raises(IntegrityError):
        store.verify(store.write_snapshot(nodes))


def test_leftovers_of_a_killed_writer_are_cleaned(store):
    nodes = store.genesis_nodes()
    tmp = store.version_dir(nodes["en"].link).parent / ".tmp-killed"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"half")
    (store.root / ".snapshot.json.tmp-x").write_text("{")
    removed = store.clean_leftovers()
    assert len(removed) == 2 and not tmp.exists() and not (store.root / ".snapshot.json.tmp-x").exists()
    assert store.has(nodes["en"].link)  # finished versions are never touched
