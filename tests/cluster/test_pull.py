"""End devices pull their model from a running server (single process): match, signed resumable
download, verification from the root keys, offline generation with stock tools, staying up to date."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.cli import main
from hierarchy.chain import LoraFactors
from hierarchy.updates.keys import SigningKey
from nodes.store.adapters import AdapterWeights
from nodes.store.versions import ServedNode, VersionStore
from registry.versions import add_version, set_alias
from tests.cluster.grpc_harness import PRIVATE, distribution_for, make_world, serve
from treelm import Client, NodeNotFound, PullError, VerificationFailed
from treelm._pull import PULL_RECORD, check, pull, upgrade

NODE = "rt/en/medical/radiology"
PROMPTS = ["The patient was admitted with chest pain.", "The radiologist reviewed the scan. The"]


class Interrupt(Exception):
    """Stands for a killed download."""


class Counter:
    def __init__(self, stop_after: int | None = None):
        self.bytes, self.stop_after = 0, stop_after

    def file_started(self, name, total, done):
        pass

    def advanced(self, name, nbytes):
        self.bytes += nbytes
        if self.stop_after is not None and self.bytes >= self.stop_after:
            raise Interrupt(f"killed after {self.bytes} bytes")

    def file_finished(self, name):
        pass


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pull")
    w = make_world(tiny_base_dir, root)
    distributor, root_fp = distribution_for(w, chunk_bytes=64 << 10)
    server = serve(w, distribution=distributor)
    w.root_fp = root_fp  # type: ignore[attr-defined]
    w.server = server  # type: ignore[attr-defined]
    yield w
    server.stop()
    w.engine.close()
    w.registry.close()


def client(world, tenant="globex") -> Client:
    return Client(world.server.target, token=world.tokens[tenant], timeout=120)


def greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_a_2gib_cpu_pulls_the_recommended_node_and_generates_the_servers_tokens_offline(world, tmp_path):
    with client(world) as c:
        best = next(
            x
            for x in c.match(task="en/medical/radiology", device="cpu", memory="2GiB").candidates
            if x.variant != "chain"
        )
        result = c.pull("en/medical/radiology", out=tmp_path / "rad", hardware="cpu:2GiB", root_keys=[world.root_fp])
        assert (result.node, result.variant, result.version) == (best.node, best.variant, 1)
        assert result.bytes_transferred == result.bytes_total > 0 and result.signers
        record = json.loads((tmp_path / "rad" / PULL_RECORD).read_text())
        assert record["node"] == NODE and record["root_keys"] == [world.root_fp]
        for prompt in PROMPTS:
            served = c.generate(NODE, prompt=prompt, max_new_tokens=12, temperature=0)
            ids = world.engine.tokenizer(prompt).input_ids
            assert greedy(result.directory, ids, len(served.token_ids)) == list(served.token_ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rad"]  # no partial or temp dirs left


def test_a_flat_pull_brings_its_base_and_loads_in_stock_peft(world, tmp_path):
    from peft import PeftModel

    with client(world) as c:
        result = c.pull(NODE, variant="flat", out=tmp_path / "flat", hardware="cpu:2GiB", root_keys=[world.root_fp])
        assert result.base_dir == tmp_path / "flat" / "base"
        base = AutoModelForCausalLM.from_pretrained(result.base_dir)
        model = PeftModel.from_pretrained(base, result.directory).eval()
        ids = world.engine.tokenizer(PROMPTS[0]).input_ids
        served = c.generate(NODE, prompt=PROMPTS[0], max_new_tokens=12, temperature=0)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=len(served.token_ids), do_sample=False)
        assert out[0, len(ids) :].tolist() == list(served.token_ids)


def test_a_download_killed_half_way_transfers_only_the_rest(world, tmp_path):
    out = tmp_path / "resumed"
    with client(world) as c:
        first = Counter(stop_after=200_000)
        with pytest.raises(Interrupt):
            pull(c, NODE, variant="merged", out=out, hardware=None, root_keys=[world.root_fp], progress=first)
        assert not out.exists() and Path(str(out) + ".partial").is_dir()
        second = Counter()
        result = pull(c, NODE, variant="merged", out=out, hardware=None, root_keys=[world.root_fp], progress=second)
    assert 0 < first.bytes < result.bytes_total
    assert result.bytes_transferred == second.bytes == result.bytes_total - first.bytes
    assert not Path(str(out) + ".partial").exists()


def test_one_changed_byte_in_the_servers_copy_is_refused(world, tmp_path):
    with client(world) as c:
        offer_key = pull(
            c, NODE, variant="merged-bf16", out=tmp_path / "ok", hardware=None, root_keys=[world.root_fp]
        ).key
    stored = next((world.tree.root / "variants").glob(f"*/{offer_key}/model.safetensors"))
    original = stored.read_bytes()
    try:
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x01
        stored.write_bytes(bytes(damaged))
        with client(world) as c, pytest.raises(VerificationFailed, match="does not match its signed sha256"):
            pull(c, NODE, variant="merged-bf16", out=tmp_path / "bad", hardware=None, root_keys=[world.root_fp])
        assert not (tmp_path / "bad").exists()
    finally:
        stored.write_bytes(original)


def test_trust_comes_from_the_root_keys_given(world, tmp_path):
    other = SigningKey.generate()
    with client(world) as c:
        with pytest.raises(VerificationFailed, match="does not hold root key"):
            pull(c, NODE, variant="flat", out=tmp_path / "x", hardware=None, root_keys=[other.keyid])
        with pytest.raises(VerificationFailed, match="no root key fingerprints"):
            pull(c, NODE, variant="flat", out=tmp_path / "x", hardware=None, root_keys=[])
        asked = []
        result = pull(
            c,
            NODE,
            variant="flat",
            out=tmp_path / "y",
            hardware=None,
            confirm_roots=lambda tree, keys: asked.append(tree) or [k.keyid for k in keys],
        )
        assert asked == ["rt"] and result.signers
    assert not (tmp_path / "x").exists()


def test_private_nodes_are_pulled_by_their_owner_only(world, tmp_path):
    with client(world, "globex") as c:
        with pytest.raises(NodeNotFound) as hidden:
            c.offer(PRIVATE, "flat")
        with pytest.raises(NodeNotFound) as unknown:
            c.offer("rt/en/legal/nda", "flat")
        assert hidden.value.details.replace(PRIVATE, "X") == unknown.value.details.replace("rt/en/legal/nda", "X")
    with client(world, "acme") as c:
        result = pull(c, PRIVATE, variant="flat", out=tmp_path / "mine", hardware=None, root_keys=[world.root_fp])
        key = result.key
    with client(world, "globex") as c, pytest.raises(NodeNotFound):
        list(c.download(PRIVATE, key, "adapter_model.safetensors"))


def test_a_variant_that_does_not_fit_is_refused_unless_forced(world, tmp_path):
    with client(world) as c:
        with pytest.raises(PullError, match="does not fit cpu with 0.0 GiB"):
            pull(c, NODE, variant="merged", out=tmp_path / "x", hardware="cpu:1MiB", root_keys=[world.root_fp])
        assert not (tmp_path / "x").exists()
        forced = pull(
            c, NODE, variant="merged", out=tmp_path / "x", hardware="cpu:1MiB", root_keys=[world.root_fp], force=True
        )
        assert forced.variant == "merged"
        with pytest.raises(PullError, match="hardware"):
            pull(c, NODE, out=tmp_path / "y", hardware="a lot", root_keys=[world.root_fp])


def _new_stable_version(world, path: str, factor: float) -> int:
    """What an approved update leaves behind: a stored version, the registry's stable alias, the snapshot."""
    store = VersionStore(world.tree.root)
    snapshot = store.read_snapshot()
    nodes = dict(snapshot.nodes) if snapshot else store.genesis_nodes()
    current = nodes[path].link
    adapter = store.adapter(current)
    bumped = AdapterWeights(
        adapter.r,
        adapter.alpha,
        adapter.target_modules,
        {m: LoraFactors(f.A, f.B * factor, f.scale) for m, f in adapter.factors.items()},
    )
    record = {k: v for k, v in store.node(current).raw.items() if k != "files"}
    node_id = f"rt/{path}"
    version = add_version(
        world.registry, node_id, manifest_digest=f"{version_digest(factor)}", status="accepted"
    ).version
    link = store.put_adapter(path, version, bumped, record)
    nodes[path] = ServedNode(path, (*nodes[path].chain[:-1], link))
    store.write_snapshot(nodes)
    set_alias(world.registry, node_id, "stable", version)
    return version


def version_digest(factor: float) -> str:
    import hashlib

    return hashlib.sha256(str(factor).encode()).hexdigest()


def test_after_an_update_is_stable_check_reports_it_and_upgrade_switches_atomically(world, tmp_path):
    out = tmp_path / "cardio"
    node = "rt/en/medical/cardiology"
    with client(world) as c:
        first = pull(c, node, variant="merged", out=out, hardware=None, root_keys=[world.root_fp])
        assert not check(c, out).newer
        version = _new_stable_version(world, "en/medical/cardiology", 1.7)
        found = check(c, out)
        assert (found.current, found.stable, found.newer) == (1, version, True)
        assert found.note.startswith(f"v{version}")
        # The new version's file is damaged on the server: the upgrade is refused, the old directory stays.
        offer = c.offer(node, "merged")
        from hierarchy.updates.envelope import Envelope
        from hierarchy.updates.variants import parse_variant_manifest

        key = parse_variant_manifest(Envelope.from_bytes(offer.manifest).payload).key
        stored = next((world.tree.root / "variants").glob(f"*/{key}/model.safetensors"))
        good = stored.read_bytes()
        stored.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        with pytest.raises(VerificationFailed):
            upgrade(c, out)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        stored.write_bytes(good)
        result = upgrade(c, out)
        assert result.version == version and result.upgraded_from == 1 and result.directory == out
        assert json.loads((out / PULL_RECORD).read_text())["version"] == version
        assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
        assert not check(c, out).newer
        # Pinned: the call makes the engine look at the snapshot now (unpinned, a server notices a new
        # snapshot within a second, and this call may come sooner).
        served = c.generate(f"{node}@{version}", prompt=PROMPTS[0], max_new_tokens=10, temperature=0)
        ids = world.engine.tokenizer(PROMPTS[0]).input_ids
        assert greedy(out, ids, len(served.token_ids)) == list(served.token_ids)
    assert first.version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cardio"]


def test_the_cli_pulls_with_the_environments_server_and_token(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TREELM_SERVER", world.server.target)
    monkeypatch.setenv("TREELM_TOKEN", world.tokens["globex"])
    out = tmp_path / "cli"
    code = main(
        [
            "pull",
            "rt/fr/medical",
            "--variant",
            "merged-int8",
            "--hardware",
            "cpu:4GiB",
            "--root-key",
            world.root_fp,
            "--out",
            str(out),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["variant"] == "merged-int8" and data["node"] == "rt/fr/medical" and Path(data["dir"]) == out
    assert any(f.endswith("Q8_0.gguf") for f in data["files"])
    assert main(["pull", "--check", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["newer"] is False
    code = main(["pull", "rt/fr/nowhere", "--variant", "flat", "--root-key", world.root_fp, "--hardware", "cpu:4GiB"])
    assert code == 2 and "no node matches" in capsys.readouterr().err.replace("\n", " ")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    code = main(
        [
            "pull",
            "rt/fr/medical",
            "--variant",
            "flat",
            "--root-key",
            world.root_fp,
            "--hardware",
            "cpu:4GiB",
            "--out",
            str(blocked / "sub"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot write" in err and "Traceback" not in err
    shutil.rmtree(out)


def test_a_repin_over_a_new_parent_version_is_newer_and_upgrade_fetches_its_weights(world, tmp_path):
    # An approved parent update re-pins the child over the parent's new version: the child keeps its
    # version number, but its effective model (and every variant of it) changes.
    out = tmp_path / "cardio"
    node = "rt/en/medical/cardiology"
    with client(world) as c:
        pull(c, node, variant="merged", out=out, hardware=None, root_keys=[world.root_fp])
        store = VersionStore(world.tree.root)
        pulled_chain = check(c, out).current_chain
        parent_version = _new_stable_version(world, "en/medical", 1.5)
        nodes = dict(store.read_snapshot().nodes)
        child = nodes["en/medical/cardiology"]
        nodes[child.path] = ServedNode(child.path, (*nodes["en/medical"].chain, child.chain[-1]))
        store.write_snapshot(nodes)
        found = check(c, out)
        own = child.chain[-1].version  # the world is shared: an earlier test may have moved it
        assert (found.current, found.stable, found.repinned, found.newer) == (own, own, True, True)
        assert found.current_chain == pulled_chain and pulled_chain.endswith(f" -> en/medical/cardiology@v{own}")
        assert found.stable_chain == f"en@v1 -> en/medical@v{parent_version} -> en/medical/cardiology@v{own}"
        before = (out / "model.safetensors").read_bytes()
        result = upgrade(c, out)
        assert result.version == own and (out / "model.safetensors").read_bytes() != before
        assert not check(c, out).newer
        # Pinned: the call makes the engine look at the snapshot now (unpinned, a server notices a new
        # snapshot within a second, and this call may come sooner).
        served = c.generate(f"{node}@{own}", prompt=PROMPTS[0], max_new_tokens=10, temperature=0)
        ids = world.engine.tokenizer(PROMPTS[0]).input_ids
        assert greedy(out, ids, len(served.token_ids)) == list(served.token_ids)
