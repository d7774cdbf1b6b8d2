"""The registry as the servers see it: tenant-aware reads, token resolution, matching.

Thin adapter over the registry's repository functions (synchronous SQLAlchemy);
servicers call it through ``asyncio.to_thread`` so the event loop never blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.service.access import NodeVisibility
from hierarchy.ids import NodeId
from registry.access import authenticate_token, list_tenants, token_generation
from registry.candidates import match as registry_match
from registry.db import Registry
from registry.matching import MatchResult
from registry.matchtypes import Hardware, MatchRequest, TaskQuery
from registry.memory import parse_bandwidth, parse_compute, parse_memory_size
from registry.records import NodeDetail, NodeRecord, TokenGrant, VersionRecord
from registry.trees import get_node, list_nodes
from registry.versions import list_versions

__all__ = ["Catalog", "MatchQuery"]


@dataclass(frozen=True)
class MatchQuery:
    """Match inputs as the CLI and the wire take them (sizes and rates as text)."""

    task: str
    device: str
    memory: str
    context: int | None = None
    batch: int | None = None
    top: int | None = None
    bandwidth: str | None = None
    compute: str | None = None
    tags: tuple[str, ...] = ()
    tree: str | None = None
    dtype: str | None = None


class Catalog:
    """Reads of one registry on behalf of a tenant (None = anonymous: public nodes only)."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def grant(self, token: str) -> TokenGrant:
        """The tenant and role of a bearer token; registry.errors.InvalidToken otherwise."""
        return authenticate_token(self.registry, token)

    def tenant_names(self) -> set[str]:
        """Every tenant the registry knows (a client certificate may only stand for one of them)."""
        return {t.name for t in list_tenants(self.registry)}

    def token_generation(self) -> int:
        """Grows with every token revocation (servers drop their token caches when it moves)."""
        return token_generation(self.registry)

    def node_visibility(self, node_id: str) -> NodeVisibility | None:
        """Who may see ``node_id`` (None when the registry has no such node)."""
        key = NodeId.parse(node_id)  # InvalidNodePath for a malformed id
        for record in list_nodes(self.registry, include_private=True, tree=key.tree):
            if record.node_id == str(key):
                return NodeVisibility(record.node_id, record.visibility, record.owner)
        return None

    def hidden_nodes(self, tenant: str | None, node_id: str) -> tuple[str, ...]:
        """The private nodes of ``node_id``'s tree that ``tenant`` cannot see (their names are redacted)."""
        tree = NodeId.parse(node_id).tree
        return tuple(
            r.node_id
            for r in list_nodes(self.registry, include_private=True, tree=tree, include_retired=True)
            if r.visibility == "private" and (tenant is None or r.owner != tenant)
        )

    def nodes(self, tenant: str | None, prefix: str = "") -> tuple[NodeRecord, ...]:
        prefix = prefix.strip().strip("/")
        tree = NodeId.parse(prefix).tree if prefix else None
        records = list_nodes(self.registry, tenant=tenant, tree=tree)
        if not prefix or "/" not in prefix:
            return records
        return tuple(r for r in records if r.node_id == prefix or r.node_id.startswith(prefix + "/"))

    def node(self, node_id: str, tenant: str | None) -> NodeDetail:
        return get_node(self.registry, node_id, tenant=tenant)

    def versions(self, node_id: str, tenant: str | None) -> tuple[VersionRecord, ...]:
        return list_versions(self.registry, node_id, tenant=tenant)

    def match(self, query: MatchQuery, tenant: str | None) -> MatchResult:
        hardware = Hardware(
            device=query.device,
            memory=parse_memory_size(query.memory),
            bandwidth=parse_bandwidth(query.bandwidth) if query.bandwidth else None,
            compute=parse_compute(query.compute) if query.compute else None,
            dtype=query.dtype or None,
        )
        optional = {k: v for k, v in (("context", query.context), ("batch", query.batch), ("top", query.top)) if v}
        request = MatchRequest(
            task=TaskQuery.parse(query.task, tags=query.tags, tree=query.tree or None),
            hardware=hardware,
            tenant=tenant,
            **optional,
        )
        return registry_match(self.registry, request)
