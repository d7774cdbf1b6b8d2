"""Forgetting history: the perplexities recorded with every version the protocol makes.

For a version of node N served over ``chain`` (its ancestors' versions, then its own): the
perplexity on N's own probe text, on its parent's, and on each sibling's, all under ``chain``
(the registry's ``version_perplexities``, written in the same transaction as the version). A
node's first recorded version also records the version it replaces, so every curve has a start.
A rebased child also records ``stale``: its old adapter over the new parent, un-rebased.

    changes += history_changes(bench, view, reg, "en/medical/oncology", 2, adapters, key, "package")
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from cluster.updates.pins import TreeView
from cluster.updates.workbench import Workbench
from nodes.store.adapters import AdapterWeights
from nodes.store.versions import ChainLink
from registry.db import Registry
from registry.forgetting import AddPerplexities, history
from registry.updates import Change

__all__ = ["history_changes", "version_points"]

Point = tuple[str, str, float]


def version_points(
    bench: Workbench, view: TreeView, path: str, chain: Sequence[AdapterWeights], key: Hashable
) -> list[Point]:
    """(role, text node id, perplexity) of the model ``chain`` on N's own, parent's, siblings' texts."""
    ev = bench.evaluator
    parent = view.parent(path)
    texts = [("own", path)]
    if parent:
        texts.append(("parent", parent))
    texts += [("sibling", s) for s in view.children(parent) if s != path]
    return [(role, view.node_id(p), ev.perplexity(chain, bench.probe(p), key)) for role, p in texts]


def history_changes(
    bench: Workbench,
    view: TreeView,
    registry: Registry,
    path: str,
    version: int,
    chain: Sequence[AdapterWeights],
    key: Hashable,
    origin: str,
    extra: Sequence[Point] = (),
    previous: Sequence[ChainLink] | None = None,
) -> list[Change]:
    """The registry changes recording version ``version`` of ``path`` (and its predecessor's
    figures over ``previous``, default its served chain, when the node has no history yet)."""
    node_id = view.node_id(path)
    changes: list[Change] = []
    if not history(registry, node_id):
        served = tuple(previous) if previous is not None else view.chain(path)
        before = served[-1].version
        if before < version:
            points = version_points(bench, view, path, bench.adapters(served), tuple(served))
            changes.append(AddPerplexities(node_id, before, "genesis" if before == 1 else "package", points))
    points = version_points(bench, view, path, chain, key)
    changes.append(AddPerplexities(node_id, version, origin, [*points, *extra]))
    return changes
