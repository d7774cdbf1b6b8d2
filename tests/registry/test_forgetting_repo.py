"""registry.forgetting: a version's perplexities are written with it, in one transaction; the
history of a node reads back by version; latest() gives each node's newest version's points."""

from __future__ import annotations

import math

import pytest

from registry import NodeNotFound
from registry.errors import InvalidInput
from registry.forgetting import AddPerplexities, history, latest
from registry.updates import AddVersion, apply_changes
from tests.registry.helpers import digest, snapshot

MED, RAD, CARD, LEGAL = "demo/en/medical", "demo/en/medical/radiology", "demo/en/medical/cardiology", "demo/en/legal"


def test_perplexities_are_written_with_their_version_and_read_back_by_version(demo_reg):
    apply_changes(
        demo_reg,
        [
            AddPerplexities(RAD, 1, "genesis", [("own", RAD, 8.0), ("parent", MED, 12.0)]),
            AddVersion(RAD, 2, 1, digest("r2"), "accepted"),
            AddPerplexities(RAD, 2, "rebase", [("own", RAD, 8.05), ("sibling", CARD, 9.5), ("stale", RAD, 8.6)]),
        ],
    )
    points = history(demo_reg, RAD)
    assert [(p.version, p.origin, p.role, p.text_node, p.perplexity) for p in points] == [
        (1, "genesis", "own", RAD, 8.0),
        (1, "genesis", "parent", MED, 12.0),
        (2, "rebase", "own", RAD, 8.05),
        (2, "rebase", "sibling", CARD, 9.5),
        (2, "rebase", "stale", RAD, 8.6),
    ]
    apply_changes(demo_reg, [AddPerplexities(MED, 1, "genesis", [("own", MED, 11.0), ("sibling", LEGAL, 30.0)])])
    newest = latest(demo_reg, "demo")
    assert {n: sorted(p.role for p in ps) for n, ps in newest.items()} == {
        RAD: ["own", "sibling", "stale"],
        MED: ["own", "sibling"],
    }
    assert latest(demo_reg, "other") == {} and history(demo_reg, CARD) == []
    with pytest.raises(NodeNotFound):
        history(demo_reg, "demo/en/nowhere")


@pytest.mark.parametrize(
    "change, error",
    [
        (AddPerplexities(RAD, 2, "candidate", [("own", RAD, 8.0)]), None),  # fine alone; fails below
        (AddPerplexities(RAD, 2, "guess", [("own", RAD, 8.0)]), "origin"),
        (AddPerplexities(RAD, 2, "rebase", [("cousin", RAD, 8.0)]), "role"),
        (AddPerplexities(RAD, 2, "rebase", [("own", RAD, math.nan)]), "perplexity"),
        (AddPerplexities(RAD, 2, "rebase", [("own", RAD, -1.0)]), "perplexity"),
        (AddPerplexities(RAD, 0, "rebase", [("own", RAD, 8.0)]), "version"),
        (AddPerplexities(RAD, 2, "rebase", [("own", "demo/en/nowhere", 8.0)]), "nowhere"),
    ],
)
def test_a_bad_point_writes_nothing_not_even_the_version(demo_reg, db_url, change, error):
    before = snapshot(db_url)
    version = AddVersion(RAD, 2, 1, digest("r2"), "accepted")
    if error is None:  # a version and its points commit together
        apply_changes(demo_reg, [version, change])
        assert len(history(demo_reg, RAD)) == 1
        return
    with pytest.raises((InvalidInput, NodeNotFound), match=error):
        apply_changes(demo_reg, [version, change])
    assert snapshot(db_url) == before
