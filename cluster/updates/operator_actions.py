"""An operator's actions on a tree: roll ``stable`` back, force a held node's re-pin.

A mixin of :class:`cluster.updates.coordinator.Coordinator` (its lock, registry view, commit
and workbench); kept apart so each module stays small. Both need the operator threshold
over a statement that names the node's current state, so a signature cannot be replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Protocol

from cluster.errors import UpdateStateError
from cluster.updates.keys import load_trust
from cluster.updates.pins import PinDecision, TreeView, pin_changes, plan_pins
from cluster.updates.status import RollbackResult, check_operator
from cluster.updates.workbench import Workbench
from hierarchy.ids import NodeId
from hierarchy.updates.envelope import Signature
from hierarchy.updates.statements import (
    REPIN_PAYLOAD_TYPE,
    ROLLBACK_PAYLOAD_TYPE,
    repin_statement,
    rollback_statement,
)
from nodes.store.tree import BuiltTree
from nodes.store.versions import ChainLink, ServedNode
from registry.db import Registry
from registry.errors import AliasError, Conflict, NodeNotFound
from registry.updates import AddEvent, Change, MoveAlias, pin_history

__all__ = ["CoordinatorCore", "OperatorActions"]


class CoordinatorCore(Protocol):
    """What the operator's actions need of the coordinator that mixes them in (no import of it)."""

    tree: BuiltTree
    registry: Registry
    bench: Workbench

    def _locked(self) -> AbstractContextManager[None]: ...

    def _view(self, history_for: str | None = None) -> TreeView: ...

    def _commit(self, changes: Sequence[Change], view: TreeView, decisions: Sequence[PinDecision] = ()) -> None: ...

    def _link_of(self, node_id: str, version: int) -> ChainLink: ...


class OperatorActions:
    """Rollback and repin (see the module docstring), mixed into the Coordinator."""

    def rollback_statement(self: CoordinatorCore, node: str, to_version: int) -> bytes:
        view = self._view()
        return rollback_statement(str(NodeId.parse(node)), view.stable(view.path_of(node)) or 0, to_version)

    def rollback(self: CoordinatorCore, node: str, to_version: int, signatures: Sequence[Signature]) -> RollbackResult:
        """Move ``stable`` of ``node`` to an accepted ``to_version``; re-pin its subtree; re-sign nothing."""
        with self._locked():
            node_id = str(NodeId.parse(node))
            view = self._view()
            path = view.path_of(node_id)
            if path not in view.pins:
                raise NodeNotFound(f"unknown node {node_id!r} in tree {self.tree.name!r}")
            current = view.stable(path) or 0
            statement = rollback_statement(node_id, current, to_version)
            signers = check_operator(load_trust(self.registry), ROLLBACK_PAYLOAD_TYPE, statement, signatures, node_id)
            status = view.versions[node_id].statuses.get(to_version)
            if to_version == current:
                raise Conflict(f"{node_id} is already at stable version {current}")
            if status != "accepted":
                raise AliasError(
                    f"{node_id} version {to_version} is {status or 'unknown'}: `stable` needs an accepted version"
                )
            link = self._link_of(node_id, to_version)
            view = self._view(history_for=path)
            decisions = plan_pins(view, path, {path: link}, {}, self.bench.revalidate)
            changes: list[Change] = [
                MoveAlias(node_id, "stable", to_version),
                AddEvent("rollback", node_id, None, {"from": current, "to": to_version, "signers": list(signers)}),
                *pin_changes(view, decisions),
            ]
            self._commit(changes, view, decisions)
            held = tuple(view.node_id(d.path) for d in decisions if d.how == "held")
            return RollbackResult(node_id, "stable", to_version, current, held)

    def _link_of(self: CoordinatorCore, node_id: str, version: int) -> ChainLink:
        path = str(NodeId.parse(node_id).path)
        for pin in reversed(pin_history(self.registry, node_id)):
            for x in pin.chain:
                if x["path"] == path and int(x["version"]) == version:
                    return ChainLink.from_dict(x)
        raise UpdateStateError(f"{node_id} version {version} was never served here; nothing to roll back to")

    def repin_statement(self: CoordinatorCore, node: str) -> bytes:
        view = self._view()
        path = view.path_of(node)
        target = (*view.chain(view.parent(path)), view.pins[path].link)
        return repin_statement(str(NodeId.parse(node)), [x.to_dict() for x in target])

    def repin(self: CoordinatorCore, node: str, signatures: Sequence[Signature]) -> ServedNode:
        """An operator's decision: serve a held node over its parent's chain without re-validation."""
        with self._locked():
            node_id = str(NodeId.parse(node))
            view = self._view()
            path = view.path_of(node_id)
            target = (*view.chain(view.parent(path)), view.pins[path].link)
            statement = repin_statement(node_id, [x.to_dict() for x in target])
            signers = check_operator(load_trust(self.registry), REPIN_PAYLOAD_TYPE, statement, signatures, node_id)
            served = ServedNode(path, target)
            decision = PinDecision(path, served, "made-for")
            view = self._view(history_for=path)
            decisions = [
                decision,
                *plan_pins(replace(view, pins=dict(view.pins) | {path: served}), path, {}, {}, self.bench.revalidate),
            ]
            changes = [
                *pin_changes(view, decisions),
                AddEvent("repin-forced", node_id, None, {"signers": list(signers)}),
            ]
            self._commit(changes, view, decisions)
            return served
