"""`make demo`'s scenario with `--cluster` on the tiny tree: every step goes through a real Ray
cluster (`treelm cluster up` on free explicit ports): answers from its trunk replicas, the signed
update through its ingress to the update desk (gate, approvals, re-pins), the new versions served
by the replicas, and the cluster is taken down afterwards."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from examples.demo.scenario import DemoConfig, run
from tests.cluster.ray.cluster_harness import cluster_yaml, free_port_block
from tests.cluster.update_world import TREE, built_tree


def test_the_demo_scenario_reports_a_ray_cluster_and_takes_it_down(tmp_path_factory, tmp_path):
    built = built_tree(tmp_path_factory)
    temp_dir = Path(tempfile.mkdtemp(prefix="tl-demo-"))  # short: Ray's socket paths must stay under 108 bytes
    try:
        # The scenario replaces the registry and the trunk's tree with its own state's.
        template = cluster_yaml(
            tmp_path / "cluster.yaml",
            base=free_port_block(),
            registry_url="sqlite:///unused.db",
            temp_dir=temp_dir,
            trees={built / "tree": {"replicas": 1, "resources": {"cpus": 0.5}}},
        )
        policy = tmp_path / "update-policy.yaml"  # the update desk's timer runs the feedback policy every 2 s
        policy.write_text(
            "feedback: {key: ../keys/cardiology, min_corrections: 40, every_s: 2, steps: 30, lr: 0.003}\n"
            "gate: {parent: 0.1, probe: 0.1, canary: 0.1, repin: 0.1}\n"
        )
        config = DemoConfig(
            built / "tree",
            tmp_path / "state",
            tmp_path / "report",
            built / "data" / "en/medical/oncology" / "local.txt",
            cluster=template,
            max_new_tokens=4,
            update_steps=20,
            policy=policy,
            clinic_answers=60,
        )
        console = Console(record=True, width=160)
        tables = run(config, console)
        chain = tables["chain"].rows
        assert [r[1] for r in chain] == [0, 1, 1, 1] and all(r[2] > 0 for r in chain)
        (openai_row,) = tables["openai"].rows  # the openai client through the cluster's HTTP ingress
        assert openai_row[2] == f"{TREE}/en/medical/cardiology@1" and openai_row[3] == chain[-1][5]
        tenants = tables["tenants"].rows
        assert tenants[1][2].startswith("v1:") and tenants[3][2].startswith("NodeNotFound: NOT_FOUND")
        pulled = {r[0]: r[1] for r in tables["pull"].rows}  # from the cluster's ingress, which builds variants
        pick = next(v for k, v in pulled.items() if k.startswith("treelm pull (the registry's pick"))
        assert pick.startswith(f"{TREE}/en/medical/cardiology v1 ")
        offline = next(v for k, v in pulled.items() if k.startswith("stock transformers, offline"))
        assert re.match(r"greedy tokens equal to the server's: (\d+)/\1;", offline)
        assert "newer: re-pinned over" in pulled["after the update: treelm pull --check"]
        upgraded = pulled["treelm pull --upgrade (verified, then switched atomically)"]
        assert upgraded.startswith("the laptop now has en@v1 -> en/medical@v2 -> en/medical/cardiology@v1")
        update = {r[0]: r[2] for r in tables["update"].rows}
        assert update["submit: verify, screen, gate, aggregate"].startswith("aggregated")
        assert update["the hospital's node is served at its new version"].endswith("v2")  # by a Ray replica
        assert update["new stable parent"].endswith("= v2")
        learned = {r[0]: r[1:] for r in tables["learning"].rows}  # the desk decided on its own timer
        who, decision = learned["the update policy decides"]
        assert who == "Ray update desk (its timer)"
        assert re.fullmatch(
            r"make: made update for ut/en/medical/cardiology \(st-marys\) because \d+ new corrections >= 40", decision
        )
        assert learned["the node is served at its new version"][1].endswith("v2")  # by a Ray replica
        repinned = [r for r in tables["update"].rows if r[0] == "re-pinned over the new parent"]
        assert repinned and all("en/medical@v2" in r[2] for r in repinned)
        assert "PermissionDenied [threshold]" in update["submit a tampered copy"]
        rows = tables["status"].rows
        assert any(r[0] == "ray cluster" and "RUNNING" in r[2] for r in rows)
        replicas = [r for r in rows if r[0].startswith("  replica")]
        assert replicas and any(f"{TREE}/en/medical/cardiology" in r[2] for r in replicas)
        assert any(r[0].startswith("machine") and r[1] == "head" for r in rows)
        assert "through the Ray cluster" in console.export_text()
        # Down: the cluster's record is gone (`down` removes it after stopping the Ray head it started).
        assert not (tmp_path / "state" / "cluster" / "state.json").exists()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
