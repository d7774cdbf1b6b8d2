"""Rebasing children when their parent's new version becomes stable.

A child's adapter was trained over its parent's old version; over the new one its effective model
drifts. Its rebased version is its adapter re-fit over the new parent chain (nodes.build.distill):
KL towards the old effective model's next-token distributions on the child's training text, plus
its own LM loss on it. The fit starts (``rebase.start: refit``) from the child's adapter
re-expressed over the new parent: chains add in weight space, so ``own + old parent - new parent``
cut to the child's rank by SVD is the old effective model up to that cut, and the distillation
only has to correct the cut. The rebased version is gated on the child's own probe text (within
``gate.rebase`` of what the old effective model scores, either way), signed with the policy's
``rebase.key``, stored and recorded like any version (an update record of kind ``rebase``, its
forgetting history, including ``stale``: the un-rebased child over the new parent) and served:
it was made for the new chain, so it is pinned there in the same transaction. Its own children
are then rebased over it in turn.

Until then the child keeps the pin it got when the parent moved (re-validated over the new parent,
or held on the old one), so no request ever sees a half-rebased chain. The coordinator runs
rebases in its ``background`` runner (a server's round thread, the Ray update desk's thread pool),
a level of the subtree at a time: :func:`plan_rebase` for each child under the tree's lock, the
re-fits through a :class:`Refitter` outside it (:class:`LocalRefitter`: one after another with the
workbench's model; cluster.ray.rebase.RayRefitter: parallel Ray tasks), then :func:`rebase_child`
gates, signs and records each under the lock again, dropping one whose chain moved meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import torch

from cluster.updates.history import history_changes
from cluster.updates.pins import PinDecision, TreeView, pin_changes, plan_pins
from cluster.updates.policy import RebasePolicy, UpdatePolicy
from cluster.updates.rounds import new_id
from cluster.updates.workbench import Workbench
from hierarchy.ids import NodeId
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import FileEntry, LayerSpec, UpdateManifest, sign_manifest
from nodes.build.distill import Target, distill, refit_adapter
from nodes.build.gate import Comparison, GateCheck
from nodes.store.adapters import AdapterWeights
from nodes.store.versions import ChainLink, VersionStore
from registry.db import Registry
from registry.updates import AddEvent, AddUpdate, AddVersion, Change, MoveAlias

__all__ = [
    "LocalRefitter",
    "Rebase",
    "RebasePlan",
    "RefitRequest",
    "Refitter",
    "plan_rebase",
    "rebase_child",
    "refit",
    "refit_child",
]


@dataclass(frozen=True)
class Rebase:
    """One child's rebase: its gate check, the un-rebased figure, and what to record."""

    child: str
    check: GateCheck  # own probe: old effective model -> rebased version over the new parent
    stale: GateCheck  # own probe: old effective model -> old adapter over the new parent
    link: ChainLink | None  # the stored version (None when the gate refused it)
    changes: list[Change]
    decisions: list[PinDecision]

    def figures(self) -> dict[str, Any]:
        return {"child": self.child, "rebased": self.check.to_dict(), "stale": self.stale.to_dict()}


@dataclass(frozen=True)
class RefitRequest:
    """One child's re-fit, self-contained (adapters as tensors, the base by its directory and
    digest) so that a worker on another machine can run it: see :class:`Refitter`."""

    child: str
    old_chain: tuple[AdapterWeights, ...]  # the old effective model: the old parent chain + the child
    new_parent: tuple[AdapterWeights, ...]
    tokens: torch.Tensor  # the child's training text
    policy: RebasePolicy
    seq_len: int
    base_dir: str
    base_digest: str


class Refitter(Protocol):
    """Runs re-fits: all of one level's children are handed over at once (a Ray cluster runs them in
    parallel as tasks, cluster.ray.rebase); returns each adapter with where and how long it ran."""

    def fit(self, requests: Sequence[RefitRequest]) -> list[tuple[AdapterWeights, dict[str, Any]]]: ...


def refit(model: torch.nn.Module, request: RefitRequest) -> AdapterWeights:
    """The child's adapter (``old_chain[-1]``, trained over ``old_chain[:-1]``) re-fit over
    ``new_parent``: from its re-expression there (``policy.start``), distilled towards the old
    effective model on ``tokens`` plus ``policy.lm_weight`` times its own LM loss."""
    policy, own = request.policy, request.old_chain[-1]
    start = refit_adapter(own, request.old_chain[:-1], request.new_parent)[0] if policy.start == "refit" else own
    targets = [Target(request.tokens, request.old_chain), Target(request.tokens, None, policy.lm_weight)]
    return distill(model, list(request.new_parent), start, targets, policy.settings(request.seq_len)).adapter


class LocalRefitter:
    """Re-fits one after another with the workbench's own model (a server's round thread)."""

    def __init__(self, bench: Workbench):
        self.bench = bench

    def fit(self, requests: Sequence[RefitRequest]) -> list[tuple[AdapterWeights, dict[str, Any]]]:
        out = []
        for request in requests:
            started = time.perf_counter()
            ev = self.bench.evaluator
            with ev.lock:
                adapter = refit(ev.base.model, request)
            out.append((adapter, {"on": "local", "seconds": round(time.perf_counter() - started, 3)}))
        return out


def refit_request(
    bench: Workbench,
    policy: RebasePolicy,
    child: str,
    old_chain: Sequence[AdapterWeights],
    new_parent: Sequence[AdapterWeights],
) -> RefitRequest:
    tree = bench.store.tree
    return RefitRequest(
        child,
        tuple(old_chain),
        tuple(new_parent),
        bench.train_tokens(child),
        policy,
        bench.seq_len,
        str(tree.base_dir),
        tree.base_digest,
    )


def refit_child(
    bench: Workbench,
    policy: RebasePolicy,
    child: str,
    old_chain: Sequence[AdapterWeights],
    new_parent: Sequence[AdapterWeights],
) -> AdapterWeights:
    """:func:`refit` of ``child`` here, with the workbench's model."""
    return LocalRefitter(bench).fit([refit_request(bench, policy, child, old_chain, new_parent)])[0][0]


@dataclass(frozen=True)
class RebasePlan:
    """What one child's rebase starts from: the chains as they were when its re-fit was asked for."""

    child: str
    own_link: ChainLink
    old_chain: tuple[ChainLink, ...]  # the parent's old link ``before`` in place of its new one
    new_parent: tuple[ChainLink, ...]
    request: RefitRequest


def plan_rebase(bench: Workbench, policy: UpdatePolicy, view: TreeView, child: str, before: ChainLink) -> RebasePlan:
    """``child`` re-fit over its parent's served chain, replacing the parent's old link ``before``."""
    new_parent = tuple(view.chain(view.parent(child)))
    own_link = view.pins[child].link
    old_chain = (*new_parent[:-1], before, own_link)
    request = refit_request(bench, policy.rebase, child, bench.adapters(old_chain), bench.adapters(new_parent))
    return RebasePlan(child, own_link, old_chain, new_parent, request)


def rebase_child(
    bench: Workbench,
    store: VersionStore,
    registry: Registry,
    policy: UpdatePolicy,
    view: TreeView,
    plan: RebasePlan,
    fitted: AdapterWeights,
    fit: dict[str, Any],
    key: SigningKey,
    now: datetime,
) -> Rebase:
    """Gate, sign and record ``plan``'s re-fit adapter ``fitted`` (``fit``: where it ran)."""
    child, own_link, old_chain, new_parent = plan.child, plan.own_link, plan.old_chain, plan.new_parent
    parent = view.parent(child)
    teacher, ancestors, own = bench.adapters(old_chain), bench.adapters(new_parent), bench.adapter(own_link)
    rebased = fitted
    node_id, version = view.node_id(child), view.latest(child) + 1
    rebased_key = (*new_parent, ("rebased", own_link, version))
    report = bench.measure(
        f"rebase {node_id} v{version}",
        [
            Comparison(
                f"rebased {node_id} on its own probe",
                "rebase",
                bench.probe(child),
                teacher,
                [*ancestors, rebased],
                tuple(old_chain),
                rebased_key,
            ),
            Comparison(
                f"un-rebased {node_id} over the new parent",
                "repin",
                bench.probe(child),
                teacher,
                [*ancestors, own],
                tuple(old_chain),
                (*new_parent, own_link),
            ),
        ],
    )
    check, stale = report.checks
    figures = {
        "rebased": check.to_dict(),
        "stale": stale.to_dict(),
        "over": [x.to_dict() for x in new_parent],
        "fit": fit,
    }
    if not check.passed:
        event = AddEvent("rebase-rejected", node_id, None, figures | {"reason": check.describe()})
        return Rebase(child, check, stale, None, [event], [])
    update_id = new_id()
    parent_version = view.stable(parent) or 0
    record = {k: v for k, v in store.node(own_link).raw.items() if k != "files"}
    record |= {
        "parent_version": parent_version or None,
        "parent_adapter_digest": new_parent[-1].adapter,
        "metrics": {"rebase": check.to_dict(), "stale": stale.to_dict()},
        "update": {"id": update_id, "kind": "rebase"},
    }
    link = store.put_adapter(child, version, rebased, record)
    stored = store.node(link)
    node = NodeId.parse(node_id)
    trained_on = json.dumps({"text": bench.train_text(child).sha256, "teacher": [x.to_dict() for x in old_chain]})
    manifest = UpdateManifest(
        node=node,
        parent=node.parent,
        parent_version=parent_version,
        base_digest="sha256:" + view.tree.base_digest,
        version=version,
        files=tuple(FileEntry(n, str(i["sha256"]), int(i["length"])) for n, i in stored.files.items()),
        layers=tuple(LayerSpec(m, f.out_features, f.in_features, f.rank) for m, f in rebased.factors.items()),
        training_data_digest="sha256:" + hashlib.sha256(trained_on.encode()).hexdigest(),
        metrics=(("rebase_change", check.change), ("stale_change", stale.change)),
        created=now,
        expires=now + timedelta(seconds=policy.approval_ttl_s),
    )
    envelope = sign_manifest(manifest, [key])
    decisions = plan_pins(view, child, {child: link}, {child: (*new_parent, link)}, bench.revalidate)
    changes: list[Change] = [
        AddVersion(node_id, version, parent_version or None, manifest.digest[7:], "accepted", {"rebase": check.change}),
        MoveAlias(node_id, "stable", version),
        AddUpdate(
            update_id,
            "rebase",
            node_id,
            version,
            parent_version,
            view.node_id(parent),
            "stable",
            manifest.digest[7:],
            envelope.to_bytes().decode(),
            figures=figures | {"from": own_link.to_dict(), "to": link.to_dict(), "signer": key.keyid},
            reasons=[f"rebased over {parent} v{parent_version}: {check.describe()}; un-rebased {stale.describe()}"],
        ),
        AddEvent("rebased", node_id, update_id, figures | {"version": version}),
        *pin_changes(view, decisions, update_id),
    ]
    changes += history_changes(
        bench,
        view,
        registry,
        child,
        version,
        [*ancestors, rebased],
        rebased_key,
        "rebase",
        extra=[("stale", node_id, stale.after)],
        previous=old_chain,
    )
    return Rebase(child, check, stale, link, changes, decisions)
