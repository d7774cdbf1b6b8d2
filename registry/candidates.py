"""The one query that feeds matching, and :func:`match` (query + the pure ranking).

The query never scans the node table: a path task seeks ``ix_nodes_path`` with
the task's lineage (``''``, ``en``, ``en/medical``, ...) and, reading its segments
as language, domain and sub-domain, ORs in the attribute branches; an attribute
task is an OR of branches, one per level, each led by an equality on an indexed
column (``language``, ``domain`` or ``subdomain``), plus the base (``path = ''``).
Versions, aliases and variants join on their unique keys. Private nodes of
other tenants are filtered in SQL (and again in the pure function).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, or_, select
from sqlalchemy.orm import aliased

from registry.db import Registry
from registry.errors import TenantNotFound, UnknownTask
from registry.matching import MatchResult, match_candidates
from registry.matchtypes import CandidateRow, MatchRequest, TaskQuery
from registry.models import Alias, BaseModel, Deployment, Node, NodeTag, NodeVersion, Tenant, Variant
from registry.records import BaseFacts, VariantFacts

__all__ = ["all_candidates_query", "candidate_query", "fold_rows", "load_candidates", "match"]

_BASE_COLUMNS = (
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


def _attributes(task: TaskQuery) -> TaskQuery:
    """The attributes the query looks for: the task's own, or a path task's segments read as attributes."""
    return (task.path_attributes() or task) if task.path is not None else task


def _shape(task: TaskQuery, tenant: str | None) -> tuple:
    """What the statement's structure depends on (its values travel as bound parameters)."""
    requested = tuple(v is not None for _, v in _attributes(task).attributes)
    tags_branch = not task.has_attributes and bool(task.tags)
    return (task.path is not None, requested, tags_branch, tenant is not None, task.tree is not None)


def _params(task: TaskQuery, tenant: str | None) -> dict:
    params: dict = {name: value for name, value in _attributes(task).attributes if value is not None}
    if task.path is not None:
        segments = task.path.split("/")
        params["lineage"] = ["/".join(segments[:i]) for i in range(len(segments) + 1)]
    if task.tags:
        params["tags"] = list(task.tags)
    if tenant is not None:
        params["tenant"] = tenant
    if task.tree is not None:
        params["tree"] = task.tree
    return params


def _node_filter(by_path: bool, requested: tuple[bool, ...], tags_branch: bool):
    names = ("language", "domain", "subdomain")
    # A path task: the nodes on its lineage, and nodes declaring its segments as attributes.
    branches: list[ColumnElement[bool]] = [
        Node.path.in_(bindparam("lineage", expanding=True)) if by_path else Node.path == ""
    ]
    # One branch per requested attribute: nodes whose own level is that attribute (deeper ones unset).
    for j, name in enumerate(names):
        if not requested[j]:
            continue
        conds = [getattr(Node, name) == bindparam(name)]
        for i, other in enumerate(names):
            if i < j and requested[i]:
                conds.append(or_(getattr(Node, other) == bindparam(other), getattr(Node, other).is_(None)))
            elif i > j:
                conds.append(getattr(Node, other).is_(None))
        branches.append(and_(*conds))
    if tags_branch and not by_path:
        branches.append(Node.id.in_(select(NodeTag.node_id).where(NodeTag.tag.in_(bindparam("tags", expanding=True)))))
    return or_(*branches)


@lru_cache(maxsize=128)
def _statement(shape: tuple) -> Select:
    """Built once per shape: constructing a SQLAlchemy statement costs more than running this one."""
    by_path, requested, tags_branch, with_tenant, with_tree = shape
    query = _candidate_select(with_tenant).where(_node_filter(by_path, requested, tags_branch))
    if with_tree:
        query = query.where(Node.tree == bindparam("tree"))
    return query


def candidate_query(task: TaskQuery, tenant: str | None) -> Select:
    """Nodes matching ``task`` visible to ``tenant``, each with its stable version and that version's variants."""
    return _statement(_shape(task, tenant)).params(**_params(task, tenant))


def all_candidates_query(tenant: str | None = None) -> Select:
    """Every visible node with its variants, unfiltered: what a naive matcher would read (the benchmark's baseline)."""
    query = _candidate_select(tenant is not None)
    return query.params(tenant=tenant) if tenant is not None else query


def _candidate_select(with_tenant: bool) -> Select:
    owner = aliased(Tenant)
    stable = aliased(Alias)
    endpoint = (
        select(Deployment.endpoint)
        .where(Deployment.node_id == Node.id, Deployment.status == "active")
        .order_by(Deployment.id)
        .limit(1)
        .scalar_subquery()
    )
    visible = Node.visibility == "public"
    if with_tenant:
        tenant_id = select(Tenant.id).where(Tenant.name == bindparam("tenant")).scalar_subquery()
        visible = or_(visible, Node.owner_tenant_id == tenant_id)
    visible = and_(visible, Node.retired_at.is_(None))  # a retired node is never matched
    return (
        select(
            Node.node_id,
            Node.tree,
            Node.path,
            Node.level,
            Node.language,
            Node.domain,
            Node.subdomain,
            Node.visibility,
            owner.name.label("owner"),
            NodeVersion.version,
            NodeVersion.status,
            NodeVersion.parent_version,
            NodeVersion.metrics,
            Variant.kind,
            Variant.bytes,
            Variant.bytes_estimated,
            Variant.adapter_parameters,
            Variant.tokens_per_second,
            Variant.measured_device,
            Variant.uri,
            NodeTag.tag,
            endpoint.label("endpoint"),
            *(getattr(BaseModel, c) for c in _BASE_COLUMNS),
        )
        .select_from(Node)
        .join(BaseModel, BaseModel.id == Node.base_model_id)
        .outerjoin(owner, owner.id == Node.owner_tenant_id)
        .outerjoin(stable, and_(stable.node_id == Node.id, stable.name == "stable"))
        .outerjoin(NodeVersion, NodeVersion.id == stable.version_id)
        # Variants only of accepted versions: a revoked version never yields a candidate.
        .outerjoin(Variant, and_(Variant.version_id == NodeVersion.id, NodeVersion.status == "accepted"))
        .outerjoin(NodeTag, NodeTag.node_id == Node.id)
        .where(visible)
    )


def load_candidates(reg: Registry, task: TaskQuery, tenant: str | None = None) -> list[CandidateRow]:
    with reg.read() as session:
        rows = session.execute(_statement(_shape(task, tenant)), _params(task, tenant)).all()
    return fold_rows(rows)


def fold_rows(rows) -> list[CandidateRow]:
    """One CandidateRow per (node, variant); tag rows folded into each node's tags."""
    tags: dict[str, list[str]] = {}
    keyed: dict[tuple[str, str | None], Any] = {}
    for r in rows:
        if r.tag is not None and r.tag not in tags.setdefault(r.node_id, []):
            tags[r.node_id].append(r.tag)
        tags.setdefault(r.node_id, [])
        keyed.setdefault((r.node_id, r.kind), r)
    bases: dict[str, BaseFacts] = {}
    out = []
    for (node_id, kind), r in keyed.items():
        base = bases.get(r.digest)
        if base is None:
            base = bases[r.digest] = BaseFacts(**{c: getattr(r, c) for c in _BASE_COLUMNS})
        variant = None
        if kind is not None:
            variant = VariantFacts(
                kind=kind,
                bytes=r.bytes,
                bytes_estimated=r.bytes_estimated,
                adapter_parameters=r.adapter_parameters,
                tokens_per_second=r.tokens_per_second,
                measured_device=r.measured_device,
                uri=r.uri,
            )
        out.append(
            CandidateRow(
                node_id=node_id,
                tree=r.tree,
                path=r.path,
                level=r.level,
                language=r.language,
                domain=r.domain,
                subdomain=r.subdomain,
                visibility=r.visibility,
                owner=r.owner,
                base=base,
                tags=tuple(sorted(tags[node_id])),
                version=r.version,
                version_status=r.status,
                parent_version=r.parent_version,
                metrics=dict(r.metrics or {}),
                variant=variant,
                endpoint=r.endpoint,
            )
        )
    return out


def match(reg: Registry, request: MatchRequest) -> MatchResult:
    """Candidates from one query, ranked by :func:`registry.matching.match_candidates`."""
    if request.tenant is not None:
        with reg.read() as session:
            if session.scalar(select(Tenant.id).where(Tenant.name == request.tenant)) is None:
                raise TenantNotFound(f"unknown tenant {request.tenant!r}: add it with `treelm registry tenant add`")
    rows = load_candidates(reg, request.task, request.tenant)
    result = match_candidates(rows, request)
    if result.target is None or (result.target and "/" not in result.target and _asks_below_base(request.task)):
        raise UnknownTask(_unknown_task_message(reg, request), field="task")
    return result


def _asks_below_base(task: TaskQuery) -> bool:
    return task.path is not None or task.has_attributes or bool(task.tags)


def _unknown_task_message(reg: Registry, request: MatchRequest) -> str:
    """Name what does exist, so the user can correct the task (error path only)."""
    task = request.task
    with reg.read() as session:
        visible = Node.visibility == "public"
        if request.tenant is not None:
            visible = or_(visible, Node.owner_tenant_id.in_(select(Tenant.id).where(Tenant.name == request.tenant)))
        if task.path is not None:
            first = task.path.split("/")[0]
            known = session.scalars(
                select(Node.path).where(Node.depth == 1, visible).distinct().order_by(Node.path).limit(20)
            ).all()
            trees = session.scalars(select(Node.tree).where(Node.path == "").order_by(Node.tree).limit(20)).all()
            hint = ""
            if first in trees:
                rest = task.path.partition("/")[2] or "..."
                hint = f" ({first!r} is a tree: use --tree {first} --task {rest})"
            return f"no node matches task {task.describe()}{hint}; top-level nodes: {', '.join(known) or 'none'}"
        languages = session.scalars(
            select(Node.language)
            .where(Node.language.is_not(None), visible)
            .distinct()
            .order_by(Node.language)
            .limit(20)
        ).all()
    known_languages = ", ".join(lang for lang in languages if lang) or "none"
    return f"no node matches task {task.describe()}; known languages: {known_languages}"
