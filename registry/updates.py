"""What the signed update protocol stores: update records, their event log, key groups, serving pins.

The protocol's decisions are made elsewhere (``hierarchy.updates`` verifies, ``cluster.updates``
coordinates); this module only records them. Every state change is a list of *changes* applied
by :func:`apply_changes` in ONE transaction, so a crash or an error leaves the database exactly
as it was or with all of them:

    apply_changes(reg, [
        AddVersion("demo/en/medical", 2, parent_version=1, manifest_digest=..., status="accepted"),
        MoveAlias("demo/en/medical", "stable", 2),
        AddPin("demo/en/medical/radiology", 1, chain=[...], status="pinned"),
        SetUpdate("3f2a...", state="stable"),
        AddEvent("stable", node="demo/en/medical", update_id="3f2a...", detail={...}),
    ])

Versions move as in :mod:`registry.versions` (candidate -> accepted | rejected | revoked,
accepted -> revoked; ``stable`` only to an accepted version). Serving pins are append-only:
the newest row per node is the current one, older rows are chains it was validated against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry._rows import canonical_node_id, find_node, find_version, utc
from registry.db import Registry
from registry.errors import (
    AliasError,
    Conflict,
    InvalidInput,
    SigningKeyNotFound,
    StatusTransitionError,
    UpdateNotFound,
)
from registry.forgetting import AddPerplexities, apply_perplexities
from registry.models import (
    Alias,
    KeyGroup,
    Node,
    NodeVersion,
    ServingPin,
    SigningKey,
    UpdateEvent,
    UpdateRecord,
    utcnow,
)
from registry.records import check_digest, check_role, check_status
from registry.versions import ALLOWED_TRANSITIONS
from registry.vocab import ALIAS_NAMES, PIN_STATUSES, UPDATE_KINDS, UPDATE_STATES

__all__ = [
    "AddEvent",
    "AddKey",
    "AddPin",
    "AddUpdate",
    "AddVersion",
    "Change",
    "EventEntry",
    "KeyGroupEntry",
    "MoveAlias",
    "NodeVersions",
    "PinEntry",
    "RetireNode",
    "RevokeKey",
    "SetKeyGroup",
    "SetStatus",
    "SetUpdate",
    "UpdateEntry",
    "apply_changes",
    "current_pins",
    "get_update",
    "list_key_groups",
    "list_update_events",
    "list_updates",
    "pin_history",
    "tree_versions",
]


# -- records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class UpdateEntry:
    update_id: str
    kind: str  # package | candidate | contribution
    node_id: str  # whose version it is
    version: int
    parent_version: int  # the parent version it was made over
    target: str  # the parent it contributes to
    state: str
    manifest_digest: str
    envelope: str  # DSSE envelope JSON
    approvals: tuple[Mapping[str, str], ...]  # {"keyid", "sig"} (base64)
    figures: Mapping[str, Any]
    reasons: tuple[str, ...]
    round_id: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class PinEntry:
    node_id: str
    version: int
    chain: tuple[Mapping[str, Any], ...]  # {"path", "version", "adapter"} top ancestor first
    status: str  # pinned | held
    reason: str
    created_at: datetime


@dataclass(frozen=True)
class KeyGroupEntry:
    role: str
    scope: str | None  # a node id, or None for a role-wide group
    threshold: int
    version: int


@dataclass(frozen=True)
class EventEntry:
    at: datetime
    event: str
    node_id: str | None
    update_id: str | None
    detail: Mapping[str, Any]


# -- changes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddVersion:
    node: str
    version: int  # must be the node's highest version + 1
    parent_version: int | None
    manifest_digest: str
    status: str = "candidate"
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SetStatus:
    node: str
    version: int
    status: str


@dataclass(frozen=True)
class MoveAlias:
    node: str
    alias: str
    version: int


@dataclass(frozen=True)
class AddPin:
    node: str
    version: int
    chain: Sequence[Mapping[str, Any]]
    status: str = "pinned"
    reason: str = ""


@dataclass(frozen=True)
class AddUpdate:
    update_id: str
    kind: str
    node: str
    version: int
    parent_version: int
    target: str
    state: str
    manifest_digest: str
    envelope: str
    approvals: Sequence[Mapping[str, str]] = ()
    figures: Mapping[str, Any] = field(default_factory=dict)
    reasons: Sequence[str] = ()
    round_id: str | None = None


@dataclass(frozen=True)
class SetUpdate:
    """Change an update record; None leaves a field as it is. ``reasons`` are appended."""

    update_id: str
    state: str | None = None
    approvals: Sequence[Mapping[str, str]] | None = None
    figures: Mapping[str, Any] | None = None  # merged into the stored figures
    reasons: Sequence[str] = ()
    round_id: str | None = None


@dataclass(frozen=True)
class AddEvent:
    event: str
    node: str | None = None
    update_id: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetireNode:
    """Stop serving a node for good (`treelm node retire`): its records stay, its id stays taken,
    it is no longer listed, matched or pinned."""

    node: str


@dataclass(frozen=True)
class AddKey:
    key_id: str
    public_key: str
    role: str
    node: str | None = None


@dataclass(frozen=True)
class RevokeKey:
    key_id: str


@dataclass(frozen=True)
class SetKeyGroup:
    role: str
    scope: str | None
    threshold: int
    version: int


Change = (
    AddVersion
    | SetStatus
    | MoveAlias
    | AddPin
    | AddUpdate
    | SetUpdate
    | AddEvent
    | RetireNode
    | AddKey
    | RevokeKey
    | SetKeyGroup
    | AddPerplexities
)


# -- applying ------------------------------------------------------------------------------
def _node(session: Session, node_id: str, cache: dict[str, Node]) -> Node:
    key = canonical_node_id(node_id)
    if key not in cache:
        cache[key] = find_node(session, key, include_private=True, for_update=True)
    return cache[key]


def _update_row(session: Session, update_id: str) -> UpdateRecord:
    row = session.scalar(select(UpdateRecord).where(UpdateRecord.update_id == update_id).with_for_update())
    if row is None:
        raise UpdateNotFound.for_id(update_id)
    return row


def _add_version(session: Session, c: AddVersion, nodes: dict[str, Node], now: datetime) -> None:
    check_digest(c.manifest_digest, "manifest_digest")
    check_status(c.status)
    node = _node(session, c.node, nodes)
    current = session.scalar(select(func.max(NodeVersion.version)).where(NodeVersion.node_id == node.id)) or 0
    if c.version != current + 1:
        raise Conflict(
            f"node {node.node_id!r} is at version {current}: the next version is {current + 1}, not {c.version}"
        )
    session.add(
        NodeVersion(
            node_id=node.id,
            version=c.version,
            parent_version=c.parent_version,
            manifest_digest=c.manifest_digest,
            status=c.status,
            metrics=dict(c.metrics),
            created_at=now,
            status_changed_at=now,
        )
    )
    session.flush()


def _set_status(session: Session, c: SetStatus, nodes: dict[str, Node], now: datetime) -> None:
    check_status(c.status)
    node = _node(session, c.node, nodes)
    row = find_version(session, node, c.version, for_update=True)
    if row.status != c.status:
        if c.status not in ALLOWED_TRANSITIONS.get(row.status, set()):
            raise StatusTransitionError(
                f"node {node.node_id!r} version {c.version} is {row.status}; it cannot become {c.status}"
            )
        row.status, row.status_changed_at = c.status, now
        session.flush()


def _move_alias(session: Session, c: MoveAlias, nodes: dict[str, Node], now: datetime) -> None:
    if c.alias not in ALIAS_NAMES:
        raise InvalidInput(f"alias {c.alias!r} is not one of {', '.join(ALIAS_NAMES)}", field="alias")
    node = _node(session, c.node, nodes)
    target = find_version(session, node, c.version)
    if target.status in ("revoked", "rejected") or (c.alias == "stable" and target.status != "accepted"):
        raise AliasError(
            f"node {node.node_id!r} version {c.version} is {target.status}: `{c.alias}` cannot point to it"
        )
    row = session.scalar(select(Alias).where(Alias.node_id == node.id, Alias.name == c.alias).with_for_update())
    if row is None:
        session.add(Alias(node_id=node.id, name=c.alias, version_id=target.id, updated_at=now))
    else:
        row.version_id, row.updated_at = target.id, now
    session.flush()


def _add_pin(session: Session, c: AddPin, nodes: dict[str, Node], now: datetime) -> None:
    if c.status not in PIN_STATUSES:
        raise InvalidInput(f"pin status {c.status!r} is not one of {', '.join(PIN_STATUSES)}", field="status")
    node = _node(session, c.node, nodes)
    session.add(
        ServingPin(
            node_id=node.id,
            version=c.version,
            chain=[dict(x) for x in c.chain],
            status=c.status,
            reason=c.reason,
            created_at=now,
        )
    )


def _add_update(session: Session, c: AddUpdate, nodes: dict[str, Node], now: datetime) -> None:
    if c.kind not in UPDATE_KINDS:
        raise InvalidInput(f"update kind {c.kind!r} is not one of {', '.join(UPDATE_KINDS)}", field="kind")
    if c.state not in UPDATE_STATES:
        raise InvalidInput(f"update state {c.state!r} is not one of {', '.join(UPDATE_STATES)}", field="state")
    check_digest(c.manifest_digest, "manifest_digest")
    if session.scalar(select(UpdateRecord.id).where(UpdateRecord.update_id == c.update_id)) is not None:
        raise Conflict(f"update {c.update_id!r} is already recorded")
    session.add(
        UpdateRecord(
            update_id=c.update_id,
            kind=c.kind,
            node_id=_node(session, c.node, nodes).id,
            version=c.version,
            parent_version=c.parent_version,
            target_id=_node(session, c.target, nodes).id,
            state=c.state,
            manifest_digest=c.manifest_digest,
            envelope=c.envelope,
            approvals=[dict(a) for a in c.approvals],
            figures=dict(c.figures),
            reasons=list(c.reasons),
            round_id=c.round_id,
            created_at=now,
            updated_at=now,
        )
    )
    session.flush()


def _set_update(session: Session, c: SetUpdate, nodes: dict[str, Node], now: datetime) -> None:
    row = _update_row(session, c.update_id)
    if c.state is not None:
        if c.state not in UPDATE_STATES:
            raise InvalidInput(f"update state {c.state!r} is not one of {', '.join(UPDATE_STATES)}", field="state")
        row.state = c.state
    if c.approvals is not None:
        row.approvals = [dict(a) for a in c.approvals]
    if c.figures is not None:
        row.figures = {**(row.figures or {}), **dict(c.figures)}
    if c.reasons:
        row.reasons = [*(row.reasons or []), *c.reasons]
    if c.round_id is not None:
        row.round_id = c.round_id
    row.updated_at = now
    session.flush()


def _add_event(session: Session, c: AddEvent, nodes: dict[str, Node], now: datetime) -> None:
    node_pk = _node(session, c.node, nodes).id if c.node else None
    session.add(UpdateEvent(at=now, event=c.event, node_id=node_pk, update_id=c.update_id, detail=dict(c.detail)))


def _retire_node(session: Session, c: RetireNode, nodes: dict[str, Node], now: datetime) -> None:
    node = _node(session, c.node, nodes)
    if node.retired_at is None:
        node.retired_at = now
        session.flush()


def _add_key(session: Session, c: AddKey, nodes: dict[str, Node], now: datetime) -> None:
    check_role(c.role)
    if session.scalar(select(SigningKey.id).where(SigningKey.key_id == c.key_id)) is not None:
        raise Conflict(f"signing key {c.key_id[:16]}... is already registered")
    node_pk = _node(session, c.node, nodes).id if c.node else None
    session.add(
        SigningKey(
            key_id=c.key_id,
            public_key=c.public_key,
            algorithm="ed25519",
            role=c.role,
            status="active",
            node_id=node_pk,
            created_at=now,
        )
    )
    session.flush()


def _revoke_key(session: Session, c: RevokeKey, nodes: dict[str, Node], now: datetime) -> None:
    row = session.scalar(select(SigningKey).where(SigningKey.key_id == c.key_id).with_for_update())
    if row is None:
        raise SigningKeyNotFound(f"unknown signing key {c.key_id!r}")
    if row.status != "revoked":
        row.status, row.revoked_at = "revoked", now
        session.flush()


def _set_key_group(session: Session, c: SetKeyGroup, nodes: dict[str, Node], now: datetime) -> None:
    check_role(c.role)
    scope = canonical_node_id(c.scope) if c.scope else "*"
    row = session.scalar(select(KeyGroup).where(KeyGroup.role == c.role, KeyGroup.scope == scope).with_for_update())
    if row is None:
        session.add(KeyGroup(role=c.role, scope=scope, threshold=c.threshold, version=c.version, updated_at=now))
    else:
        row.threshold, row.version, row.updated_at = c.threshold, c.version, now
    session.flush()


_APPLY: dict[type, Callable[[Session, Any, dict[str, Node], datetime], None]] = {
    AddVersion: _add_version,
    SetStatus: _set_status,
    MoveAlias: _move_alias,
    AddPin: _add_pin,
    AddUpdate: _add_update,
    SetUpdate: _set_update,
    AddEvent: _add_event,
    RetireNode: _retire_node,
    AddKey: _add_key,
    RevokeKey: _revoke_key,
    SetKeyGroup: _set_key_group,
    AddPerplexities: apply_perplexities,
}


def apply_changes(reg: Registry, changes: Iterable[Change]) -> int:
    """Apply ``changes`` in order in ONE transaction: all of them, or (on any error) none."""
    changes = list(changes)
    with reg.write() as session:
        nodes: dict[str, Node] = {}
        now = utcnow()
        for change in changes:
            apply = _APPLY.get(type(change))
            if apply is None:
                raise InvalidInput(f"not a registry change: {change!r}", field="changes")
            apply(session, change, nodes, now)
    return len(changes)


# -- reading -------------------------------------------------------------------------------
def _entry(row: UpdateRecord, node_id: str, target: str) -> UpdateEntry:
    return UpdateEntry(
        update_id=row.update_id,
        kind=row.kind,
        node_id=node_id,
        version=row.version,
        parent_version=row.parent_version,
        target=target,
        state=row.state,
        manifest_digest=row.manifest_digest,
        envelope=row.envelope,
        approvals=tuple(row.approvals or ()),
        figures=dict(row.figures or {}),
        reasons=tuple(row.reasons or ()),
        round_id=row.round_id,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )


def _node_ids(session: Session) -> dict[int, str]:
    return dict(session.execute(select(Node.id, Node.node_id)).tuples().all())


def get_update(reg: Registry, update_id: str) -> UpdateEntry:
    with reg.read() as session:
        row = session.scalar(select(UpdateRecord).where(UpdateRecord.update_id == update_id))
        if row is None:
            raise UpdateNotFound.for_id(update_id)
        names = _node_ids(session)
        return _entry(row, names[row.node_id], names[row.target_id])


def list_updates(
    reg: Registry,
    *,
    target: str | None = None,
    node: str | None = None,
    states: Sequence[str] | None = None,
    kind: str | None = None,
    tree: str | None = None,
) -> tuple[UpdateEntry, ...]:
    """Update records, oldest first, filtered by target parent, node, states, kind or tree."""
    query = select(UpdateRecord).order_by(UpdateRecord.id)
    with reg.read() as session:
        if target is not None:
            query = query.where(UpdateRecord.target_id == find_node(session, target, include_private=True).id)
        if node is not None:
            query = query.where(UpdateRecord.node_id == find_node(session, node, include_private=True).id)
        if states is not None:
            query = query.where(UpdateRecord.state.in_(list(states)))
        if kind is not None:
            query = query.where(UpdateRecord.kind == kind)
        if tree is not None:
            query = query.where(UpdateRecord.node_id.in_(select(Node.id).where(Node.tree == tree)))
        names = _node_ids(session)
        return tuple(_entry(r, names[r.node_id], names[r.target_id]) for r in session.scalars(query))


def list_update_events(
    reg: Registry, *, node: str | None = None, update_id: str | None = None, tree: str | None = None
) -> tuple[EventEntry, ...]:
    query = select(UpdateEvent).order_by(UpdateEvent.id)
    with reg.read() as session:
        if node is not None:
            query = query.where(UpdateEvent.node_id == find_node(session, node, include_private=True).id)
        if update_id is not None:
            query = query.where(UpdateEvent.update_id == update_id)
        if tree is not None:
            query = query.where(UpdateEvent.node_id.in_(select(Node.id).where(Node.tree == tree)))
        names = _node_ids(session)
        return tuple(
            EventEntry(utc(e.at), e.event, names.get(e.node_id) if e.node_id else None, e.update_id, dict(e.detail))
            for e in session.scalars(query)
        )


def _pin(row: ServingPin, node_id: str) -> PinEntry:
    return PinEntry(
        node_id, row.version, tuple(dict(x) for x in row.chain), row.status, row.reason or "", utc(row.created_at)
    )


def current_pins(reg: Registry, tree: str) -> dict[str, PinEntry]:
    """node id -> its current serving pin (the newest row), for every pinned node of ``tree`` that is
    not retired (a retired node keeps its pins as history, but nothing serves it)."""
    with reg.read() as session:
        newest = (
            select(func.max(ServingPin.id))
            .join(Node, Node.id == ServingPin.node_id)
            .where(Node.tree == tree, Node.retired_at.is_(None))
            .group_by(ServingPin.node_id)
        )
        rows = session.execute(
            select(ServingPin, Node.node_id).join(Node, Node.id == ServingPin.node_id).where(ServingPin.id.in_(newest))
        ).all()
        return {node_id: _pin(row, node_id) for row, node_id in rows}


def pin_history(reg: Registry, node: str) -> tuple[PinEntry, ...]:
    """Every chain ``node`` was pinned to, oldest first."""
    with reg.read() as session:
        found = find_node(session, node, include_private=True)
        rows = session.scalars(select(ServingPin).where(ServingPin.node_id == found.id).order_by(ServingPin.id))
        return tuple(_pin(r, found.node_id) for r in rows)


def list_key_groups(reg: Registry) -> tuple[KeyGroupEntry, ...]:
    with reg.read() as session:
        rows = session.scalars(select(KeyGroup).order_by(KeyGroup.role, KeyGroup.scope))
        return tuple(KeyGroupEntry(r.role, None if r.scope == "*" else r.scope, r.threshold, r.version) for r in rows)


@dataclass(frozen=True)
class NodeVersions:
    """Per node of a tree: the highest version number, the stable one and what it was made over."""

    latest: int
    stable: int | None
    stable_parent_version: int | None
    statuses: Mapping[int, str]


def tree_versions(reg: Registry, tree: str) -> dict[str, NodeVersions]:
    """node id -> its versions' numbers and statuses (base and nodes of ``tree``)."""
    with reg.read() as session:
        rows = session.execute(
            select(Node.node_id, NodeVersion.version, NodeVersion.status, NodeVersion.parent_version, NodeVersion.id)
            .join(NodeVersion, NodeVersion.node_id == Node.id)
            .where(Node.tree == tree)
        ).all()
        stable_ids = set(
            session.scalars(
                select(Alias.version_id)
                .join(Node, Node.id == Alias.node_id)
                .where(Node.tree == tree, Alias.name == "stable")
            )
        )
    out: dict[str, dict[str, Any]] = {}
    for node_id, version, status, parent_version, pk in rows:
        entry = out.setdefault(node_id, {"latest": 0, "stable": None, "spv": None, "statuses": {}})
        entry["latest"] = max(entry["latest"], version)
        entry["statuses"][version] = status
        if pk in stable_ids:
            entry["stable"], entry["spv"] = version, parent_version
    return {k: NodeVersions(v["latest"], v["stable"], v["spv"], v["statuses"]) for k, v in out.items()}
