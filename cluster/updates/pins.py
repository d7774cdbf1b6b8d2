"""Which chain each node is served over, and how that changes when a version moves.

A node's *target* chain is its parent's served chain plus its own stable version. After any
change (a new stable version, a rollback), every node of the changed subtree, parents first,
moves to its target chain when

- the chain was made for it (a package trained over exactly that parent chain, a candidate
  gated over it), or
- it was served over exactly that chain before (a rollback restores a validated pin), or
- re-validation passes now: its probe perplexity over the target chain is within the re-pin
  bound of what it is over its current chain;

otherwise it keeps its current chain, *held*, with the figures as the reason, until an
operator acts (or a new version of it is trained over the new parent). So no node is ever
served over a chain it was not validated against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hierarchy.ids import NodeId, NodePath
from nodes.build.gate import GateCheck
from nodes.store.tree import BuiltTree
from nodes.store.versions import ChainLink, ServedNode
from registry.updates import AddEvent, AddPin, Change, NodeVersions, PinEntry

__all__ = ["PinDecision", "TreeView", "pin_changes", "plan_pins"]

Chain = tuple[ChainLink, ...]


@dataclass(frozen=True)
class TreeView:
    """One operation's view of a tree: its nodes, versions (registry) and served chains (pins)."""

    tree: BuiltTree
    versions: Mapping[str, NodeVersions]  # node id -> versions
    pins: Mapping[str, ServedNode]  # node path -> how it is served
    history: Mapping[str, frozenset[Chain]] = field(default_factory=dict)  # node path -> chains it had

    def node_id(self, path: str) -> str:
        return str(NodeId(self.tree.name, NodePath(path)))

    def path_of(self, node_id: str) -> str:
        key = NodeId.parse(node_id)
        return str(key.path)

    def parent(self, path: str) -> str:
        """The parent's path ('' for the base)."""
        return str(NodePath(path).parent)

    def children(self, path: str) -> list[str]:
        return [str(n.path) for n in self.tree.nodes if str(n.path.parent) == path]

    def subtree(self, path: str) -> list[str]:
        """``path`` and its descendants, parents first (the tree's own order)."""
        return [str(n.path) for n in self.tree.nodes if str(n.path) == path or str(n.path).startswith(path + "/")]

    def chain(self, path: str) -> Chain:
        return self.pins[path].chain if path else ()

    def stable(self, path: str) -> int | None:
        return self.versions[self.node_id(path)].stable if path else None

    def latest(self, path: str) -> int:
        return self.versions[self.node_id(path)].latest

    @staticmethod
    def from_registry(
        tree: BuiltTree,
        versions: Mapping[str, NodeVersions],
        pins: Mapping[str, PinEntry],
        history: Mapping[str, tuple[PinEntry, ...]] = {},
    ) -> TreeView:
        def served(entry: PinEntry) -> ServedNode:
            path = str(NodeId.parse(entry.node_id).path)
            return ServedNode(path, tuple(ChainLink.from_dict(x) for x in entry.chain), entry.status, entry.reason)

        # A node the tree dir no longer lists (retired) is not served, whatever pins it had.
        listed = {str(n.node_id) for n in tree.nodes}
        current = {str(NodeId.parse(k).path): served(v) for k, v in pins.items() if k in listed}
        past = {
            str(NodeId.parse(k).path): frozenset(tuple(ChainLink.from_dict(x) for x in e.chain) for e in entries)
            for k, entries in history.items()
        }
        return TreeView(tree, versions, current, past)


@dataclass(frozen=True)
class PinDecision:
    """What happened to one node's serving chain."""

    path: str
    served: ServedNode
    how: str  # made-for | restored | validated | held
    check: GateCheck | None = None

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"how": self.how, "chain": [x.to_dict() for x in self.served.chain]}
        if self.check is not None:
            out["check"] = self.check.to_dict()
        if self.served.reason:
            out["reason"] = self.served.reason
        return out


Validate = Callable[[str, Chain, Chain], GateCheck]


def plan_pins(
    view: TreeView,
    root: str,
    own: Mapping[str, ChainLink],
    made_for: Mapping[str, Chain],
    validate: Validate,
) -> list[PinDecision]:
    """New serving chains for ``root``'s subtree after its nodes' own versions became ``own``.

    ``made_for`` names chains that need no measuring (see the module docstring); ``validate``
    measures a node's probe over its current and its target chain. Nodes whose chain and
    status stay the same are left out of the result.
    """
    planned: dict[str, ServedNode] = {}
    out: list[PinDecision] = []
    for path in view.subtree(root):
        parent = view.parent(path)
        parent_chain = planned[parent].chain if parent in planned else view.chain(parent)
        current = view.pins[path]
        link = own.get(path, current.link)
        target: Chain = (*parent_chain, link)
        if target == current.chain:
            if current.status == "held" and parent_chain == current.chain[:-1]:
                planned[path] = ServedNode(path, target)  # its parent came back to it: no longer held
                out.append(PinDecision(path, planned[path], "restored"))
            continue
        if made_for.get(path) == target:
            decision = PinDecision(path, ServedNode(path, target), "made-for")
        elif target in view.history.get(path, frozenset()):
            decision = PinDecision(path, ServedNode(path, target), "restored")
        else:
            check = validate(path, current.chain, target)
            if check.passed:
                decision = PinDecision(path, ServedNode(path, target), "validated", check)
            else:
                reason = (
                    f"held on its current chain: over {_describe(target)} {check.describe()}; "
                    "an operator may roll back or repin it, or its owner may retrain it over the new parent"
                )
                decision = PinDecision(path, ServedNode(path, current.chain, "held", reason), "held", check)
        if decision.served != current:
            planned[path] = decision.served
            out.append(decision)
    return out


def _describe(chain: Chain) -> str:
    return " > ".join(f"{x.path}@v{x.version}" for x in chain)


def pin_changes(view: TreeView, decisions: list[PinDecision], update_id: str | None = None) -> list[Change]:
    """Registry changes recording ``decisions`` (a pin row and an event each)."""
    changes: list[Change] = []
    for d in decisions:
        node_id = view.node_id(d.path)
        changes.append(
            AddPin(node_id, d.served.version, [x.to_dict() for x in d.served.chain], d.served.status, d.served.reason)
        )
        changes.append(
            AddEvent("held" if d.how == "held" else "repinned", node=node_id, update_id=update_id, detail=d.detail())
        )
    return changes
