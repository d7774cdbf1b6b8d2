"""Rebasing: when en/medical's new version becomes stable, each child gets a rebased version
(re-fit over the new parent towards its old effective model), gated within 1% on its own text,
signed with the policy's rebase key, recorded with its history, and served over the new parent."""

from __future__ import annotations

import pytest

from cluster.updates.keys import write_key_files
from cluster.updates.policy import RebasePolicy, UpdatePolicy
from cluster.updates.rebase import LocalRefitter
from hierarchy.updates.envelope import Envelope, sign_payload
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import parse_manifest
from hierarchy.updates.statements import ROLLBACK_PAYLOAD_TYPE, rollback_statement
from nodes.build.gate import GateBounds
from registry.forgetting import history
from registry.updates import current_pins, list_update_events, list_updates
from tests.cluster.update_world import TREE, built_tree, honest_adapter, make_world, package_of

MED = "en/medical"
CHILDREN = ("en/medical/radiology", "en/medical/cardiology", "en/medical/oncology")


def _approve(w, candidate_id: str) -> None:
    envelope = Envelope.from_bytes(w.coordinator.status(candidate_id).envelope)
    for key in (w.keys.evaluators[MED], w.keys.operator):
        w.coordinator.approve(candidate_id, key.keyid, key.sign(envelope.pae()))


@pytest.fixture(scope="module")
def rebased(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rebase")
    key = SigningKey.generate()
    write_key_files(folder / "rebase-key", key)
    policy = UpdatePolicy(rebase=RebasePolicy(steps=12, lr=2e-3, batch_size=4, key=str(folder / "rebase-key")))
    w = make_world(folder, built_tree(tmp_path_factory), policy)
    status = w.coordinator.submit(package_of(w, "en/medical/oncology", honest_adapter(w, "en/medical/oncology"))[0])
    before = {p: w.coordinator._view().pins[p].chain for p in CHILDREN}
    _approve(w, status.candidate_id)  # stable -> (no background runner) the children are rebased now
    yield w, key, before
    w.close()


def test_each_child_gets_a_signed_rebased_version_within_the_bound(rebased):
    w, key, before = rebased
    records = {u.node_id: u for u in list_updates(w.registry, tree=TREE) if u.kind == "rebase"}
    events = [e for e in list_update_events(w.registry) if e.event in ("rebased", "rebase-rejected")]
    assert len(events) == 3
    pins = current_pins(w.registry, TREE)
    med_chain = pins[f"{TREE}/{MED}"].chain
    for child in CHILDREN:
        node_id = f"{TREE}/{child}"
        if node_id not in records:  # refused by the gate: the event says why, and the child kept its pin
            refused = next(e for e in events if e.node_id == node_id)
            assert refused.event == "rebase-rejected" and "rebase" in refused.detail["reason"]
            continue
        record = records[node_id]
        assert record.state == "stable" and record.target == f"{TREE}/{MED}"
        envelope = Envelope.from_bytes(record.envelope.encode())
        assert [s.keyid for s in envelope.signatures] == [key.keyid]
        assert key.public.verify(envelope.signatures[0].sig, envelope.pae())
        manifest = parse_manifest(envelope.payload)
        assert manifest.version == record.version and manifest.parent_version == 2
        check = record.figures["rebased"]
        assert abs(check["change"]) <= 0.01 and check["passed"]
        assert record.figures["fit"]["on"] == "local" and record.figures["fit"]["seconds"] > 0
        # Served over en/medical v2 with the rebased version, made for that chain.
        chain = pins[node_id].chain
        assert list(chain[:-1]) == list(med_chain) and chain[-1]["version"] == record.version
        assert pins[node_id].status == "pinned"
        # History: the old version (over en/medical v1) and the rebased one, with the stale figure.
        points = history(w.registry, node_id)
        rebase_points = {p.role: p.perplexity for p in points if p.origin == "rebase"}
        assert {"own", "parent", "sibling", "stale"} <= set(rebase_points)
        assert rebase_points["stale"] == pytest.approx(record.figures["stale"]["after"])
        replaced = before[child][-1].version  # recorded too (with the rebase, or with its own package)
        assert replaced < record.version and replaced in {p.version for p in points}
    assert records, "at least one child must have been rebased on the tiny tree"


def test_no_key_no_rebase_and_a_failed_gate_keeps_the_pin(tmp_path_factory):
    # Without rebase.key the protocol re-pins as before and makes no rebased version.
    w = make_world(tmp_path_factory.mktemp("nokey"), built_tree(tmp_path_factory))
    try:
        assert not w.coordinator.policy.rebase.enabled
        status = w.coordinator.submit(package_of(w, "en/medical/oncology", honest_adapter(w, "en/medical/oncology"))[0])
        _approve(w, status.candidate_id)
        assert not [u for u in list_updates(w.registry, tree=TREE) if u.kind == "rebase"]
    finally:
        w.close()
    # A rebase bound of 0: no re-fit is exactly the old model, every rebase is refused; pins stay.
    folder = tmp_path_factory.mktemp("strict")
    write_key_files(folder / "k", SigningKey.generate())
    policy = UpdatePolicy(
        rebase=RebasePolicy(steps=2, batch_size=2, key=str(folder / "k")), gate=GateBounds(rebase=0.0)
    )
    w = make_world(folder, built_tree(tmp_path_factory), policy)
    try:
        status = w.coordinator.submit(package_of(w, "en/medical/oncology", honest_adapter(w, "en/medical/oncology"))[0])
        _approve(w, status.candidate_id)
        pins_after_approval = {k: v.chain for k, v in current_pins(w.registry, TREE).items()}
        refused = [e for e in list_update_events(w.registry) if e.event == "rebase-rejected"]
        assert len(refused) == 3 and not [u for u in list_updates(w.registry, tree=TREE) if u.kind == "rebase"]
        assert all(len(v) == 3 for k, v in pins_after_approval.items() if k.count("/") == 3)
    finally:
        w.close()


def test_a_rebase_whose_parent_moved_while_it_was_re_fit_is_dropped(tmp_path_factory):
    """Re-fits run outside the tree's lock: if the parent moves meanwhile (here an operator rolls
    en/medical back while the children are being re-fit), the results are dropped rather than
    recorded over a chain that is no longer served, and the children keep their pins."""
    folder = tmp_path_factory.mktemp("moved")
    write_key_files(folder / "k", SigningKey.generate())
    policy = UpdatePolicy(rebase=RebasePolicy(steps=2, batch_size=2, key=str(folder / "k")))
    w = make_world(folder, built_tree(tmp_path_factory), policy)
    local = LocalRefitter(w.coordinator.bench)

    class RollingBack:  # the real re-fits, then the operator's rollback before they are recorded
        def fit(self, requests):
            out = local.fit(requests)
            node = f"{TREE}/{MED}"
            statement = rollback_statement(node, 2, 1)
            w.coordinator.rollback(node, 1, sign_payload(ROLLBACK_PAYLOAD_TYPE, statement, [w.keys.operator]))
            return out

    w.coordinator.refitter = RollingBack()
    try:
        status = w.coordinator.submit(package_of(w, "en/medical/oncology", honest_adapter(w, "en/medical/oncology"))[0])
        _approve(w, status.candidate_id)
        assert not [u for u in list_updates(w.registry, tree=TREE) if u.kind == "rebase"]
        assert not [e for e in list_update_events(w.registry) if e.event in ("rebased", "rebase-rejected")]
        pins = current_pins(w.registry, TREE)
        med_v1 = pins[f"{TREE}/{MED}"].chain
        assert med_v1[-1]["version"] == 1
        for child in CHILDREN:  # served over en/medical v1 again, with no rebased version
            assert list(pins[f"{TREE}/{child}"].chain[:-1]) == list(med_v1)
    finally:
        w.close()
