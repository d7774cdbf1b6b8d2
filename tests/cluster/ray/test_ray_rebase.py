"""Rebases on a Ray cluster: when en/medical's new version becomes stable, the desk's refitter hands
its three children to Ray at once, each re-fit a task of its own (cluster/ray/rebase.py); the desk
gates, signs and records each as the local path does (tests/cluster/test_updates_rebase.py)."""

from __future__ import annotations

import pytest

from cluster.ray.priority import BACKGROUND_NICENESS
from cluster.ray.rebase import RayRefitter
from cluster.updates.keys import write_key_files
from cluster.updates.policy import RebasePolicy, UpdatePolicy
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import SigningKey
from registry.updates import current_pins, list_update_events, list_updates
from tests.cluster.update_world import TREE, built_tree, honest_adapter, make_world, package_of

MED = "en/medical"
CHILDREN = ("en/medical/radiology", "en/medical/cardiology", "en/medical/oncology")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_levels_rebases_run_as_parallel_ray_tasks(ray_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-rebase")
    key = SigningKey.generate()
    write_key_files(folder / "rebase-key", key)
    policy = UpdatePolicy(rebase=RebasePolicy(steps=12, lr=2e-3, batch_size=4, key=str(folder / "rebase-key")))
    w = make_world(folder, built_tree(tmp_path_factory), policy)
    # Half a CPU each: the session cluster's replicas hold some of its 4.
    w.coordinator.refitter = RayRefitter(cpus=0.5, threads=1)
    try:
        status = w.coordinator.submit(package_of(w, "en/medical/oncology", honest_adapter(w, "en/medical/oncology"))[0])
        envelope = Envelope.from_bytes(w.coordinator.status(status.candidate_id).envelope)
        for signer in (w.keys.evaluators[MED], w.keys.operator):
            w.coordinator.approve(status.candidate_id, signer.keyid, signer.sign(envelope.pae()))
        # No background runner: the approval returned after the rebases.
        events = [e for e in list_update_events(w.registry) if e.event in ("rebased", "rebase-rejected")]
        assert sorted(e.node_id for e in events) == sorted(f"{TREE}/{c}" for c in CHILDREN)
        fits = [e.detail["fit"] for e in events]
        # One batch of three Ray tasks, each with its own task id and the half CPU it asked for.
        assert all(f["on"] == "ray" and f["batch"] == 3 and f["resources"].get("CPU") == 0.5 for f in fits)
        assert all(f["niceness"] == BACKGROUND_NICENESS for f in fits)  # the replicas decode first
        assert len({f["task"] for f in fits}) == 3 and all(f["seconds"] > 0 for f in fits)
        records = {u.node_id: u for u in list_updates(w.registry, tree=TREE) if u.kind == "rebase"}
        assert records, "at least one child must have been rebased on the tiny tree"
        pins = current_pins(w.registry, TREE)
        for node_id, record in records.items():
            assert record.state == "stable" and abs(record.figures["rebased"]["change"]) <= 0.01
            assert record.figures["fit"]["on"] == "ray"
            assert pins[node_id].chain[-1]["version"] == record.version and pins[node_id].status == "pinned"
    finally:
        w.close()
