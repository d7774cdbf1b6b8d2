"""The feedback repository on SQLite and (when configured) PostgreSQL: isolation, retention, deletion."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from registry.errors import FeedbackDeleted, InvalidInput, ResponseNotFound
from registry.feedback import (
    MAX_CORRECTION_BYTES,
    ResponseEntry,
    add_feedback,
    delete_feedback,
    feedback_stats,
    list_decisions,
    list_feedback,
    list_retention,
    mark_used,
    record_decision,
    record_responses,
    retention_enabled,
    set_retention,
    training_examples,
)
from registry.models import FeedbackRow, ResponseRow

NODE = "demo/en/medical"


def _prompt(q: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}]})


@pytest.fixture
def filled(reg):
    set_retention(reg, "st", NODE, True)
    record_responses(
        reg,
        [
            ResponseEntry("st", "r1", NODE, 1, _prompt("q1"), "wrong 1"),
            ResponseEntry("st", "r2", NODE, 1, _prompt("q2"), "right 2"),
            ResponseEntry("other", "r3", NODE, 1, None, None),
        ],
    )
    return reg


def test_feedback_is_per_tenant_and_foreign_ids_are_not_found(filled):
    add_feedback(filled, "st", "r1", -1, "correct 1", ("cardio",))
    add_feedback(filled, "st", "r2", 1)
    with pytest.raises(ResponseNotFound):
        add_feedback(filled, "other", "r1", 1)  # st's response: the same as an unknown id
    with pytest.raises(ResponseNotFound):
        add_feedback(filled, "st", "nope", 1)
    assert [f.response_id for f in list_feedback(filled, "st")] == ["r2", "r1"]
    assert list_feedback(filled, "other") == ()
    exported = list_feedback(filled, "st", with_text=True)
    assert exported[1].as_json()["prompt"]["messages"][0]["content"] == "q1"
    assert exported[1].as_json()["tags"] == ["cardio"]


@pytest.mark.parametrize(
    ("rating", "correction", "tags", "field"),
    [
        (0, None, (), "rating"),
        (2, None, (), "rating"),
        (True, None, (), "rating"),
        (1, "x" * (MAX_CORRECTION_BYTES + 1), (), "correction"),
        (1, None, ("",), "tags"),
        (1, None, tuple(f"t{i}" for i in range(17)), "tags"),
    ],
)
def test_bad_feedback_is_refused_and_nothing_is_stored(filled, rating, correction, tags, field):
    with pytest.raises(InvalidInput) as err:
        add_feedback(filled, "st", "r1", rating, correction, tags)
    assert err.value.field == field
    with filled.read() as session:
        assert session.scalars(select(FeedbackRow)).all() == []


def test_training_examples_use_corrections_and_positive_answers_of_one_tenant(filled):
    add_feedback(filled, "st", "r1", -1, "correct 1")
    add_feedback(filled, "st", "r2", 1)
    add_feedback(filled, "other", "r3", -1, "other's correction")  # no retained prompt: not trainable
    examples = training_examples(filled, NODE, "st")
    assert [(e.target, e.rejected) for e in examples] == [("correct 1", "wrong 1"), ("right 2", None)]
    assert training_examples(filled, NODE, "other") == ()
    stats = {s.tenant: s for s in feedback_stats(filled, NODE)}
    assert stats["st"].corrections_waiting == 1 and stats["st"].trainable_waiting == 2
    assert stats["st"].negative_rate == 0.5 and stats["st"].baseline_negative_rate is None
    assert stats["other"].corrections_waiting == 0 and stats["other"].negative_waiting == 1
    assert mark_used(filled, [e.feedback_id for e in examples], "upd1") == 2
    assert training_examples(filled, NODE, "st") == ()
    after = {s.tenant: s for s in feedback_stats(filled, NODE)}["st"]
    assert after.corrections_waiting == 0 and after.baseline_negative_rate == 0.5


def test_deletion_is_final_and_erases_texts(filled):
    add_feedback(filled, "st", "r1", -1, "correct 1")
    assert delete_feedback(filled, "other") == 1  # only other's own response
    assert len(list_feedback(filled, "st")) == 1
    assert delete_feedback(filled, "st", NODE) == 2
    assert list_feedback(filled, "st") == ()
    assert training_examples(filled, NODE, "st", include_used=True) == ()
    with filled.read() as session:
        rows = session.scalars(select(ResponseRow).where(ResponseRow.tenant == "st")).all()
        assert rows and all(r.prompt is None and r.answer is None and r.deleted_at for r in rows)
    with pytest.raises(FeedbackDeleted):
        add_feedback(filled, "st", "r1", 1)


def test_retention_and_decisions(reg):
    assert not retention_enabled(reg, "st", NODE)
    set_retention(reg, "st", NODE, True)
    set_retention(reg, "x", NODE, True)
    set_retention(reg, "x", NODE, False)
    assert retention_enabled(reg, "st", NODE)
    assert list_retention(reg) == (("st", NODE),)
    # A repeated response id keeps its first row; another tenant may use the same id.
    assert record_responses(reg, [ResponseEntry("st", "a", NODE, 1), ResponseEntry("st", "a", NODE, 2)]) == 1
    assert record_responses(reg, [ResponseEntry("x", "a", NODE, 1)]) == 1
    record_decision(reg, NODE, "wait", "3 new corrections < 50")
    record_decision(reg, NODE, "make", "57 new corrections >= 50", update_id="u1")
    log = list_decisions(reg, NODE)
    assert [d.action for d in log] == ["make", "wait"] and log[0].update_id == "u1"
