"""The happy path end to end, through the CLI: St Mary's private oncology node is fine-tuned on
local data, the package is signed, verified, submitted, screened, aggregated into en/medical,
gated, approved (evaluator + operator), becomes stable; the siblings are re-pinned; the
increment climbs to en, is approved there too; the engine serves the new snapshot; a rollback
moves `stable` back without re-signing; the registry recorded every step."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from cluster.cli import main
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, SamplingParams
from nodes.store.versions import VersionStore
from registry.updates import current_pins, list_update_events, tree_versions
from tests.cluster.update_world import TREE, built_tree, make_world
from tests.nodes.treefactory import MergedReference

ONC, MED, EN = f"{TREE}/en/medical/oncology", f"{TREE}/en/medical", f"{TREE}/en"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def chains(world) -> dict[str, list[tuple[str, int]]]:
    return {k: [(x["path"], x["version"]) for x in v.chain] for k, v in current_pins(world.registry, TREE).items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("flow"), built_tree(tmp_path_factory), keys=False)
    yield w
    w.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return tmp_path_factory.mktemp("flow-keys")


def test_a_leaf_update_climbs_two_levels_and_the_tree_follows(world, keys, capsys, tmp_path):
    db = ("--db", world.url)
    # -- keys: generated and registered through the CLI (root first, then signed by root)
    ids = {}
    for name in ("root", "st-marys", "eval-medical", "eval-en", "operator"):
        code, out, _ = cli(capsys, "keys", "gen", "--no-encrypt", "--out", keys / name)
        assert code == 0
        ids[name] = out.strip()
        assert stat.S_IMODE(os.stat(keys / name / "private.pem").st_mode) == 0o600
        assert (keys / name / "public.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert cli(capsys, "keys", "register", keys / "root", "--role", "root", *db)[0] == 0
    # Without root's signature a new group cannot be created.
    code, _, err = cli(capsys, "keys", "register", keys / "st-marys", "--role", "node", "--node", ONC, *db)
    assert code == 2 and "root keys" in err
    for name, role, node in (
        ("st-marys", "node", ONC),
        ("eval-medical", "evaluator", MED),
        ("eval-en", "evaluator", EN),
        ("operator", "operator", None),
    ):
        args = ["keys", "register", keys / name, "--role", role, "--sign-with", keys / "root", *db]
        assert cli(capsys, *args, *(["--node", node] if node else []))[0] == 0
    code, out, _ = cli(capsys, "keys", "ls", *db, "--json")
    listed = {k["keyid"]: k for k in json.loads(out)["keys"]}
    assert code == 0 and listed[ids["st-marys"]]["node"] == ONC and listed[ids["operator"]]["role"] == "operator"

    # -- the hospital: fine-tune on local data, sign, verify
    pkg = tmp_path / "onc-v2"
    code, out, _ = cli(
        capsys,
        "update",
        "make",
        world.tree,
        ONC,
        "--train",
        world.local("en/medical/oncology"),
        "--key",
        keys / "st-marys",
        "--out",
        pkg,
        "--json",
    )
    made = json.loads(out)
    assert code == 0 and made["version"] == 2 and made["parent_version"] == 1
    assert made["metrics"]["eval_ppl"] < made["metrics"]["eval_ppl_before"]  # the local held-out text improved
    assert sorted(p.name for p in (pkg / "files").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((pkg / "manifest.json").read_text())["node"] == ONC
    code, out, _ = cli(capsys, "update", "verify", pkg, "--tree", world.tree, *db)
    assert code == 0 and out.count(" ok ") == 9

    # -- submit: screened, gated, stored; with m = 1 the parent aggregates at once
    code, out, _ = cli(capsys, "update", "submit", pkg, "--tree", world.tree, *db, "--json")
    submitted = json.loads(out)
    assert code == 0 and submitted["state"] == "aggregated" and submitted["figures"]["gate.passed"] == 1.0
    assert submitted["figures"]["cosine"] > 0 and submitted["figures"]["weight"] == 1.0
    candidate = submitted["candidate_id"]
    code, out, _ = cli(capsys, "update", "status", candidate, "--tree", world.tree, *db, "--json")
    cand = json.loads(out)
    assert (cand["kind"], cand["node"], cand["version"], cand["state"]) == ("candidate", MED, 2, "awaiting-approval")
    assert cand["approvals_needed"] == 2 and cand["figures"]["gate.passed"] == 1.0
    versions = tree_versions(world.registry, TREE)
    assert versions[ONC].stable == 2 and versions[MED].stable == 1 and versions[MED].statuses[2] == "candidate"

    # -- approvals: a node key may not approve; evaluator then operator
    code, _, err = cli(capsys, "update", "approve", candidate, "--key", keys / "st-marys", "--tree", world.tree, *db)
    assert code == 2 and "needs evaluator, operator keys" in " ".join(err.split())
    assert (
        cli(capsys, "update", "approve", candidate, "--key", keys / "eval-medical", "--tree", world.tree, *db)[0] == 0
    )
    assert tree_versions(world.registry, TREE)[MED].stable == 1  # 1 of 2 approvals: nothing moves yet
    code, out, _ = cli(
        capsys, "update", "approve", candidate, "--key", keys / "operator", "--tree", world.tree, *db, "--json"
    )
    assert code == 0 and json.loads(out)["state"] == "stable"
    pins = chains(world)
    assert pins[MED] == [("en", 1), ("en/medical", 2)]
    for leaf in ("radiology", "cardiology"):  # siblings re-validated over en/medical v2 and re-pinned
        assert pins[f"{MED}/{leaf}"] == [("en", 1), ("en/medical", 2), (f"en/medical/{leaf}", 1)]
    assert pins[ONC] == [("en", 1), ("en/medical", 2), ("en/medical/oncology", 2)]

    # -- the upward step: en/medical's increment became a candidate of en
    code, out, _ = cli(capsys, "update", "status", "--tree", world.tree, *db, "--json")
    updates = json.loads(out)["updates"]
    contribution = next(u for u in updates if u["kind"] == "contribution")
    en_candidate = next(u for u in updates if u["kind"] == "candidate" and u["node"] == EN)
    assert contribution["node"] == MED and contribution["state"] == "aggregated"
    assert contribution["candidate_id"] == en_candidate["update_id"] and en_candidate["state"] == "awaiting-approval"
    for key in ("eval-en", "operator"):
        assert (
            cli(capsys, "update", "approve", en_candidate["update_id"], "--key", keys / key, "--tree", world.tree, *db)[
                0
            ]
            == 0
        )
    pins = chains(world)
    assert pins[EN] == [("en", 2)] and pins[f"{TREE}/en/legal"] == [("en", 2), ("en/legal", 1)]
    assert pins[MED] == [("en", 2), ("en/medical", 2)]
    assert pins[f"{MED}/radiology"] == [("en", 2), ("en/medical", 2), ("en/medical/radiology", 1)]
    assert {u.state for u in _updates(world) if u.kind == "contribution"} == {"absorbed"}
    assert all(p.status == "pinned" for p in current_pins(world.registry, TREE).values())


def _updates(world):
    return world.coordinator.updates()


def test_the_engine_serves_the_new_snapshot_and_a_rollback(world, keys, capsys):
    store = VersionStore(world.tree)
    served = store.served_tree()
    assert [n.version for n in served.chain(f"{MED}/radiology")] == [2, 2, 1]
    engine = Engine(store.tree.base_dir, world.tree, EngineConfig(max_batch_size=4))
    try:
        assert engine.tree.serial == served.serial
        reference = MergedReference(engine.tree.base_dir, engine.tree)
        prompt = "The scan showed"
        ids = engine.tokenizer(prompt).input_ids
        request = GenerationRequest(
            node=f"{MED}/radiology", prompt=prompt, params=SamplingParams(max_new_tokens=6, temperature=0.0)
        )
        result = asyncio.run(engine.generate(request))
        # Exactly the greedy tokens of the merged model of the NEW chain (en v2, en/medical v2, radiology v1).
        assert list(result.token_ids) == reference.tokens(f"{MED}/radiology", ids, 6)
        assert result.node_version == 1
        assert [n.cache_key for n in engine.tree.chain(f"{MED}/radiology")][:2] == [
            f"en@v2-{served.chain(f'{MED}/radiology')[0].adapter_digest[:12]}",
            f"en/medical@v2-{served.chain(f'{MED}/radiology')[1].adapter_digest[:12]}",
        ]

        # Roll en/medical back to v1 (operator key): nothing re-signed; the subtree follows.
        before_versions = set((world.tree / "versions").rglob("node.json"))
        code, out, _ = cli(
            capsys,
            "update",
            "rollback",
            MED,
            "--to",
            1,
            "--key",
            keys / "operator",
            "--tree",
            world.tree,
            "--db",
            world.url,
        )
        assert code == 0 and "v2 -> v1" in out
        assert set((world.tree / "versions").rglob("node.json")) == before_versions  # no new version was made
        pins = chains(world)
        assert pins[MED] == [("en", 2), ("en/medical", 1)]
        assert pins[f"{MED}/cardiology"] == [("en", 2), ("en/medical", 1), ("en/medical/cardiology", 1)]
        assert tree_versions(world.registry, TREE)[MED].stable == 1
        assert engine.refresh() and [n.version for n in engine.tree.chain(f"{MED}/radiology")] == [2, 1, 1]
        again = asyncio.run(engine.generate(request))
        assert list(again.token_ids) == MergedReference(engine.tree.base_dir, engine.tree).tokens(
            f"{MED}/radiology", ids, 6
        )
    finally:
        engine.close()
    events = [e.event for e in list_update_events(world.registry, tree=TREE)]
    for expected in (
        "pinned-genesis",
        "accepted",
        "screened",
        "gated",
        "candidate",
        "approval",
        "stable",
        "repinned",
        "contributed",
        "rollback",
    ):
        assert expected in events, expected
    code, out, _ = cli(capsys, "update", "log", "--node", MED, "--db", world.url, "--json")
    assert code == 0 and [e["event"] for e in json.loads(out)["events"]].count("stable") == 1
