"""`treelm tree build` on tiny bases: parents-first training over the parent's effective model,
recorded metrics, exact composition, incremental rebuilds, --force, reproducibility, the guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from hierarchy.spec import load_spec
from nodes.base.model import load_base
from nodes.build.builder import build_tree
from nodes.build.compose import merge_chain
from nodes.build.training import ChainPatch, perplexity, tokenize_text
from nodes.store.adapters import read_adapter
from nodes.store.tree import open_tree, verify_node_files

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "demo" / "data"

# Small and fast: 4 nodes over a 2-layer tiny Llama, 30 steps each (about a second per node).
TINY_NODES = {
    "en": {"level": "language", "language": "en"},
    "es": {"level": "language", "language": "es"},
    "en/medical": {"level": "domain", "domain": "medical", "tags": ["clinical"]},
    "en/medical/radiology": {
        "level": "subdomain",
        "subdomain": "radiology",
        "visibility": "private",
        "owner": "st-marys",
    },
}


def write_spec(folder: Path, nodes: dict | None = None, **top) -> Path:
    """A tiny tree spec over the demo corpora (absolute paths), written to folder/tree.yaml."""
    body = {
        "name": "tt",
        "base": {"model": "tiny", "hidden": 64, "layers": 2, "vocab": 400, "heads": 4, "kv_heads": 2},
        "defaults": {
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]},
            "training": {"steps": 30, "batch_size": 4, "max_seq_len": 32, "lr": 0.01, "seed": 0},
        },
        "nodes": {},
    }
    body.update(top)
    for path, extra in (nodes or TINY_NODES).items():
        node = {"train": str(DATA / path / "train.txt"), "eval": str(DATA / path / "eval.txt")}
        node.update(extra)
        body["nodes"][path] = node
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "tree.yaml"
    spec.write_text(yaml.safe_dump(body, sort_keys=False))
    return spec


def shas(out: Path) -> dict[str, str]:
    return {str(n.node_id): n.adapter_digest for n in open_tree(out).nodes}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build")
    spec = write_spec(folder)
    report = build_tree(load_spec(spec), folder / "out")
    return spec, folder / "out", report


def test_every_node_is_trained_parents_first_and_recorded(built):
    _spec, out, report = built
    assert report.ok and [o.status for o in report.outcomes] == ["trained"] * 4
    tree = open_tree(out)
    assert [str(n.path) for n in tree.nodes] == ["en", "es", "en/medical", "en/medical/radiology"]
    assert tree.base_model == "tiny" and (out / "base" / "config.json").is_file()
    assert tree.base_digest == tree.raw["base"]["digest"] and tree.spec_digest
    for node in tree.nodes:
        verify_node_files(node)
        record = json.loads((node.directory / "node.json").read_text())
        assert record["version"] == 1 and record["base_digest"] == tree.base_digest
        assert set(record["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
        assert record["training"]["steps"] == 30 and record["lora"]["r"] == 4
        assert record["data"]["train"]["sha256"] and record["data"]["eval"]["tokens"] > 0
        m = record["metrics"]
        # Specialisation: the node beats its parent on its own eval text.
        assert m["eval_ppl"] < m["parent_eval_ppl"] and m["specialisation_gain"] > 0
        # Forgetting on the parent's eval text stays within the (default 10%) bound.
        assert m["forgetting"] is not None and m["forgetting"] <= m["forgetting_bound"] == 0.10
        if node.parent_id.is_base:
            assert record["parent_version"] is None and record["parent_adapter_digest"] is None
            assert m["forgetting_reference"].startswith("siblings:")
        else:
            parent = tree.node(node.parent_id)
            assert record["parent_version"] == 1
            assert record["parent_adapter_digest"] == parent.adapter_digest
            assert m["parent_text_parent_ppl"] == pytest.approx(parent.metrics["eval_ppl"], rel=1e-4)
    radiology = tree.node("tt/en/medical/radiology")
    assert radiology.visibility == "private" and radiology.owner == "st-marys" and radiology.language == "en"
    assert radiology.domain == "medical" and radiology.subdomain == "radiology"
    # No temp or old folders are left behind.
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_child_is_trained_over_its_parents_effective_model_and_composes_exactly(built):
    """The recorded perplexities are reproduced from the saved files with W0 + sum s_i B_i A_i."""
    _, out, _ = built
    tree = open_tree(out)
    chain = [read_adapter(n.directory, expected_sha256=n.sha256) for n in tree.chain("tt/en/medical/radiology")]
    radiology = tree.node("tt/en/medical/radiology")
    base = load_base(tree.base_dir, digest=tree.base_digest)
    eval_ids = tokenize_text(base.tokenizer, (DATA / "en/medical/radiology/eval.txt").read_text())
    parent_ids = tokenize_text(base.tokenizer, (DATA / "en/medical/eval.txt").read_text())

    merged = merge_chain(load_base(tree.base_dir).model, chain)  # node: all three adapters folded in
    parent = merge_chain(load_base(tree.base_dir).model, chain[:2])  # parent: en + en/medical only
    m = radiology.metrics
    assert perplexity(merged, eval_ids, 32) == pytest.approx(m["eval_ppl"], rel=1e-4)
    assert perplexity(parent, eval_ids, 32) == pytest.approx(m["parent_eval_ppl"], rel=1e-4)
    assert perplexity(merged, parent_ids, 32) == pytest.approx(m["parent_text_ppl"], rel=1e-4)

    # The chain forward (ancestors as low-rank terms) equals the merged weights.
    ids = eval_ids[:40].unsqueeze(0)
    with ChainPatch(base.model, chain):
        chained = base.model(input_ids=ids).logits
    torch.testing.assert_close(chained, merged(input_ids=ids).logits, rtol=0, atol=1e-4)
    # Stock PEFT loads each node's own adapter dir.
    peft_model = PeftModel.from_pretrained(load_base(tree.base_dir).model, radiology.directory)
    assert peft_model.peft_config["default"].r == 4


def test_rebuild_reuses_everything_and_force_retrains_a_subtree_identically(built):
    spec, out, _ = built
    before = shas(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")}
    again = build_tree(load_spec(spec), out)
    assert [o.status for o in again.outcomes] == ["reused"] * 4
    assert {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")} == mtimes

    forced = build_tree(load_spec(spec), out, force=["en/medical"])
    status = {str(o.path): o.status for o in forced.outcomes}
    assert status == {"en": "reused", "es": "reused", "en/medical": "trained", "en/medical/radiology": "trained"}
    # Same seed, same data, same parent: byte-identical adapters (reproducible training).
    assert shas(out) == before


def test_same_spec_builds_identically_in_another_directory(built, tmp_path):
    spec, out, _ = built
    report = build_tree(load_spec(spec), tmp_path / "again")
    assert report.ok
    assert shas(tmp_path / "again") == shas(out)
    assert open_tree(tmp_path / "again").base_digest == open_tree(out).base_digest


def test_changed_settings_retrain_the_node_and_its_subtree_only(tmp_path):
    spec = write_spec(tmp_path)
    build_tree(load_spec(spec), tmp_path / "out")
    before = shas(tmp_path / "out")
    body = yaml.safe_load(spec.read_text())
    body["nodes"]["en/medical"]["training"] = {"lr": 0.02}
    spec.write_text(yaml.safe_dump(body))
    report = build_tree(load_spec(spec), tmp_path / "out")
    status = {str(o.path): o.status for o in report.outcomes}
    assert status == {"en": "reused", "es": "reused", "en/medical": "trained", "en/medical/radiology": "trained"}
    after = shas(tmp_path / "out")
    assert after["tt/en"] == before["tt/en"] and after["tt/en/medical"] != before["tt/en/medical"]
    radiology = open_tree(tmp_path / "out").node("tt/en/medical/radiology")
    assert radiology.parent_adapter_digest == after["tt/en/medical"]  # re-pinned to the new parent

    # Metadata only (tags, description): node.json is rewritten, the adapter is not retrained.
    body["nodes"]["en/medical"]["tags"] = ["clinical", "hospital"]
    body["nodes"]["en/medical"]["description"] = "English clinical text."
    spec.write_text(yaml.safe_dump(body))
    report = build_tree(load_spec(spec), tmp_path / "out")
    assert {str(o.path): o.status for o in report.outcomes}["en/medical"] == "updated"
    assert shas(tmp_path / "out") == after
    medical = open_tree(tmp_path / "out").node("tt/en/medical")
    assert medical.tags == ("clinical", "hospital") and medical.raw["description"] == "English clinical text."


def test_local_model_dir_base_is_referenced_not_copied(tiny_base_dir, tmp_path):
    nodes = {"en": TINY_NODES["en"], "en/medical": TINY_NODES["en/medical"]}
    spec = write_spec(tmp_path, nodes, base={"model": str(tiny_base_dir)})
    report = build_tree(load_spec(spec), tmp_path / "out")
    assert report.ok
    tree = open_tree(tmp_path / "out")
    assert tree.base_dir == tiny_base_dir and not (tmp_path / "out" / "base").exists()
    assert tree.raw["base"]["kind"] == "hf"
    m = tree.node("tt/en").metrics
    assert m["forgetting"] is None and m["forgetting_reference"] is None  # no sibling language to guard


JUNK = "zq xv " * 3000  # a child trained on this drifts far from any English


def _junk_tree(tmp_path: Path, guard: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    junk = tmp_path / "junk.txt"
    junk.write_text(JUNK)
    radiology = {
        "train": str(DATA / "en/medical/radiology/train.txt"),
        "eval": str(DATA / "en/medical/radiology/eval.txt"),
    }
    return write_spec(
        tmp_path,
        {
            "en": TINY_NODES["en"],
            "en/junk": {
                "level": "domain",
                "guard": guard,
                "training": {"lr": 0.05},
                "train": str(junk),
                "eval": str(junk),
            },
            "en/junk/deeper": {"level": "subdomain"} | radiology,
        },
    )


def test_forgetting_guard_fails_the_node_with_a_reason_and_writes_nothing(tmp_path):
    spec = _junk_tree(tmp_path, {"replay": 0.0, "max_forgetting": 0.10})
    report = build_tree(load_spec(spec), tmp_path / "out")
    status = {str(o.path): o for o in report.outcomes}
    assert status["en"].status == "trained"
    failed = status["en/junk"]
    assert failed.status == "failed" and "forgetting" in failed.reason and "guard.max_forgetting" in failed.reason
    assert failed.metrics["forgetting"] > 0.10
    assert status["en/junk/deeper"].status == "skipped" and "tt/en/junk" in status["en/junk/deeper"].reason
    assert not (tmp_path / "out" / "nodes" / "en" / "junk").exists()
    assert [str(n.path) for n in open_tree(tmp_path / "out").nodes] == ["en"]
    with pytest.raises(Exception, match="forgetting"):
        report.raise_for_failures()


def test_replay_and_kl_guard_reduce_forgetting(tmp_path):
    unguarded = build_tree(
        load_spec(_junk_tree(tmp_path / "a", {"replay": 0.0, "max_forgetting": 100.0})), tmp_path / "a" / "out"
    )
    guarded = build_tree(
        load_spec(_junk_tree(tmp_path / "b", {"replay": 0.5, "kl_weight": 1.0, "max_forgetting": 100.0})),
        tmp_path / "b" / "out",
    )
    f_unguarded = unguarded.outcomes[1].metrics["forgetting"]
    f_guarded = guarded.outcomes[1].metrics["forgetting"]
    assert unguarded.outcomes[1].status == guarded.outcomes[1].status == "trained"
    assert f_guarded < f_unguarded / 2, (f_guarded, f_unguarded)


def test_cli_build_shows_progress_and_the_summary_table(built, capsys):
    from cluster.cli import main

    spec, out, _ = built
    code = main(["tree", "build", str(spec), "--out", str(out), "--force", "en/medical/radiology"])
    text = capsys.readouterr().out
    assert code == 0
    assert "trained tt/en/medical/radiology" in " ".join(text.split())
    for header in ("own ppl parent→node", "gain", "forgetting", "bound"):
        assert header in text
    assert "reused" in text and "tt/en/medical/radiology" in text

    code = main(["tree", "build", str(spec), "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and {n["status"] for n in report["nodes"]} == {"reused"}
    assert all(n["metrics"]["specialisation_gain"] > 0 for n in report["nodes"])
