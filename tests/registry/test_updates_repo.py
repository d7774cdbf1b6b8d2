"""registry.updates: a list of changes is applied in one transaction (all or nothing), versions
keep their numbering and status rules, pins are an append-only history, events are recorded."""

from __future__ import annotations

import pytest

from registry import AliasError, Conflict, NodeNotFound, StatusTransitionError
from registry.errors import UpdateNotFound
from registry.updates import (
    AddEvent,
    AddPin,
    AddUpdate,
    AddVersion,
    MoveAlias,
    SetKeyGroup,
    SetStatus,
    SetUpdate,
    apply_changes,
    current_pins,
    get_update,
    list_key_groups,
    list_update_events,
    list_updates,
    pin_history,
    tree_versions,
)
from tests.registry.helpers import digest, snapshot

MED, RAD = "demo/en/medical", "demo/en/medical/radiology"


def _chain(*versions: int) -> list[dict]:
    paths = ["en", "en/medical", "en/medical/radiology"]
    return [{"path": p, "version": v, "adapter": digest(f"{p}{v}")} for p, v in zip(paths, versions, strict=False)]


def test_a_failing_change_rolls_back_every_change_before_it(demo_reg, db_url):
    before = snapshot(db_url)
    bad = [
        AddVersion(MED, 2, 1, digest("m2"), "candidate"),
        AddEvent("candidate", node=MED),
        MoveAlias(MED, "stable", 2),  # stable needs an accepted version
    ]
    with pytest.raises(AliasError):
        apply_changes(demo_reg, bad)
    assert snapshot(db_url) == before
    for changes, error in (
        ([AddVersion(MED, 3, 1, digest("m3"))], Conflict),  # not the next number
        ([AddVersion(MED, 2, 1, digest("m2")), SetStatus(MED, 1, "candidate")], StatusTransitionError),
        ([AddPin("demo/en/nowhere", 1, _chain(1))], NodeNotFound),
        ([SetUpdate("0" * 32, state="stable")], UpdateNotFound),
    ):
        with pytest.raises(error):
            apply_changes(demo_reg, changes)
        assert snapshot(db_url) == before


def test_versions_updates_pins_and_events_round_trip(demo_reg):
    apply_changes(
        demo_reg,
        [
            AddVersion(MED, 2, 1, digest("m2"), "candidate", {"adapter_sha256": digest("a")}),
            MoveAlias(MED, "candidate", 2),
            AddUpdate(
                "u1",
                "candidate",
                MED,
                2,
                1,
                "demo/en",
                "awaiting-approval",
                digest("m2"),
                "{}",
                figures={"gate": {"passed": True}},
                reasons=["gate passed"],
            ),
            AddPin(RAD, 1, _chain(1, 1, 1)),
            AddEvent("candidate", node=MED, update_id="u1", detail={"version": 2}),
        ],
    )
    apply_changes(
        demo_reg,
        [
            SetStatus(MED, 2, "accepted"),
            MoveAlias(MED, "stable", 2),
            SetUpdate(
                "u1",
                state="stable",
                approvals=[{"keyid": "k", "sig": "s"}],
                reasons=["approved"],
                figures={"approved": 1},
            ),
            AddPin(RAD, 1, _chain(1, 2, 1)),
            SetKeyGroup("evaluator", MED, 2, 1),
            SetKeyGroup("evaluator", MED, 1, 2),
            SetKeyGroup("root", None, 1, 1),
        ],
    )
    versions = tree_versions(demo_reg, "demo")
    assert (versions[MED].latest, versions[MED].stable, versions[MED].statuses) == (
        2,
        2,
        {1: "accepted", 2: "accepted"},
    )
    entry = get_update(demo_reg, "u1")
    assert (entry.state, entry.reasons, entry.figures) == (
        "stable",
        ("gate passed", "approved"),
        {"gate": {"passed": True}, "approved": 1},
    )
    assert entry.approvals == ({"keyid": "k", "sig": "s"},) and entry.target == "demo/en"
    assert [u.update_id for u in list_updates(demo_reg, target="demo/en", states=("stable",))] == ["u1"]
    assert list_updates(demo_reg, node=RAD) == ()
    assert [p.chain[1]["version"] for p in pin_history(demo_reg, RAD)] == [1, 2]
    assert current_pins(demo_reg, "demo")[RAD].chain == tuple(_chain(1, 2, 1))
    groups = {(g.role, g.scope): (g.threshold, g.version) for g in list_key_groups(demo_reg)}
    assert groups == {("evaluator", MED): (1, 2), ("root", None): (1, 1)}
    assert [(e.event, e.node_id, e.update_id) for e in list_update_events(demo_reg, node=MED)] == [
        ("candidate", MED, "u1")
    ]
