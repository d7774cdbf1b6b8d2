"""The forgetting history: each version's perplexity on its own, its parent's and siblings' texts.

Written with the version it measures, in the same transaction (an :class:`AddPerplexities`
change applied by :func:`registry.updates.apply_changes` right after the ``AddVersion``):

    apply_changes(reg, [AddVersion("demo/en/medical", 2, ...),
                        AddPerplexities("demo/en/medical", 2, "candidate",
                                        [("own", "demo/en/medical", 13.2), ("sibling", "demo/en/legal", 20.1)])])
    history("demo/en/medical")   # every version's points, oldest first (`treelm registry history`)
    latest(reg, "demo")          # the newest version's points per node (the /metrics gauges)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry._rows import canonical_node_id, find_node, utc
from registry.db import Registry
from registry.errors import InvalidInput
from registry.models import Node, VersionPerplexity
from registry.vocab import PERPLEXITY_ORIGINS, PERPLEXITY_ROLES

__all__ = ["AddPerplexities", "PerplexityPoint", "apply_perplexities", "history", "latest"]


@dataclass(frozen=True)
class AddPerplexities:
    """A version's measured perplexities: (role, whose eval text, perplexity) each."""

    node: str
    version: int
    origin: str  # genesis | package | candidate | rebase
    points: Sequence[tuple[str, str, float]]


@dataclass(frozen=True)
class PerplexityPoint:
    node_id: str
    version: int
    origin: str
    role: str  # own | parent | sibling | stale
    text_node: str  # whose eval text
    perplexity: float
    at: datetime


def apply_perplexities(session: Session, c: AddPerplexities, nodes: dict[str, Node], now: datetime) -> None:
    """Registered in ``registry.updates``' change table (same transaction as the version)."""
    if c.origin not in PERPLEXITY_ORIGINS:
        raise InvalidInput(f"origin {c.origin!r} is not one of {', '.join(PERPLEXITY_ORIGINS)}", field="origin")
    if isinstance(c.version, bool) or not isinstance(c.version, int) or c.version < 1:
        raise InvalidInput(f"version must be an integer >= 1, got {c.version!r}", field="version")

    def node(node_id: str) -> Node:
        key = canonical_node_id(node_id)
        if key not in nodes:
            nodes[key] = find_node(session, key, include_private=True)
        return nodes[key]

    owner = node(c.node)
    for role, text_node, value in c.points:
        if role not in PERPLEXITY_ROLES:
            raise InvalidInput(f"role {role!r} is not one of {', '.join(PERPLEXITY_ROLES)}", field="role")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidInput(f"perplexity must be a finite number > 0, got {value!r}", field="perplexity")
        session.add(
            VersionPerplexity(
                node_id=owner.id,
                version=c.version,
                origin=c.origin,
                role=role,
                text_node_id=node(text_node).id,
                perplexity=float(value),
                created_at=now,
            )
        )
    session.flush()


def _points(session: Session, query) -> list[PerplexityPoint]:
    ids: Mapping[int, str] = dict(session.execute(select(Node.id, Node.node_id)).tuples().all())
    return [
        PerplexityPoint(
            ids[r.node_id], r.version, r.origin, r.role, ids[r.text_node_id], r.perplexity, utc(r.created_at)
        )
        for r in session.scalars(query.order_by(VersionPerplexity.version, VersionPerplexity.id))
    ]


def history(reg: Registry, node_id: str) -> list[PerplexityPoint]:
    """Every recorded point of node ``node_id``'s versions, by version (NodeNotFound if unknown)."""
    with reg.read() as session:
        node = find_node(session, node_id, include_private=True)
        return _points(session, select(VersionPerplexity).where(VersionPerplexity.node_id == node.id))


def latest(reg: Registry, tree: str | None = None) -> dict[str, list[PerplexityPoint]]:
    """Per node (of ``tree``, or every tree), the points of its newest measured version."""
    with reg.read() as session:
        query = select(VersionPerplexity)
        if tree is not None:
            prefix = canonical_node_id(tree)
            members = select(Node.id).where((Node.node_id == prefix) | Node.node_id.startswith(prefix + "/"))
            query = query.where(VersionPerplexity.node_id.in_(members))
        out: dict[str, list[PerplexityPoint]] = {}
        for p in _points(session, query):
            kept = out.get(p.node_id)
            if kept is None or kept[0].version < p.version:
                out[p.node_id] = [p]
            elif kept[0].version == p.version:
                kept.append(p)
        return out
