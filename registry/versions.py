"""Node versions, aliases and variants.

Versions are immutable: once written only their ``status`` moves, and only
forward (candidate -> accepted | rejected | revoked, accepted -> revoked).
Aliases move atomically (one UPDATE in one transaction). Concurrent writers
adding versions to one node are serialised by a row lock on the node
(PostgreSQL) or SQLite's write lock (BEGIN IMMEDIATE), and the unique
(node, version) constraint backs both up: a loser retries with the next number.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from registry._rows import aliases_of, find_node, find_version, variant_record, version_record
from registry.db import Registry
from registry.errors import AliasError, Conflict, InvalidInput, StatusTransitionError, VersionNotFound
from registry.models import Alias, NodeVersion, Variant, utcnow
from registry.records import AliasRecord, VariantFacts, VariantRecord, VersionRecord, check_digest, check_status
from registry.vocab import ALIAS_NAMES

__all__ = [
    "ALLOWED_TRANSITIONS",
    "add_variant",
    "add_version",
    "get_version",
    "list_variants",
    "list_versions",
    "resolve_alias",
    "set_alias",
    "set_version_status",
]

ALLOWED_TRANSITIONS = {"candidate": {"accepted", "rejected", "revoked"}, "accepted": {"revoked"}}
_RETRIES = 8


def list_versions(
    reg: Registry, node_id: str, *, tenant: str | None = None, include_private: bool = False
) -> tuple[VersionRecord, ...]:
    with reg.read() as session:
        node = find_node(session, node_id, tenant=tenant, include_private=include_private)
        aliases = aliases_of(session, node)
        rows = session.scalars(select(NodeVersion).where(NodeVersion.node_id == node.id).order_by(NodeVersion.version))
        return tuple(version_record(v, node.node_id, aliases.get(v.id, ())) for v in rows)


def get_version(
    reg: Registry, node_id: str, version: int, *, tenant: str | None = None, include_private: bool = False
) -> VersionRecord:
    with reg.read() as session:
        node = find_node(session, node_id, tenant=tenant, include_private=include_private)
        row = find_version(session, node, version)
        return version_record(row, node.node_id, aliases_of(session, node).get(row.id, ()))


def add_version(
    reg: Registry,
    node_id: str,
    *,
    manifest_digest: str,
    parent_version: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    status: str = "candidate",
    version: int | None = None,
) -> VersionRecord:
    """Add the node's next version (current + 1). With ``version`` given it must be exactly that number."""
    check_digest(manifest_digest, "manifest_digest")
    check_status(status)
    if status == "revoked":
        raise InvalidInput("a new version cannot start revoked", field="status")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise InvalidInput(f"version must be a positive integer, got {version!r}", field="version")
    for attempt in range(_RETRIES):
        try:
            with reg.write() as session:
                node = find_node(session, node_id, include_private=True, for_update=True)
                current = session.scalar(select(func.max(NodeVersion.version)).where(NodeVersion.node_id == node.id))
                number = (current or 0) + 1
                if version is not None and version != number:
                    raise Conflict(
                        f"node {node.node_id!r} is at version {current or 0}: the next version must be {number}, "
                        f"not {version}"
                    )
                now = utcnow()
                row = NodeVersion(
                    node_id=node.id,
                    version=number,
                    parent_version=parent_version,
                    manifest_digest=manifest_digest,
                    status=status,
                    metrics=dict(metrics or {}),
                    created_at=now,
                    status_changed_at=now,
                )
                session.add(row)
                session.flush()
                return version_record(row, node.node_id)
        except IntegrityError:
            # Another writer took this number between our read and insert: try the next one.
            if version is not None or attempt == _RETRIES - 1:
                raise Conflict(f"node {node_id!r}: version number taken by a concurrent writer") from None
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def set_version_status(reg: Registry, node_id: str, version: int, status: str) -> VersionRecord:
    """Move a version's status forward; the same status again is a no-op."""
    check_status(status)
    with reg.write() as session:
        node = find_node(session, node_id, include_private=True)
        row = find_version(session, node, version, for_update=True)
        if row.status != status:
            if status not in ALLOWED_TRANSITIONS.get(row.status, set()):
                raise StatusTransitionError(
                    f"node {node.node_id!r} version {version} is {row.status}; it cannot become {status}"
                )
            row.status = status
            row.status_changed_at = utcnow()
            session.flush()
        return version_record(row, node.node_id, aliases_of(session, node).get(row.id, ()))


def set_alias(reg: Registry, node_id: str, alias: str, version: int) -> AliasRecord:
    """Point ``alias`` at ``version`` (atomically). ``stable`` needs an accepted version; ``candidate``
    a candidate or accepted one; revoked and rejected versions are refused."""
    if alias not in ALIAS_NAMES:
        raise InvalidInput(f"alias {alias!r} is not one of {', '.join(ALIAS_NAMES)}", field="alias")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidInput(f"version must be a positive integer, got {version!r}", field="version")
    with reg.write() as session:
        node = find_node(session, node_id, include_private=True, for_update=True)
        target = find_version(session, node, version)
        if target.status in ("revoked", "rejected"):
            raise AliasError(f"node {node.node_id!r} version {version} is {target.status}: no alias may point to it")
        if alias == "stable" and target.status != "accepted":
            raise AliasError(
                f"node {node.node_id!r} version {version} is {target.status}: `stable` needs an accepted version"
            )
        row = session.scalar(select(Alias).where(Alias.node_id == node.id, Alias.name == alias).with_for_update())
        previous = None
        if row is None:
            session.add(Alias(node_id=node.id, name=alias, version_id=target.id, updated_at=utcnow()))
        else:
            previous = session.scalar(select(NodeVersion.version).where(NodeVersion.id == row.version_id))
            row.version_id = target.id
            row.updated_at = utcnow()
        session.flush()
        return AliasRecord(node.node_id, alias, version, previous)


def resolve_alias(
    reg: Registry, node_id: str, alias: str = "stable", *, tenant: str | None = None, include_private: bool = False
) -> VersionRecord:
    """The version an alias points to (even a since-revoked one: callers check ``status``)."""
    with reg.read() as session:
        node = find_node(session, node_id, tenant=tenant, include_private=include_private)
        row = session.scalar(
            select(NodeVersion)
            .join(Alias, Alias.version_id == NodeVersion.id)
            .where(Alias.node_id == node.id, Alias.name == alias)
        )
        if row is None:
            raise VersionNotFound(f"node {node.node_id!r} has no {alias!r} alias")
        return version_record(row, node.node_id, aliases_of(session, node).get(row.id, ()))


def add_variant(reg: Registry, node_id: str, version: int, facts: VariantFacts) -> VariantRecord:
    """Record (or update) one variant of a version, e.g. after `treelm export` measured it."""
    with reg.write() as session:
        node = find_node(session, node_id, include_private=True)
        target = find_version(session, node, version)
        row = session.scalar(select(Variant).where(Variant.version_id == target.id, Variant.kind == facts.kind))
        values = {
            "bytes": facts.bytes,
            "bytes_estimated": facts.bytes_estimated,
            "adapter_parameters": facts.adapter_parameters,
            "tokens_per_second": facts.tokens_per_second,
            "measured_device": facts.measured_device,
            "uri": facts.uri,
        }
        if row is None:
            row = Variant(version_id=target.id, kind=facts.kind, created_at=utcnow(), **values)
            session.add(row)
        else:
            for key, value in values.items():
                setattr(row, key, value)
        session.flush()
        return variant_record(row, node.node_id, version)


def list_variants(reg: Registry, node_id: str, version: int) -> tuple[VariantRecord, ...]:
    with reg.read() as session:
        node = find_node(session, node_id, include_private=True)
        target = find_version(session, node, version)
        rows = session.scalars(select(Variant).where(Variant.version_id == target.id).order_by(Variant.kind))
        return tuple(variant_record(v, node.node_id, version) for v in rows)
