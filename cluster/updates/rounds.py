"""One aggregation round: the candidate parent computed from waiting increments, gated, stored.

    build = build_candidate(bench, policy, view, "en/medical", [(update_id, increment, weight), ...])
    build.report.passed                   # every gate check within its bound?
    cand_id, changes = store_candidate(store, policy, view, build, pending, now)   # files written here

candidate = SVD_r(parent + eta * merge(increments)) at the parent's rank and scale
(hierarchy.updates.aggregate). An increment is aligned to the parent's layers first: layers the
parent does not adapt cannot absorb anything, and the share of norm left out is reported.
The candidate's manifest is what approvers sign (the DSSE PAE of its unsigned envelope).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import torch

from cluster.updates.pins import TreeView
from cluster.updates.policy import UpdatePolicy
from cluster.updates.workbench import Workbench
from hierarchy.chain import LoraFactors
from hierarchy.ids import NodeId
from hierarchy.updates.aggregate import INPUT_MAPPED, MergePolicy, WeightedDelta, candidate_parent
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.manifest import UPDATE_PAYLOAD_TYPE, FileEntry, LayerSpec, UpdateManifest
from hierarchy.updates.merges import contrast_map, projector
from hierarchy.updates.screening import ScreenResult, delta_norm
from nodes.build.distill import Target
from nodes.build.gate import Comparison, GateReport
from nodes.store.adapters import AdapterWeights
from nodes.store.versions import ChainLink, VersionStore
from registry.updates import AddEvent, AddUpdate, AddVersion, Change, MoveAlias, SetUpdate, UpdateEntry

__all__ = [
    "CandidateBuild",
    "Increment",
    "align",
    "build_candidate",
    "new_id",
    "own_report",
    "screen_figures",
    "store_candidate",
]

# (update id, the increment as factors per layer, its aggregation weight)
Increment = tuple[str, Mapping[str, LoraFactors], float]


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class CandidateBuild:
    """A candidate parent computed in memory, with its gate report."""

    parent: str  # path
    parent_link: ChainLink  # the parent version it was computed from
    update_ids: tuple[str, ...]
    adapter: AdapterWeights
    method: str  # concat | ties
    conflict: float
    relative_error: float  # what the rank cap lost
    dropped: float  # share of the increments' norm outside the parent's layers (not absorbed)
    report: GateReport


def align(delta: Mapping[str, LoraFactors], parent: AdapterWeights) -> tuple[dict[str, LoraFactors], float]:
    """The increment on exactly the parent's layers (zero where it has none); the share of norm left out."""
    out = {}
    for module, f in parent.factors.items():
        d = delta.get(module)
        out[module] = (
            d
            if d is not None
            else LoraFactors(
                A=torch.zeros(1, f.in_features, dtype=f.A.dtype),
                B=torch.zeros(f.out_features, 1, dtype=f.B.dtype),
                scale=1.0,
            )
        )
    outside = {m: v for m, v in delta.items() if m not in parent.factors}
    total = delta_norm(delta) if outside else 0.0
    return out, (delta_norm(outside) / total if total else 0.0)


def screen_figures(screen: ScreenResult) -> dict:
    return {
        "verdict": screen.verdict.value,
        "weight": screen.weight,
        "norm": screen.norm,
        "clip": screen.clip_factor,
        "cosine": screen.cosine,
        "floor": screen.floor,
        "ceiling": screen.ceiling,
    }


def build_candidate(
    bench: Workbench,
    policy: UpdatePolicy,
    view: TreeView,
    parent: str,
    increments: Sequence[Increment],
    *,
    override: tuple[str, AdapterWeights, str] | None = None,
    own_check: tuple[str, ChainLink] | None = None,
    sources: Sequence[str] = (),
) -> CandidateBuild:
    """The candidate parent and its gate report (nothing stored).

    ``override`` = (child path, its new adapter, a key): gate that child with the adapter it is about
    to get (a package being admitted); ``own_check`` adds "does the update hurt its own probe".
    ``sources``: the children the increments come from; a ``project`` merge protects the inputs of
    the parent's own text and of every other child's (over the chains served now).
    """
    parent_chain = view.chain(parent)
    current = bench.adapter(parent_chain[-1])
    children, dropped = [], []
    for update_id, delta, weight in increments:
        aligned, lost = align(delta, current)
        children.append(WeightedDelta(aligned, weight, update_id))
        dropped.append(lost)
    merge = replace(policy.merge, eta=policy.eta)
    maps = _input_maps(bench, view, parent, sources, merge, current) if merge.method in INPUT_MAPPED else None
    merged = candidate_parent(current.factors, children, merge, maps)
    candidate = AdapterWeights(current.r, current.alpha, current.target_modules, merged.factors, current.dropout)
    if policy.consolidate.steps:
        candidate = _consolidate(bench, policy, view, parent, sources, candidate)
    ancestors = bench.adapters(parent_chain[:-1])
    cand_key = ("candidate", tuple(parent_chain), tuple(u for u, _, _ in increments))
    after_parent = (*parent_chain[:-1], cand_key)
    comparisons = [
        Comparison(
            f"parent {view.node_id(parent)} held-out",
            "parent",
            bench.probe(parent),
            bench.adapters(parent_chain),
            [*ancestors, candidate],
            tuple(parent_chain),
            after_parent,
        )
    ]
    for child in view.children(parent):
        chain = view.chain(child)
        # Cache keys of the chains measured: version links, or ("new", digest) for an adapter being admitted.
        child_key: Hashable = chain[-1]
        child_adapter = bench.adapter(chain[-1])
        before = bench.adapters(chain)
        before_key: tuple[Hashable, ...] = tuple(chain)
        kind = "probe"
        if override is not None and override[0] == child:
            # The updating child's new adapter over the candidate counts its update twice; it is
            # never served so (re-validated, held, rebased): reported, not gated (nodes.build.gate).
            child_adapter, child_key, kind = override[1], ("new", override[2]), "stale"
            before, before_key = [*bench.adapters(parent_chain), child_adapter], (*parent_chain, child_key)
        comparisons.append(
            Comparison(
                f"probe {view.node_id(child)}",
                kind,
                bench.probe(child),
                before,
                [*ancestors, candidate, child_adapter],
                before_key,
                (*after_parent, child_key),
            )
        )
    comparisons.append(
        Comparison(
            "canary",
            "canary",
            bench.canary(),
            bench.adapters(parent_chain),
            [*ancestors, candidate],
            tuple(parent_chain),
            after_parent,
        )
    )
    if own_check is not None and override is not None:
        path = own_check[0]
        chain = view.chain(path)
        after, after_key = [*bench.adapters(parent_chain), override[1]], (*parent_chain, ("new", override[2]))
        comparisons.append(
            Comparison(
                f"update {view.node_id(path)} on its own probe",
                "probe",
                bench.probe(path),
                bench.adapters(chain),
                after,
                tuple(chain),
                after_key,
            )
        )
        comparisons.extend(_feedback_check(bench, view, path, after, after_key))
    report = bench.measure(f"candidate {view.node_id(parent)} v{view.latest(parent) + 1}", comparisons)
    return CandidateBuild(
        parent,
        parent_chain[-1],
        tuple(u for u, _, _ in increments),
        candidate,
        merged.method,
        merged.conflict,
        merged.relative_error,
        max(dropped, default=0.0),
        report,
    )


def _input_maps(
    bench: Workbench, view: TreeView, parent: str, sources: Sequence[str], merge: MergePolicy, current: AdapterWeights
) -> dict[str, torch.Tensor]:
    """Per-layer maps of a ``project`` / ``contrast`` merge: the protected inputs are the parent's
    own and its ancestors' texts and every child's that sent no increment, over the chains served now."""
    children = view.children(parent)
    # The parent's chain on its own and its ancestors' texts (the gate's canary is the top level's),
    # each other child's chain on its text.
    guarded = [(p, view.chain(parent)) for p in _lineage(view, parent)]
    guarded += [(c, view.chain(c)) for c in children if c not in sources]
    protect = bench.input_covariance(guarded, current.factors)
    if merge.method == "project":
        return {m: projector(c, merge.energy) for m, c in protect.items()}
    keep = bench.input_covariance([(c, view.chain(c)) for c in sources if c in children], current.factors)
    if not keep:  # no child's text to keep: the increment's own inputs are unknown, shrink uniformly
        return {m: torch.eye(c.shape[0], dtype=torch.float64) / (1.0 + merge.strength) for m, c in protect.items()}
    # Mean covariances: the protected side sums several texts, the kept side one or more.
    n_guard, n_keep = len(guarded), len([c for c in sources if c in children])
    return {m: contrast_map(keep[m] / n_keep, protect[m] / n_guard, merge.strength) for m in protect}


def _lineage(view: TreeView, path: str) -> list[str]:
    """``path`` and its ancestors up to the first level."""
    out = []
    while path:
        out.append(path)
        path = view.parent(path)
    return out


def _consolidate(
    bench: Workbench, policy: UpdatePolicy, view: TreeView, parent: str, sources: Sequence[str], merged: AdapterWeights
) -> AdapterWeights:
    """The merged candidate distilled (nodes.build.distill): towards the current parent chain on
    the parent's own and its ancestors' training texts and, with each sibling's adapter on top, on
    each sibling's; towards the merged candidate itself on the updating children's texts (keep
    what they taught)."""
    chain = view.chain(parent)
    ancestors, old = bench.adapters(chain[:-1]), bench.adapters(chain)
    targets = [Target(bench.train_tokens(p), old) for p in _lineage(view, parent)]
    for child in view.children(parent):
        if child in sources:
            targets.append(Target(bench.train_tokens(child), [*ancestors, merged]))
        else:
            own = bench.adapter(view.chain(child)[-1])
            targets.append(Target(bench.train_tokens(child), [*old, own], around=[own]))
    return bench.distill(ancestors, merged, targets, policy.consolidate)


def own_report(bench: Workbench, view: TreeView, path: str, new: AdapterWeights, key: str) -> GateReport:
    """The gate for an update of a first-level node (no parent absorbs it): its own probe and the canary."""
    chain = view.chain(path)
    after, after_key = [new], (("new", key),)
    return bench.measure(
        f"update {view.node_id(path)}",
        [
            Comparison(
                f"update {view.node_id(path)} on its own probe",
                "probe",
                bench.probe(path),
                bench.adapters(chain),
                after,
                tuple(chain),
                after_key,
            ),
            Comparison("canary", "canary", bench.canary(), bench.adapters(chain), after, tuple(chain), after_key),
            *_feedback_check(bench, view, path, after, after_key),
        ],
    )


def _feedback_check(
    bench: Workbench, view: TreeView, path: str, after: Sequence[AdapterWeights], after_key: tuple[Hashable, ...]
) -> list[Comparison]:
    """An update of a node with held-out feedback must improve on it (GateBounds.feedback)."""
    text = bench.feedback(path)
    if text is None:
        return []
    chain = view.chain(path)
    name = f"update {view.node_id(path)} on its held-out feedback"
    return [Comparison(name, "feedback", text, bench.adapters(chain), list(after), tuple(chain), after_key)]


def store_candidate(
    store: VersionStore,
    policy: UpdatePolicy,
    view: TreeView,
    build: CandidateBuild,
    pending: Sequence[UpdateEntry],
    now: datetime,
) -> tuple[str, list[Change]]:
    """Write the candidate's version files; return its id and the registry changes that record it."""
    parent = build.parent
    parent_id, version = view.node_id(parent), view.latest(parent) + 1
    grand = view.parent(parent)
    grand_version = view.stable(grand) if grand else 0
    cand_id = new_id()
    record = {k: v for k, v in store.node(build.parent_link).raw.items() if k != "files"}
    record |= {"metrics": {"gate": build.report.to_dict()}, "update": {"id": cand_id, "kind": "candidate"}}
    link = store.put_adapter(parent, version, build.adapter, record)
    stored = store.node(link)
    contributions = json.dumps(sorted(p.manifest_digest for p in pending)).encode()
    node = NodeId.parse(parent_id)
    metrics = {
        "gate_passed": 1.0,
        "merge_relative_error": build.relative_error,
        "sign_conflict": build.conflict,
        "increments": float(len(pending)),
        "eta": policy.eta,
    }
    manifest = UpdateManifest(
        node=node,
        parent=node.parent,
        parent_version=grand_version or 0,
        base_digest="sha256:" + view.tree.base_digest,
        version=version,
        files=tuple(FileEntry(n, str(i["sha256"]), int(i["length"])) for n, i in stored.files.items()),
        layers=tuple(LayerSpec(m, f.out_features, f.in_features, f.rank) for m, f in build.adapter.factors.items()),
        training_data_digest="sha256:" + hashlib.sha256(contributions).hexdigest(),
        metrics=tuple(sorted(metrics.items())),
        created=now,
        expires=now + timedelta(seconds=policy.approval_ttl_s),
    )
    envelope = Envelope(UPDATE_PAYLOAD_TYPE, manifest.to_bytes(), ())
    figures = {
        "from": build.parent_link.to_dict(),
        "to": link.to_dict(),
        "over": [x.to_dict() for x in view.chain(parent)[:-1]],
        "gate": build.report.to_dict(),
        "merge": {
            "method": build.method,
            "relative_error": build.relative_error,
            "sign_conflict": build.conflict,
            "outside_parent_layers": build.dropped,
        },
    }
    target = view.node_id(grand) if grand else view.tree.name
    changes: list[Change] = [
        AddVersion(
            parent_id,
            version,
            grand_version or None,
            manifest.digest[7:],
            "candidate",
            {"adapter_sha256": link.adapter, "gate": build.report.to_dict()},
        ),
        MoveAlias(parent_id, "candidate", version),
        AddUpdate(
            cand_id,
            "candidate",
            parent_id,
            version,
            grand_version or 0,
            target,
            "awaiting-approval",
            manifest.digest[7:],
            envelope.to_bytes().decode(),
            figures=figures,
            reasons=[f"gate passed ({len(build.report.checks)} checks); needs approvals {dict(policy.approvals)}"],
        ),
        AddEvent("candidate", parent_id, cand_id, {"version": version, "updates": list(build.update_ids)}),
    ]
    for p in pending:
        norm = float(p.figures.get("norm", 0.0)) * float(p.figures.get("clip", 1.0))
        changes.append(SetUpdate(p.update_id, state="aggregated", round_id=cand_id, figures={"merged_norm": norm}))
    return cand_id, changes
