"""When a parent absorbs: m screened increments or a time window; the candidate is exactly
SVD_r(parent + eta * mean of the increments); a child that fails re-validation over the new
parent keeps serving over the old one (held) until an operator repins it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch

from cluster.cli import main
from cluster.updates.coordinator import Coordinator
from cluster.updates.policy import UpdatePolicy
from hierarchy.errors import ThresholdError
from hierarchy.updates.aggregate import MergePolicy, WeightedDelta, candidate_parent
from hierarchy.updates.envelope import Envelope
from nodes.build.finetune import increment
from nodes.build.gate import GateBounds
from nodes.store.versions import ChainLink
from registry.updates import current_pins, get_update
from tests.cluster.update_world import TREE, built_tree, honest_adapter, make_world, package_of, served

RAD, CARD, ONC, MED = "en/medical/radiology", "en/medical/cardiology", "en/medical/oncology", "en/medical"


def test_the_parent_waits_for_m_increments_then_merges_them_exactly(tmp_path_factory):
    w = make_world(
        tmp_path_factory.mktemp("m2"), built_tree(tmp_path_factory), UpdatePolicy(min_updates=2, merge="auto")
    )
    try:
        parent = served(w, MED)[1]
        olds = {p: served(w, p)[1] for p in (RAD, CARD)}
        news = {p: honest_adapter(w, p) for p in (RAD, CARD)}
        first = w.coordinator.submit(package_of(w, RAD, news[RAD])[0])
        assert first.state == "pending" and first.candidate_id is None
        second = w.coordinator.submit(package_of(w, CARD, news[CARD])[0])
        assert (
            second.state == "aggregated" and w.coordinator.status(first.update_id).candidate_id == second.candidate_id
        )
        candidate = w.coordinator.status(second.candidate_id)
        manifest = Envelope.from_bytes(candidate.envelope)
        assert b'"increments":2.0' in manifest.payload and candidate.figures["merge.relative_error"] >= 0
        # What was stored is SVD_r(parent + eta * mean(increments)) computed from the versions themselves.
        children = [WeightedDelta(increment(olds[p], news[p]), 1.0, p) for p in (RAD, CARD)]
        want = candidate_parent(parent.factors, children, MergePolicy(method="auto", eta=0.5))
        stored = w.coordinator.bench.adapter(
            ChainLink.from_dict(get_update(w.registry, second.candidate_id).figures["to"])
        )
        for module, f in want.factors.items():
            torch.testing.assert_close(stored.factors[module].delta(), f.delta(), rtol=0, atol=1e-5)
    finally:
        w.close()


def test_a_time_window_aggregates_fewer_than_m(tmp_path_factory):
    now = [1_900_000_000.0]
    w = make_world(
        tmp_path_factory.mktemp("window"),
        built_tree(tmp_path_factory),
        UpdatePolicy(min_updates=5, window_s=3600),
        clock=lambda: now[0],
    )
    try:
        status = w.coordinator.submit(
            package_of(w, RAD, honest_adapter(w, RAD), now=datetime.fromtimestamp(now[0], tz=UTC))[0]
        )
        assert status.state == "pending" and w.coordinator.tick() == []
        now[0] += 1800
        assert w.coordinator.tick() == []  # half the window: still waiting for m = 5
        now[0] += 1801
        made = w.coordinator.tick()
        assert len(made) == 1 and w.coordinator.status(status.update_id).candidate_id == made[0]
    finally:
        w.close()


def test_a_child_failing_revalidation_is_held_until_an_operator_repins_it(tmp_path_factory, tmp_path, capsys):
    policy = UpdatePolicy(gate=GateBounds(repin=0.0))  # any rise on a probe holds the child
    w = make_world(tmp_path_factory.mktemp("held"), built_tree(tmp_path_factory), policy)
    try:
        status = w.coordinator.submit(package_of(w, ONC, honest_adapter(w, ONC))[0])
        envelope = Envelope.from_bytes(w.coordinator.status(status.candidate_id).envelope)
        for key in (w.keys.evaluators[MED], w.keys.operator):
            w.coordinator.approve(status.candidate_id, key.keyid, key.sign(envelope.pae()))
        pins = current_pins(w.registry, TREE)
        held = {k for k, p in pins.items() if p.status == "held"}
        assert held, "with a zero re-pin bound some sibling's probe rises and it is held"
        for node_id, pin in pins.items():
            if node_id in (f"{TREE}/{RAD}", f"{TREE}/{CARD}"):
                versions = {x["path"]: x["version"] for x in pin.chain}
                assert versions[MED] == (1 if node_id in held else 2), node_id
                assert (pin.status == "held") == ("REGRESSION" in pin.reason)
        node = sorted(held)[0]
        served_tree = w.coordinator.served_tree()
        assert {n.version for n in (served_tree.chain(node)[1], served_tree.chain(f"{TREE}/{MED}")[1])} == {1, 2}
        (tmp_path / "op").mkdir()
        (tmp_path / "op" / "private.pem").write_bytes(w.keys.operator.to_pem())
        (tmp_path / "op" / "private.pem").chmod(0o600)  # a private key others may read is refused
        code = main(["update", "repin", node, "--key", str(tmp_path / "op"), "--tree", str(w.tree), "--db", w.url])
        assert code == 0 and "en/medical@v2" in capsys.readouterr().out
        pin = current_pins(w.registry, TREE)[node]
        assert pin.status == "pinned" and {x["path"]: x["version"] for x in pin.chain}[MED] == 2
        code = main(["update", "repin", node, "--key", str(tmp_path / "op"), "--tree", str(w.tree), "--db", w.url])
        assert code == 0
        with pytest.raises(ThresholdError):
            w.coordinator.repin(node, [])  # no operator signature
    finally:
        w.close()


def test_a_first_level_node_update_is_gated_on_itself_and_its_subtree_follows(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("first-level"), built_tree(tmp_path_factory))
    try:
        status = w.coordinator.submit(package_of(w, "en", honest_adapter(w, "en"))[0])
        assert (status.state, status.parent, status.candidate_id) == ("stable", TREE, None)  # the base absorbs nothing
        assert {k.split(".")[2] for k in status.figures if k.startswith("gate.checks.")} == {
            f"update {TREE}/en on its own probe",
            "canary",
        }
        pins = current_pins(w.registry, TREE)
        assert [x["version"] for x in pins[f"{TREE}/en"].chain] == [2]
        for node_id, pin in pins.items():  # every descendant re-validated: over en v2, or held on en v1
            assert pin.chain[0]["version"] == (1 if pin.status == "held" else 2), node_id
    finally:
        w.close()


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "512"])
def test_gate_max_tokens_must_be_a_positive_integer(value):
    from cluster.errors import PolicyError

    assert UpdatePolicy(gate_max_tokens=512).gate_max_tokens == 512 and UpdatePolicy().gate_max_tokens is None
    with pytest.raises(PolicyError, match="gate_max_tokens"):
        UpdatePolicy(gate_max_tokens=value)


def test_with_a_background_runner_approval_returns_before_the_next_levels_round(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("bg"), built_tree(tmp_path_factory))
    try:
        later: list = []
        w.coordinator = Coordinator.open(w.registry, w.tree, w.coordinator.policy, background=later.append)
        status = w.coordinator.submit(package_of(w, ONC, honest_adapter(w, ONC))[0])
        envelope = Envelope.from_bytes(w.coordinator.status(status.candidate_id).envelope)
        for key in (w.keys.evaluators[MED], w.keys.operator):
            done = w.coordinator.approve(status.candidate_id, key.keyid, key.sign(envelope.pae()))
        assert done.state == "stable" and len(later) == 1  # the round for en is queued, not run
        contribution = w.coordinator.updates(node=f"{TREE}/{MED}")
        assert [u.state for u in contribution if u.kind == "contribution"] == ["pending"]
        assert not [u for u in w.coordinator.updates(node=f"{TREE}/en") if u.kind == "candidate"]
        later.pop()()  # the runner runs it: en gets its candidate
        (candidate,) = [u for u in w.coordinator.updates(node=f"{TREE}/en") if u.kind == "candidate"]
        assert candidate.state == "awaiting-approval"
        assert w.coordinator.tick() == []  # one candidate at a time: nothing more to make
    finally:
        w.close()


def test_a_queued_round_lost_to_a_crash_is_made_by_tick(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("bg-lost"), built_tree(tmp_path_factory))
    try:
        w.coordinator = Coordinator.open(w.registry, w.tree, w.coordinator.policy, background=lambda job: None)
        status = w.coordinator.submit(package_of(w, ONC, honest_adapter(w, ONC))[0])
        envelope = Envelope.from_bytes(w.coordinator.status(status.candidate_id).envelope)
        for key in (w.keys.evaluators[MED], w.keys.operator):
            w.coordinator.approve(status.candidate_id, key.keyid, key.sign(envelope.pae()))
        assert not [u for u in w.coordinator.updates(node=f"{TREE}/en") if u.kind == "candidate"]
        made = w.reopen().tick()  # a restarted coordinator: the pending contribution is still there
        assert len(made) == 1 and w.coordinator.status(made[0]).node == f"{TREE}/en"
    finally:
        w.close()
