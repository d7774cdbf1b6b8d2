"""Row helpers shared by the repository modules: lookups, visibility, row -> record conversion."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from hierarchy.errors import InvalidNodePath
from hierarchy.ids import NodeId
from registry.errors import InvalidInput, NodeNotFound, VersionNotFound
from registry.models import Alias, BaseModel, Node, NodeVersion, Tenant, Variant
from registry.records import BaseFacts, VariantRecord, VersionRecord

__all__ = [
    "base_facts",
    "canonical_node_id",
    "find_node",
    "find_version",
    "utc",
    "variant_record",
    "version_record",
    "visible_clause",
]


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def canonical_node_id(node_id: str) -> str:
    try:
        return str(NodeId.parse(str(node_id)))
    except InvalidNodePath as exc:
        raise InvalidInput(f"bad node id {node_id!r}: {exc}", field="node") from None


def visible_clause(tenant: str | None, include_private: bool) -> ColumnElement[bool] | None:
    """Public nodes, plus the tenant's own private nodes (all nodes for operators)."""
    if include_private:
        return None
    clause = Node.visibility == "public"
    if tenant is not None:
        clause = or_(clause, Node.owner_tenant_id.in_(select(Tenant.id).where(Tenant.name == tenant)))
    return clause


def find_node(
    session: Session,
    node_id: str,
    *,
    tenant: str | None = None,
    include_private: bool = False,
    for_update: bool = False,
) -> Node:
    """The node row, or NodeNotFound (also for another tenant's private node: same message)."""
    key = canonical_node_id(node_id)
    query = select(Node).where(Node.node_id == key)
    clause = visible_clause(tenant, include_private)
    if clause is not None:
        query = query.where(clause)
    if for_update:
        query = query.with_for_update()
    row = session.scalar(query)
    if row is None:
        raise NodeNotFound(f"unknown node {key!r}: list nodes with `treelm registry ls`")
    return row


def find_version(session: Session, node: Node, version: int, *, for_update: bool = False) -> NodeVersion:
    query = select(NodeVersion).where(NodeVersion.node_id == node.id, NodeVersion.version == version)
    if for_update:
        query = query.with_for_update()
    row = session.scalar(query)
    if row is None:
        raise VersionNotFound(
            f"node {node.node_id!r} has no version {version}: see `treelm registry versions {node.node_id}`"
        )
    return row


def version_record(row: NodeVersion, node_id: str, aliases: tuple[str, ...] = ()) -> VersionRecord:
    return VersionRecord(
        node_id=node_id,
        version=row.version,
        parent_version=row.parent_version,
        manifest_digest=row.manifest_digest,
        status=row.status,
        metrics=dict(row.metrics or {}),
        created_at=utc(row.created_at),
        status_changed_at=utc(row.status_changed_at),
        aliases=aliases,
    )


def aliases_of(session: Session, node: Node) -> dict[int, tuple[str, ...]]:
    """version id -> alias names pointing at it."""
    out: dict[int, list[str]] = {}
    for name, version_id in session.execute(select(Alias.name, Alias.version_id).where(Alias.node_id == node.id)):
        out.setdefault(version_id, []).append(name)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def variant_record(row: Variant, node_id: str, version: int) -> VariantRecord:
    return VariantRecord(
        node_id=node_id,
        version=version,
        kind=row.kind,
        bytes=row.bytes,
        bytes_estimated=row.bytes_estimated,
        adapter_parameters=row.adapter_parameters,
        tokens_per_second=row.tokens_per_second,
        measured_device=row.measured_device,
        uri=row.uri,
    )


BASE_FIELDS = (
    "digest",
    "model",
    "architecture",
    "weight_dtype",
    "parameter_count",
    "quantizable_parameter_count",
    "weights_bytes",
    "layers",
    "hidden_size",
    "attention_heads",
    "kv_heads",
    "head_dim",
    "vocab_size",
    "max_context",
    "intermediate_size",
)


def base_facts(row: BaseModel) -> BaseFacts:
    return BaseFacts(**{name: getattr(row, name) for name in BASE_FIELDS})
