"""Registering built trees and reading nodes back (tenant-aware).

:func:`register_tree` is idempotent: importing the same tree twice changes
nothing the second time. It runs in one transaction (all or nothing) and
inserts in batches, level by level, so a tree of 100,000 nodes imports in seconds.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, aliased

from registry._rows import (
    BASE_FIELDS,
    aliases_of,
    base_facts,
    find_node,
    utc,
    variant_record,
    version_record,
    visible_clause,
)
from registry.db import Registry
from registry.errors import ImportConflict
from registry.models import Alias, BaseModel, Deployment, Node, NodeTag, NodeVersion, Tenant, Variant, utcnow
from registry.records import (
    DeploymentRecord,
    ImportNode,
    ImportResult,
    NodeDetail,
    NodeRecord,
    TreeImport,
    VariantFacts,
)

__all__ = ["get_node", "list_nodes", "register_tree"]

_BATCH = 2000
_DESCRIPTIVE = ("language", "domain", "subdomain", "visibility", "description")


def _node_id(tree: str, path: str) -> str:
    return f"{tree}/{path}" if path else tree


def register_tree(reg: Registry, tree: TreeImport) -> ImportResult:
    """Register a built tree: base, nodes, their versions (first ones as ``stable``), variants."""
    with reg.write() as session:
        return _Importer(session, tree).run()


class _Importer:
    def __init__(self, session: Session, tree: TreeImport):
        self.s = session
        self.tree = tree
        self.now = utcnow()
        self.counts = {"nodes": 0, "versions": 0, "variants_added": 0, "variants_updated": 0}

    def run(self) -> ImportResult:
        base_id = self._base()
        tenants, added_tenants = self._tenants()
        existing = {
            row.path: row
            for row in self.s.execute(
                select(
                    Node.id,
                    Node.path,
                    Node.level,
                    Node.parent_id,
                    Node.base_model_id,
                    Node.owner_tenant_id,
                    *(getattr(Node, name) for name in _DESCRIPTIVE),
                ).where(Node.tree == self.tree.name)
            )
        }
        for row in existing.values():
            if row.base_model_id != base_id:
                raise ImportConflict(
                    f"tree {self.tree.name!r} is registered over another base than {self.tree.base.digest[:12]}...: "
                    "a tree's base never changes; build a new tree (another name) over the new base"
                )
            break
        ids = self._nodes(existing, tenants, base_id)
        version_ids = self._versions(ids)
        self._variants(version_ids)
        return ImportResult(
            tree=self.tree.name,
            base_digest=self.tree.base.digest,
            nodes_added=self.counts["nodes"],
            versions_added=self.counts["versions"],
            variants_added=self.counts["variants_added"],
            variants_updated=self.counts["variants_updated"],
            tenants_added=tuple(added_tenants),
        )

    def _base(self) -> int:
        facts = self.tree.base
        found = self.s.scalar(select(BaseModel.id).where(BaseModel.digest == facts.digest))
        if found is not None:
            return found
        values = {name: getattr(facts, name) for name in BASE_FIELDS}
        return self.s.execute(
            insert(BaseModel).values(**values, created_at=self.now).returning(BaseModel.id)
        ).scalar_one()

    def _tenants(self) -> tuple[dict[str, int], list[str]]:
        owners = sorted({n.owner for n in self.tree.nodes if n.owner})
        if not owners:
            return {}, []
        have = dict(self.s.execute(select(Tenant.name, Tenant.id).where(Tenant.name.in_(owners))).tuples().all())
        added = [o for o in owners if o not in have]
        for name in added:  # owners named in a tree become tenants (without tokens until one is issued)
            have[name] = self.s.execute(
                insert(Tenant).values(name=name, created_at=self.now).returning(Tenant.id)
            ).scalar_one()
        return have, added

    def _nodes(self, existing: dict[str, Any], tenants: dict[str, int], base_id: int) -> dict[str, int]:
        ids = {path: row.id for path, row in existing.items()}
        by_depth: dict[int, list[ImportNode]] = {}
        for node in self.tree.nodes:
            by_depth.setdefault(node.depth, []).append(node)
        for depth in sorted(by_depth):
            new_rows, new_nodes = [], []
            for node in by_depth[depth]:
                owner_id = tenants.get(node.owner) if node.owner else None
                parent_id = ids[node.parent_path] if node.parent_path is not None else None
                old = existing.get(node.path)
                if old is None:
                    new_nodes.append(node)
                    new_rows.append(self._node_values(node, parent_id, owner_id, base_id))
                    continue
                if old.level != node.level or old.parent_id != parent_id:
                    raise ImportConflict(
                        f"node {_node_id(self.tree.name, node.path)!r} is registered as {old.level} under another "
                        f"parent; the tree dir has it as {node.level}: a node's place in the tree never changes"
                    )
                self._refresh(old, node, owner_id)
            for start in range(0, len(new_rows), _BATCH):
                chunk = new_rows[start : start + _BATCH]
                got = self.s.scalars(insert(Node).returning(Node.id, sort_by_parameter_order=True), chunk).all()
                for node, node_pk in zip(new_nodes[start : start + _BATCH], got, strict=True):
                    ids[node.path] = node_pk
            tag_rows = [{"node_id": ids[n.path], "tag": t} for n in new_nodes for t in n.tags]
            if tag_rows:
                _bulk_insert(self.s, NodeTag, tag_rows)
            self.counts["nodes"] += len(new_nodes)
        return ids

    def _node_values(self, node: ImportNode, parent_id: int | None, owner_id: int | None, base_id: int) -> dict:
        return {
            "node_id": _node_id(self.tree.name, node.path),
            "tree": self.tree.name,
            "path": node.path,
            "parent_id": parent_id,
            "base_model_id": base_id,
            "level": node.level,
            "depth": node.depth,
            "language": node.language,
            "domain": node.domain,
            "subdomain": node.subdomain,
            "visibility": node.visibility,
            "owner_tenant_id": owner_id,
            "description": node.description,
            "created_at": self.now,
        }

    def _refresh(self, old: Any, node: ImportNode, owner_id: int | None) -> None:
        """Descriptive facts (attributes, visibility, owner, tags) follow the tree dir."""
        wanted = {name: getattr(node, name) for name in _DESCRIPTIVE}
        wanted["owner_tenant_id"] = owner_id
        changed = {k: v for k, v in wanted.items() if getattr(old, k) != v}
        if changed:
            self.s.execute(update(Node).where(Node.id == old.id).values(**changed))
        tags = set(self.s.scalars(select(NodeTag.tag).where(NodeTag.node_id == old.id)))
        if tags != set(node.tags):
            self.s.execute(delete(NodeTag).where(NodeTag.node_id == old.id))
            if node.tags:
                self.s.execute(insert(NodeTag), [{"node_id": old.id, "tag": t} for t in node.tags])

    def _versions(self, ids: dict[str, int]) -> dict[str, int]:
        node_pks = [ids[n.path] for n in self.tree.nodes]
        have: dict[tuple[int, int], Any] = {}
        stable: set[int] = set()
        for start in range(0, len(node_pks), _BATCH * 5):
            chunk = node_pks[start : start + _BATCH * 5]
            for row in self.s.execute(
                select(NodeVersion.id, NodeVersion.node_id, NodeVersion.version, NodeVersion.manifest_digest).where(
                    NodeVersion.node_id.in_(chunk)
                )
            ):
                have[(row.node_id, row.version)] = row
            stable.update(self.s.scalars(select(Alias.node_id).where(Alias.node_id.in_(chunk), Alias.name == "stable")))
        out: dict[str, int] = {}
        new_rows, new_paths = [], []
        for node in self.tree.nodes:
            pk = ids[node.path]
            old = have.get((pk, node.version))
            if old is not None:
                if old.manifest_digest != node.manifest_digest:
                    raise ImportConflict(
                        f"node {_node_id(self.tree.name, node.path)!r} version {node.version} is registered with "
                        f"manifest {old.manifest_digest[:12]}..., the tree dir has {node.manifest_digest[:12]}...: "
                        "versions are immutable (a changed node must get a new version)"
                    )
                out[node.path] = old.id
                continue
            new_paths.append(node)
            new_rows.append(
                {
                    "node_id": pk,
                    "version": node.version,
                    "parent_version": node.parent_version,
                    "manifest_digest": node.manifest_digest,
                    "status": "accepted",
                    "metrics": dict(node.metrics),
                    "created_at": self.now,
                    "status_changed_at": self.now,
                }
            )
        for start in range(0, len(new_rows), _BATCH):
            got = self.s.scalars(
                insert(NodeVersion).returning(NodeVersion.id, sort_by_parameter_order=True),
                new_rows[start : start + _BATCH],
            ).all()
            for node, version_pk in zip(new_paths[start : start + _BATCH], got, strict=True):
                out[node.path] = version_pk
        self.counts["versions"] += len(new_rows)
        alias_rows = [
            {"node_id": ids[n.path], "name": "stable", "version_id": out[n.path], "updated_at": self.now}
            for n in self.tree.nodes
            if ids[n.path] not in stable
        ]
        for start in range(0, len(alias_rows), _BATCH):
            _bulk_insert(self.s, Alias, alias_rows[start : start + _BATCH])
        return out

    def _variants(self, version_ids: dict[str, int]) -> None:
        pks = list(version_ids.values())
        have: dict[tuple[int, str], Variant] = {}
        for start in range(0, len(pks), _BATCH * 5):
            for row in self.s.scalars(select(Variant).where(Variant.version_id.in_(pks[start : start + _BATCH * 5]))):
                have[(row.version_id, row.kind)] = row
        new_rows = []
        for node in self.tree.nodes:
            version_pk = version_ids[node.path]
            for facts in node.variants:
                old = have.get((version_pk, facts.kind))
                if old is None:
                    new_rows.append({"version_id": version_pk, **_variant_values(facts), "created_at": self.now})
                elif _should_replace(old, facts):
                    for key, value in _variant_values(facts).items():
                        setattr(old, key, value)
                    self.counts["variants_updated"] += 1
        for start in range(0, len(new_rows), _BATCH):
            _bulk_insert(self.s, Variant, new_rows[start : start + _BATCH])
        self.counts["variants_added"] += len(new_rows)
        self.s.flush()


def _bulk_insert(session: Session, model: type, rows: list[dict]) -> None:
    # executemany: psycopg pipelines the rows; sqlite3 runs them in C. (Multi-row VALUES with
    # RETURNING measured slower on PostgreSQL here: psycopg re-parses each huge statement.)
    session.execute(insert(model), rows)


def _variant_values(facts: VariantFacts) -> dict[str, Any]:
    return {
        "kind": facts.kind,
        "bytes": facts.bytes,
        "bytes_estimated": facts.bytes_estimated,
        "adapter_parameters": facts.adapter_parameters,
        "tokens_per_second": facts.tokens_per_second,
        "measured_device": facts.measured_device,
        "uri": facts.uri,
    }


def _should_replace(old: Variant, new: VariantFacts) -> bool:
    """A measurement replaces an estimate, never the reverse; equal facts change nothing."""
    if new.bytes_estimated and not old.bytes_estimated:
        return False
    return any(getattr(old, k) != v for k, v in _variant_values(new).items())


def _records(session: Session, rows: list[Node]) -> list[NodeRecord]:
    if not rows:
        return []
    pks = [n.id for n in rows]
    parent = aliased(Node)
    extra: dict[int, dict[str, Any]] = {pk: {"tags": [], "stable": None, "candidate": None} for pk in pks}
    for start in range(0, len(pks), 5000):
        chunk = pks[start : start + 5000]
        for node_pk, tag in session.execute(
            select(NodeTag.node_id, NodeTag.tag).where(NodeTag.node_id.in_(chunk)).order_by(NodeTag.tag)
        ):
            extra[node_pk]["tags"].append(tag)
        for node_pk, name, version in session.execute(
            select(Alias.node_id, Alias.name, NodeVersion.version)
            .join(NodeVersion, NodeVersion.id == Alias.version_id)
            .where(Alias.node_id.in_(chunk))
        ):
            extra[node_pk][name] = version
    info = _info_all(session, pks, parent)
    out = []
    for n in rows:
        parent_id, digest, owner = info[n.id]
        e = extra[n.id]
        out.append(
            NodeRecord(
                node_id=n.node_id,
                tree=n.tree,
                path=n.path,
                level=n.level,
                parent=parent_id,
                base_digest=digest,
                language=n.language,
                domain=n.domain,
                subdomain=n.subdomain,
                tags=tuple(e["tags"]),
                visibility=n.visibility,
                owner=owner,
                description=n.description,
                stable_version=e["stable"],
                candidate_version=e["candidate"],
                created_at=utc(n.created_at),
            )
        )
    return out


def _info_all(session: Session, pks: list[int], parent: Any) -> dict[int, tuple]:
    out: dict[int, tuple] = {}
    for start in range(0, len(pks), 5000):
        chunk = pks[start : start + 5000]
        for pk, parent_id, digest, owner in session.execute(
            select(Node.id, parent.node_id, BaseModel.digest, Tenant.name)
            .join(BaseModel, BaseModel.id == Node.base_model_id)
            .outerjoin(parent, parent.id == Node.parent_id)
            .outerjoin(Tenant, Tenant.id == Node.owner_tenant_id)
            .where(Node.id.in_(chunk))
        ):
            out[pk] = (parent_id, digest, owner)
    return out


def list_nodes(
    reg: Registry,
    *,
    tenant: str | None = None,
    include_private: bool = False,
    tree: str | None = None,
    include_retired: bool = False,
) -> tuple[NodeRecord, ...]:
    """Nodes in tree/path order: public ones, the tenant's private ones (all with include_private);
    retired nodes (`treelm node retire`) only with include_retired."""
    query = select(Node).order_by(Node.tree, Node.path)
    if not include_retired:
        query = query.where(Node.retired_at.is_(None))
    clause = visible_clause(tenant, include_private)
    if clause is not None:
        query = query.where(clause)
    if tree is not None:
        query = query.where(Node.tree == tree)
    with reg.read() as session:
        return tuple(_records(session, list(session.scalars(query))))


def get_node(reg: Registry, node_id: str, *, tenant: str | None = None, include_private: bool = False) -> NodeDetail:
    """One node with its base facts, versions, its stable version's variants and deployments."""
    with reg.read() as session:
        node = find_node(session, node_id, tenant=tenant, include_private=include_private)
        record = _records(session, [node])[0]
        base = base_facts(session.get_one(BaseModel, node.base_model_id))
        aliases = aliases_of(session, node)
        versions = session.scalars(
            select(NodeVersion).where(NodeVersion.node_id == node.id).order_by(NodeVersion.version)
        ).all()
        version_records = tuple(version_record(v, node.node_id, aliases.get(v.id, ())) for v in versions)
        variants: tuple = ()
        if record.stable_version is not None:
            stable = next(v for v in versions if v.version == record.stable_version)
            variants = tuple(
                variant_record(v, node.node_id, stable.version)
                for v in session.scalars(select(Variant).where(Variant.version_id == stable.id).order_by(Variant.kind))
            )
        deployments = tuple(
            DeploymentRecord(node.node_id, d.trunk, d.endpoint, d.status, version, utc(d.updated_at))
            for d, version in session.execute(
                select(Deployment, NodeVersion.version)
                .outerjoin(NodeVersion, NodeVersion.id == Deployment.version_id)
                .where(Deployment.node_id == node.id)
                .order_by(Deployment.endpoint)
            )
        )
    return NodeDetail(record, base, version_records, variants, deployments)
