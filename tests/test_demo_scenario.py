"""`make demo`'s scenario on the tiny update tree (single process, no Ray, for time): every step
runs through the SDK against a real `treelm serve`, and the report is written."""

from __future__ import annotations

import json
import re

from rich.console import Console

from examples.demo.scenario import DemoConfig, laptop, run
from tests.cluster.update_world import REPO, TREE, built_tree


def test_the_demo_scenario_runs_end_to_end_and_can_run_again(tmp_path_factory, tmp_path):
    built = built_tree(tmp_path_factory)
    built_before = sorted((p.relative_to(built), p.stat().st_mtime_ns) for p in (built / "tree").rglob("*"))
    policy = tmp_path / "update-policy.yaml"  # the demo's feedback policy, with the tiny tree's looser gate
    policy.write_text(
        # merge: auto as examples/demo/update-policy.yaml: the step-5 answers are read right after the
        # climb, and with the default contrast merge the re-pinned chain could answer as before
        "merge: auto\n"
        "feedback: {key: ../keys/cardiology, min_corrections: 150, steps: 30, lr: 0.003}\n"
        "gate: {parent: 0.1, probe: 0.1, canary: 0.1, repin: 0.1}\n"
        "customize: {key: ../keys/service, n_epochs: 2, learning_rate: 0.01, lora_rank: 4, batch_size: 4,"
        " max_seq_len: 32, held_out: 0.2}\n"
    )
    config = DemoConfig(
        built / "tree",
        tmp_path / "state",
        tmp_path / "report",
        built / "data" / "en/medical/oncology" / "local.txt",
        max_new_tokens=6,
        update_steps=20,
        policy=policy,
        clinic_answers=200,
        clinic_notes=REPO / "examples" / "demo" / "northfield-notes.txt",
    )
    console = Console(record=True, width=160)
    tables = run(config, console)

    # (1) a profile per row, each with a node on the cardiology path (or a reason it does not fit)
    match = [r for r in tables["match"].rows if not r[0].startswith("  (#")]
    assert [r[0].split(" (")[0] for r in match] == ["clinician laptop", "GPU workstation"]
    assert all(r[1] == f"{TREE}/en/medical/cardiology" and r[4] in ("perfect", "good") for r in match)
    # (2) the four levels answered, each at its version, with tokens
    chain = tables["chain"].rows
    assert [r[0] for r in chain] == [TREE, f"{TREE}/en", f"{TREE}/en/medical", f"{TREE}/en/medical/cardiology"]
    assert [r[1] for r in chain] == [0, 1, 1, 1] and all(r[2] > 0 and r[3] > 0 for r in chain)
    # (2b) the openai client over HTTP gets the cardiology node's greedy answer of the gRPC stream
    (openai_row,) = tables["openai"].rows
    assert openai_row[2] == f"{TREE}/en/medical/cardiology@1" and openai_row[3] == chain[-1][5]
    # (3) the owner uses its private node; the other tenant neither sees it nor may call it
    rows = tables["tenants"].rows
    assert [(r[0], r[1]) for r in rows[::2]] == [
        ("st-marys", "nodes() lists it: True"),
        ("globex", "nodes() lists it: False"),
    ]
    assert rows[1][2].startswith("v1:") and rows[3][2].startswith("NodeNotFound: NOT_FOUND")
    # (3b) the laptop pulled the registry's pick, verified from root's fingerprint, and stock
    # transformers repeats the server's greedy tokens offline (llama.cpp: only where it is installed)
    pulled = {r[0]: r[1] for r in tables["pull"].rows}
    pick = next(v for k, v in pulled.items() if k.startswith("treelm pull (the registry's pick for cpu:2GiB)"))
    assert pick.startswith(f"{TREE}/en/medical/cardiology v1 ") and "signature verified from root" in pick
    offline = next(v for k, v in pulled.items() if k.startswith("stock transformers, offline"))
    assert re.match(r"greedy tokens equal to the server's: (\d+)/\1; prompt tokenized as the server did: True", offline)
    if laptop.llama_installed():
        llama = next(v for k, v in pulled.items() if k.startswith("llama.cpp"))
        assert re.match(r"greedy tokens equal to the server's: \d+/\d+", llama)
    else:
        assert any("llama-cpp-python is not installed" in n for n in tables["pull"].notes)
    # (4e) after the update, --check on the laptop's copy: cardiology was re-pinned over the new
    # parent version (the same version of the node, other weights), and --upgrade fetches that chain
    checked = pulled["after the update: treelm pull --check"]
    assert (
        checked.startswith(f"{TREE}/en/medical/cardiology ")
        and "pulled v1, stable v1: newer: re-pinned over" in checked
    )
    assert "en/medical@v2 -> en/medical/cardiology@v1 (the laptop has" in checked and "en/medical@v1 ->" in checked
    upgraded = pulled["treelm pull --upgrade (verified, then switched atomically)"]
    assert upgraded.startswith("the laptop now has en@v1 -> en/medical@v2 -> en/medical/cardiology@v1")
    # (4) the update went through and the tampered copy was refused for its signature
    update = tables["update"].rows
    steps = {r[0]: r[2] for r in update}
    assert steps["submit: verify, screen, gate, aggregate"].startswith("aggregated")
    assert steps["the hospital's node is served at its new version"].endswith("v2")
    assert steps["new stable parent"].endswith("= v2")
    repinned = [r for r in update if r[0] == "re-pinned over the new parent"]
    assert repinned and all("en/medical@v2" in r[2] for r in repinned)
    assert "PermissionDenied [threshold]" in steps["submit a tampered copy"]
    # (5) feedback became an update on the policy's decision; it climbed; the answers changed
    learned = {r[0]: r[2] for r in tables["learning"].rows}
    assert learned["answers rated -1 and corrected with the clinic's truth"].startswith("200 feedback records")
    assert (
        learned["the update policy decides"]
        == "make: made update for ut/en/medical/cardiology (st-marys) because 200 new corrections >= 150"
    )
    assert re.match(r"aggregated; held-out feedback perplexity -\d", learned["the update: screened, gated, served"])
    assert learned["the node is served at its new version"].endswith("v2")
    assert learned["it climbs: en/medical's candidate approved"].endswith("stable")
    changed, total = learned["answers to the corrected questions changed"].split("/")
    assert total == "200" and int(changed) > 0
    # (6) a second clinic's job made its private node while the others were served: none of their
    # requests failed, the node beat its parent on held-out notes, and globex gets the unknown model's 404
    grown = dict(tables["customize"].rows)
    assert grown["job"].endswith(f"succeeded, fine_tuned_model {TREE}/en/medical/northfield-paediatrics")
    parent_ppl, node_ppl = map(float, re.findall(r"[\d.]+", grown["held-out perplexity"]))
    assert node_ppl < parent_ppl
    assert re.match(r"\d+ answered, 0 failed", grown["other tenants' requests meanwhile"])
    assert grown[f"globex asks {TREE}/en/medical/northfield-paediatrics"] == "404 model_not_found"
    assert grown["northfield's answer"]
    # (7) the status table and the report
    assert any(r[1] == "loaded adapters" for r in tables["status"].rows)
    names = sorted(p.name for p in config.report.iterdir())
    assert {
        "match.json",
        "chain.json",
        "tenants.json",
        "pull.json",
        "update.json",
        "status.json",
        "tree.png",
        "tokens_per_s.png",
    } <= set(names)
    assert json.loads((config.report / "chain.json").read_text())["rows"][0][0] == TREE
    assert (config.report / "tree.png").read_bytes().startswith(b"\x89PNG")
    assert "4. St Mary's updates its private node" in console.export_text()

    # Re-runnable: the same state dir starts again from version 1; the built tree is untouched.
    again = run(config, Console(record=True, width=160))
    assert {r[0]: r[2] for r in again["update"].rows}["new stable parent"].endswith("= v2")
    assert sorted((p.relative_to(built), p.stat().st_mtime_ns) for p in (built / "tree").rglob("*")) == built_before


def test_agreement_counts_the_leading_tokens_that_match():
    assert laptop.agreement([1, 2, 3], [1, 2, 4]) == "2/3"
    assert laptop.agreement([1, 2, 3], [1, 2, 3, 9]) == "3/3"
    assert laptop.agreement([1, 2, 3], [1]) == "1/3" and laptop.agreement([], [5]) == "0/0"
