"""Feedback on responses: response ids, ratings and corrections, retention, deletion, training examples.

Every generation leaves a response row (tenant, response id, node, version) so feedback can find
it. Its prompt and answer texts are kept only where the tenant turned retention on for that node
(off by default): without them a rating still counts in the metrics and the update policy, but
nothing of it can become training data. A tenant sees, exports and deletes only its own records;
deleting erases the texts and the feedback and leaves a tombstone, so the response takes no later
feedback and nothing of it reaches a later update. The update-timing policy's decisions are
logged here too (`treelm update log`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, delete, func, select, update

from registry._rows import canonical_node_id, utc
from registry.db import Registry
from registry.errors import FeedbackDeleted, InvalidInput, ResponseNotFound
from registry.models import FeedbackRetention, FeedbackRow, PolicyDecision, ResponseRow, utcnow

__all__ = [
    "MAX_CORRECTION_BYTES",
    "MAX_TAGS",
    "MAX_TAG_CHARS",
    "DecisionRecord",
    "DecisionSummary",
    "FeedbackRecord",
    "FeedbackStats",
    "ResponseEntry",
    "TrainingExample",
    "add_feedback",
    "decision_summary",
    "delete_feedback",
    "feedback_stats",
    "list_decisions",
    "list_feedback",
    "list_retention",
    "mark_used",
    "record_decision",
    "record_responses",
    "retention_enabled",
    "set_retention",
    "training_examples",
]

MAX_CORRECTION_BYTES = 64 << 10  # a corrected answer; longer texts belong in `treelm update make`
MAX_TAGS = 16
MAX_TAG_CHARS = 64
_MAX_ID_CHARS = 128


@dataclass(frozen=True)
class ResponseEntry:
    """One finished generation, as the server records it (texts only under retention)."""

    tenant: str  # "" when auth is off
    response_id: str
    node: str
    version: int
    prompt: str | None = None  # JSON: {"prompt": text} or {"messages": [...]}
    answer: str | None = None


@dataclass(frozen=True)
class FeedbackRecord:
    id: int
    response_id: str
    tenant: str
    node: str
    version: int
    rating: int
    correction: str | None
    tags: tuple[str, ...]
    created_at: datetime
    used_by: str | None = None
    prompt: str | None = None  # only in exports, and only when retained
    answer: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "response_id": self.response_id,
            "node": self.node,
            "version": self.version,
            "rating": self.rating,
            "correction": self.correction,
            "tags": list(self.tags),
            "created_at": self.created_at.isoformat(),
            "used_by": self.used_by,
        }
        if self.prompt is not None:
            out["prompt"] = json.loads(self.prompt)
            out["answer"] = self.answer
        return out


@dataclass(frozen=True)
class FeedbackStats:
    """One tenant's feedback on one node; "waiting" is what no update has used yet."""

    node: str
    tenant: str
    positive_waiting: int = 0
    negative_waiting: int = 0
    positive_used: int = 0
    negative_used: int = 0
    corrections_waiting: int = 0  # with a correction and a retained prompt: trainable
    trainable_waiting: int = 0  # corrections plus positively rated retained answers
    oldest_waiting: datetime | None = None

    @property
    def ratings(self) -> int:
        return self.positive_waiting + self.negative_waiting + self.positive_used + self.negative_used

    @property
    def negative_rate(self) -> float:
        """Negative share of the ratings no update has used yet (0 when there are none)."""
        waiting = self.positive_waiting + self.negative_waiting
        return self.negative_waiting / waiting if waiting else 0.0

    @property
    def baseline_negative_rate(self) -> float | None:
        """Negative share of the ratings earlier updates used (None before the first)."""
        used = self.positive_used + self.negative_used
        return self.negative_used / used if used else None


@dataclass(frozen=True)
class TrainingExample:
    """A retained prompt with the answer to learn (a correction, or a positively rated answer)."""

    feedback_id: int
    prompt: dict[str, Any]  # {"prompt": text} or {"messages": [...]}
    target: str
    rejected: str | None = None  # the answer a correction replaced (for preference training)


@dataclass(frozen=True)
class DecisionRecord:
    at: datetime
    node: str
    action: str
    reason: str
    update_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def _tenant(tenant: str | None) -> str:
    return tenant or ""


def _check_id(response_id: str) -> str:
    if not isinstance(response_id, str) or not response_id or len(response_id) > _MAX_ID_CHARS:
        raise InvalidInput(f"a response id is 1 to {_MAX_ID_CHARS} characters", field="response_id")
    return response_id


def record_responses(reg: Registry, entries: Sequence[ResponseEntry]) -> int:
    """Store finished generations (one transaction); a response id a tenant already used keeps its first row."""
    if not entries:
        return 0
    stored = 0
    with reg.write() as session:
        seen = {
            (t, r)
            for t, r in session.execute(
                select(ResponseRow.tenant, ResponseRow.response_id).where(
                    ResponseRow.response_id.in_([e.response_id[:_MAX_ID_CHARS] for e in entries])
                )
            )
        }
        now = utcnow()
        for e in entries:
            key = (_tenant(e.tenant), e.response_id[:_MAX_ID_CHARS])
            if key in seen:
                continue
            seen.add(key)
            session.add(
                ResponseRow(
                    tenant=key[0],
                    response_id=key[1],
                    node=e.node,
                    version=e.version,
                    prompt=e.prompt,
                    answer=e.answer,
                    created_at=now,
                )
            )
            stored += 1
    return stored


def set_retention(reg: Registry, tenant: str | None, node: str, enabled: bool) -> None:
    node = canonical_node_id(node)
    with reg.write() as session:
        row = session.scalar(
            select(FeedbackRetention).where(FeedbackRetention.tenant == _tenant(tenant), FeedbackRetention.node == node)
        )
        if row is None:
            session.add(FeedbackRetention(tenant=_tenant(tenant), node=node, enabled=enabled, updated_at=utcnow()))
        else:
            row.enabled, row.updated_at = enabled, utcnow()


def retention_enabled(reg: Registry, tenant: str | None, node: str) -> bool:
    with reg.read() as session:
        return bool(
            session.scalar(
                select(FeedbackRetention.enabled).where(
                    FeedbackRetention.tenant == _tenant(tenant), FeedbackRetention.node == node
                )
            )
        )


def list_retention(reg: Registry, tenant: str | None = None) -> tuple[tuple[str, str], ...]:
    """(tenant, node) pairs with retention on; all tenants' when ``tenant`` is None."""
    query = select(FeedbackRetention.tenant, FeedbackRetention.node).where(FeedbackRetention.enabled.is_(True))
    if tenant is not None:
        query = query.where(FeedbackRetention.tenant == tenant)
    with reg.read() as session:
        return tuple(
            (t, n) for t, n in session.execute(query.order_by(FeedbackRetention.tenant, FeedbackRetention.node))
        )


def _check_feedback(rating: int, correction: str | None, tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(rating, bool) or rating not in (-1, 1):
        raise InvalidInput(f"rating must be +1 or -1, got {rating!r}", field="rating")
    if correction is not None and len(correction.encode()) > MAX_CORRECTION_BYTES:
        raise InvalidInput(f"a correction is at most {MAX_CORRECTION_BYTES} bytes", field="correction")
    if len(tags) > MAX_TAGS or any(not isinstance(t, str) or not t or len(t) > MAX_TAG_CHARS for t in tags):
        raise InvalidInput(f"at most {MAX_TAGS} tags of 1 to {MAX_TAG_CHARS} characters", field="tags")
    return tuple(tags)


def add_feedback(
    reg: Registry,
    tenant: str | None,
    response_id: str,
    rating: int,
    correction: str | None = None,
    tags: Sequence[str] = (),
) -> FeedbackRecord:
    """Rate one of ``tenant``'s responses; ResponseNotFound for an unknown or foreign id."""
    _check_id(response_id)
    clean_tags = _check_feedback(rating, correction, tags)
    correction = correction if correction else None
    with reg.write() as session:
        response = session.scalar(
            select(ResponseRow).where(ResponseRow.tenant == _tenant(tenant), ResponseRow.response_id == response_id)
        )
        if response is None:
            raise ResponseNotFound.for_id(response_id)
        if response.deleted_at is not None:
            raise FeedbackDeleted.for_id(response_id)
        row = FeedbackRow(
            response_pk=response.id,
            tenant=response.tenant,
            node=response.node,
            rating=rating,
            correction=correction,
            tags=list(clean_tags),
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        return _record(row, response, with_text=False)


def _record(row: FeedbackRow, response: ResponseRow, *, with_text: bool) -> FeedbackRecord:
    return FeedbackRecord(
        id=row.id,
        response_id=response.response_id,
        tenant=row.tenant,
        node=row.node,
        version=response.version,
        rating=row.rating,
        correction=row.correction,
        tags=tuple(row.tags or ()),
        created_at=utc(row.created_at),
        used_by=row.used_by,
        prompt=response.prompt if with_text else None,
        answer=response.answer if with_text else None,
    )


def list_feedback(
    reg: Registry,
    tenant: str | None,
    node: str | None = None,
    *,
    limit: int | None = None,
    with_text: bool = False,
) -> tuple[FeedbackRecord, ...]:
    """``tenant``'s feedback, newest first; ``with_text`` adds the retained prompt and answer (an export)."""
    query = (
        select(FeedbackRow, ResponseRow)
        .join(ResponseRow, FeedbackRow.response_pk == ResponseRow.id)
        .where(FeedbackRow.tenant == _tenant(tenant))
        .order_by(FeedbackRow.id.desc())
    )
    if node is not None:
        query = query.where(FeedbackRow.node == canonical_node_id(node))
    if limit is not None:
        query = query.limit(limit)
    with reg.read() as session:
        return tuple(_record(f, r, with_text=with_text) for f, r in session.execute(query))


def delete_feedback(
    reg: Registry, tenant: str | None, node: str | None = None, response_ids: Iterable[str] | None = None
) -> int:
    """Delete ``tenant``'s records (all, one node's, or some responses'): feedback rows go, texts are erased,
    and the responses stay as tombstones that refuse later feedback. Returns how many responses."""
    where = [ResponseRow.tenant == _tenant(tenant), ResponseRow.deleted_at.is_(None)]
    if node is not None:
        where.append(ResponseRow.node == canonical_node_id(node))
    if response_ids is not None:
        ids = [_check_id(r) for r in response_ids]
        where.append(ResponseRow.response_id.in_(ids))
    with reg.write() as session:
        pks = list(session.scalars(select(ResponseRow.id).where(and_(*where))))
        for start in range(0, len(pks), 500):  # bounded IN lists for every backend
            chunk = pks[start : start + 500]
            session.execute(delete(FeedbackRow).where(FeedbackRow.response_pk.in_(chunk)))
            session.execute(
                update(ResponseRow)
                .where(ResponseRow.id.in_(chunk))
                .values(prompt=None, answer=None, deleted_at=utcnow())
            )
        return len(pks)


def training_examples(
    reg: Registry, node: str, tenant: str | None, *, include_used: bool = False
) -> tuple[TrainingExample, ...]:
    """What ``tenant``'s feedback on ``node`` can teach: corrections, and positively rated answers.

    Only responses with a retained prompt count; a negatively rated answer without a correction
    teaches nothing. Oldest first, so a held-out tail is the newest feedback.
    """
    query = (
        select(FeedbackRow, ResponseRow)
        .join(ResponseRow, FeedbackRow.response_pk == ResponseRow.id)
        .where(
            FeedbackRow.tenant == _tenant(tenant),
            FeedbackRow.node == canonical_node_id(node),
            ResponseRow.deleted_at.is_(None),
            ResponseRow.prompt.is_not(None),
        )
        .order_by(FeedbackRow.id)
    )
    if not include_used:
        query = query.where(FeedbackRow.used_by.is_(None))
    out = []
    with reg.read() as session:
        for fb, resp in session.execute(query):
            if fb.correction:
                out.append(TrainingExample(fb.id, json.loads(resp.prompt or "{}"), fb.correction, resp.answer))
            elif fb.rating > 0 and resp.answer:
                out.append(TrainingExample(fb.id, json.loads(resp.prompt or "{}"), resp.answer))
    return tuple(out)


def mark_used(reg: Registry, feedback_ids: Sequence[int], update_id: str) -> int:
    """Record that an update was made from these feedback rows (they stop counting as waiting)."""
    with reg.write() as session:
        done = 0
        for start in range(0, len(feedback_ids), 500):
            result = session.execute(
                update(FeedbackRow)
                .where(FeedbackRow.id.in_(list(feedback_ids[start : start + 500])), FeedbackRow.used_by.is_(None))
                .values(used_by=update_id[:64])
            )
            done += int(getattr(result, "rowcount", 0) or 0)
        return done


def feedback_stats(reg: Registry, node: str | None = None) -> tuple[FeedbackStats, ...]:
    """Per (node, tenant): ratings waiting and used, corrections waiting, the oldest waiting."""
    used = FeedbackRow.used_by.is_not(None)
    trainable = and_(ResponseRow.prompt.is_not(None), ResponseRow.deleted_at.is_(None))
    correction = and_(FeedbackRow.correction.is_not(None), trainable)
    query = (
        select(
            FeedbackRow.node,
            FeedbackRow.tenant,
            func.sum(_case(and_(~used, FeedbackRow.rating > 0))),
            func.sum(_case(and_(~used, FeedbackRow.rating < 0))),
            func.sum(_case(and_(used, FeedbackRow.rating > 0))),
            func.sum(_case(and_(used, FeedbackRow.rating < 0))),
            func.sum(_case(and_(~used, correction))),
            func.sum(_case(and_(~used, trainable, (FeedbackRow.correction.is_not(None)) | (FeedbackRow.rating > 0)))),
            func.min(_when(~used, FeedbackRow.created_at)),
        )
        .join(ResponseRow, FeedbackRow.response_pk == ResponseRow.id)
        .group_by(FeedbackRow.node, FeedbackRow.tenant)
        .order_by(FeedbackRow.node, FeedbackRow.tenant)
    )
    if node is not None:
        query = query.where(FeedbackRow.node == canonical_node_id(node))
    with reg.read() as session:
        return tuple(
            FeedbackStats(
                node=n,
                tenant=t,
                positive_waiting=int(pw or 0),
                negative_waiting=int(nw or 0),
                positive_used=int(pu or 0),
                negative_used=int(nu or 0),
                corrections_waiting=int(cw or 0),
                trainable_waiting=int(tw or 0),
                oldest_waiting=utc(oldest) if oldest is not None else None,
            )
            for n, t, pw, nw, pu, nu, cw, tw, oldest in session.execute(query)
        )


def _case(condition: Any) -> Any:
    return case((condition, 1), else_=0)


def _when(condition: Any, value: Any) -> Any:
    return case((condition, value), else_=None)


def record_decision(
    reg: Registry,
    node: str,
    action: str,
    reason: str,
    *,
    update_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> DecisionRecord:
    now = utcnow()
    with reg.write() as session:
        session.add(
            PolicyDecision(
                at=now, node=node, action=action, reason=reason, update_id=update_id, detail=dict(detail or {})
            )
        )
    return DecisionRecord(now, node, action, reason, update_id, dict(detail or {}))


def list_decisions(reg: Registry, node: str | None = None, *, limit: int = 50) -> tuple[DecisionRecord, ...]:
    """The policy's decisions, newest first."""
    query = select(PolicyDecision).order_by(PolicyDecision.id.desc()).limit(limit)
    if node is not None:
        query = query.where(PolicyDecision.node == canonical_node_id(node))
    with reg.read() as session:
        return tuple(
            DecisionRecord(utc(r.at), r.node, r.action, r.reason, r.update_id, dict(r.detail or {}))
            for r in session.scalars(query)
        )


@dataclass(frozen=True)
class DecisionSummary:
    """How often the policy decided ``action`` for a node, and when it last did (for /metrics)."""

    node: str
    count: int
    last_at: datetime


def decision_summary(reg: Registry, action: str = "make") -> tuple[DecisionSummary, ...]:
    """Per node: the decisions with ``action`` and the newest one's time (one grouped query)."""
    query = (
        select(PolicyDecision.node, func.count(), func.max(PolicyDecision.at))
        .where(PolicyDecision.action == action)
        .group_by(PolicyDecision.node)
        .order_by(PolicyDecision.node)
    )
    with reg.read() as session:
        return tuple(DecisionSummary(n, int(c), utc(at)) for n, c, at in session.execute(query))
