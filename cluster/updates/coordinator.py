"""The update coordinator: packages in, screened, aggregated, gated, approved, propagated.

    coord = Coordinator.open(registry, "build/demo")          # imports the tree, pins genesis versions
    status = coord.submit(read_package("onc-v2"))              # verify -> screen -> gate -> store
    coord.approve(status.candidate_id, keyid, signature)       # k-of-n approvals -> stable -> re-pin
    coord.rollback("demo/en/medical", 1, signatures)           # moves `stable` back, re-signs nothing

submit: ``hierarchy.updates.verify_update`` (trust from the registry, fixed order) -> screening
of the node's increment (norm floor/ceiling, cosine with the parent's own reference increment)
-> the gate on the candidate parent this update alone would make -> the node's new version is
stored and served (its own key signed it), the increment waits for its parent. Anything
refused before that leaves the tree dir and the registry exactly as they were.

aggregation (when the parent's policy triggers: m pending increments, or a time window):
candidate = SVD_r(parent + eta * merge(increments)) -> gate -> version n+1 with status
candidate, awaiting k-of-n approvals (default: an evaluator and an operator key acting for the
parent). Approval moves ``stable``, re-pins the subtree (see cluster.updates.pins) and offers
the parent's own increment to *its* parent: the upward step repeats one level up.

Every apply writes version files first (temp dir + rename), then one registry transaction,
then switches the snapshot (os.replace); ``open`` reconciles a snapshot left behind by a crash
with the registry, which is the source of truth.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from cluster.errors import ApprovalRejected, NotAwaitingApproval
from cluster.tree_import import import_tree
from cluster.updates.grow import TreeGrowth
from cluster.updates.history import history_changes
from cluster.updates.keys import load_rebase_key, load_trust
from cluster.updates.operator_actions import OperatorActions
from cluster.updates.package import Package
from cluster.updates.pins import PinDecision, TreeView, pin_changes, plan_pins
from cluster.updates.policy import UpdatePolicy
from cluster.updates.rebase import LocalRefitter, Refitter, plan_rebase, rebase_child
from cluster.updates.rounds import (
    CandidateBuild,
    build_candidate,
    new_id,
    own_report,
    screen_figures,
    store_candidate,
)
from cluster.updates.status import UpdateStatus
from cluster.updates.workbench import Workbench
from hierarchy.chain import LoraFactors
from hierarchy.errors import (
    ExpiredError,
    ManifestError,
    RevokedKeyError,
    ShapeMismatchError,
    ThresholdError,
    UnknownKeyError,
)
from hierarchy.ids import NodeId
from hierarchy.updates.envelope import Envelope, Signature
from hierarchy.updates.manifest import UpdateManifest, parse_manifest
from hierarchy.updates.screening import ScreenResult, delta_norm, scale_delta, screen_update
from hierarchy.updates.trust import NodeVersion, TrustState
from hierarchy.updates.verify import (
    Expectations,
    LayerShape,
    VerifiedUpdate,
    check_approvals,
    verify_envelope,
    verify_update,
)
from nodes.build.finetune import increment
from nodes.errors import AdapterError
from nodes.store.adapters import AdapterWeights, read_adapter
from nodes.store.tree import BuiltTree
from nodes.store.versions import ChainLink, ServedNode, Snapshot, VersionStore, checkpoint
from registry.db import Registry
from registry.errors import NodeNotFound
from registry.updates import (
    AddEvent,
    AddPin,
    AddUpdate,
    AddVersion,
    Change,
    MoveAlias,
    SetStatus,
    SetUpdate,
    UpdateEntry,
    apply_changes,
    current_pins,
    get_update,
    list_updates,
    pin_history,
    tree_versions,
)

__all__ = ["Coordinator"]

log = logging.getLogger("treelm.updates")
LOCK_FILE = ".updates.lock"


class Coordinator(OperatorActions, TreeGrowth):
    """One tree's update protocol over a registry (see the module docstring); nodes are added and
    retired while it serves by :class:`cluster.updates.grow.TreeGrowth`."""

    def __init__(
        self,
        registry: Registry,
        tree_dir: str | Path,
        policy: UpdatePolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        background: Callable[[Callable[[], object]], object] | None = None,
        refitter: Refitter | None = None,
    ):
        """``background``: runs the next level's aggregation round after ``approve`` returns (an
        executor's ``submit``); None runs it before ``approve`` returns. Either way the contribution
        is recorded in the approval's transaction, so a round lost to a crash is made by ``tick``.
        ``refitter``: where rebases' re-fits run (None: here, one after another)."""
        self.registry = registry
        self._background = background
        self.refitter = refitter
        self.store = VersionStore(tree_dir)
        self.tree: BuiltTree = self.store.tree
        self.policy = policy or UpdatePolicy.for_tree(self.store.root)
        self.bench = Workbench(self.store, self.policy)
        self.clock = clock
        self._lock = threading.RLock()
        self._listeners: list[Callable[[BuiltTree], None]] = []
        self._admission: CandidateBuild | None = None
        self._depth = 0

    @classmethod
    def open(
        cls,
        registry: Registry,
        tree_dir: str | Path,
        policy: UpdatePolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        background: Callable[[Callable[[], object]], object] | None = None,
        refitter: Refitter | None = None,
    ) -> Coordinator:
        coordinator = cls(registry, tree_dir, policy, clock=clock, background=background, refitter=refitter)
        coordinator.prepare()
        return coordinator

    def on_snapshot(self, listener: Callable[[BuiltTree], None]) -> None:
        """Call ``listener(served_tree)`` after every snapshot switch (a server swaps its engine's tree)."""
        self._listeners.append(listener)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # One writer per tree dir across processes (the CLI and a server), one per coordinator in-process.
        with self._lock:
            if self._depth:  # re-entered by the same thread: the file lock is already ours
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with open(self.store.root / LOCK_FILE, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
                    fcntl.flock(handle, fcntl.LOCK_UN)

    # -- state ---------------------------------------------------------------------------------
    def _view(self, history_for: str | None = None) -> TreeView:
        name = self.tree.name
        pins = current_pins(self.registry, name)
        history = {}
        if history_for is not None:
            view = TreeView.from_registry(self.tree, {}, pins)
            history = {view.node_id(p): pin_history(self.registry, view.node_id(p)) for p in view.subtree(history_for)}
        return TreeView.from_registry(self.tree, tree_versions(self.registry, name), pins, history)

    def prepare(self) -> None:
        """Import the tree (idempotent), pin nodes that have no pin yet, reconcile the snapshot."""
        with self._locked():
            import_tree(self.registry, self.tree.root)
            self.store.clean_leftovers()
            view = self._view()
            missing = [n for n in self.tree.nodes if str(n.path) not in view.pins]
            if missing:
                genesis = self.store.genesis_nodes()
                pins = dict(view.pins)
                changes: list[Change] = []
                for node in missing:
                    path = str(node.path)
                    parent = view.parent(path)
                    chain = (*(pins[parent].chain if parent else ()), genesis[path].link)
                    pins[path] = ServedNode(path, chain)
                    changes.append(AddPin(view.node_id(path), node.version, [x.to_dict() for x in chain]))
                changes.append(
                    AddEvent("pinned-genesis", node=self.tree.name, detail={"nodes": [str(n.path) for n in missing]})
                )
                apply_changes(self.registry, changes)
                checkpoint("db-committed")
                self._switch(pins)
                return
            snapshot = self.store.read_snapshot()
            if not Snapshot(self.tree.name, 0, dict(view.pins)).same_chains(snapshot):
                log.warning(
                    "snapshot of %s differs from the registry (an interrupted apply?): switching to the "
                    "registry's pins",
                    self.tree.name,
                )
                self._switch(dict(view.pins))

    def _switch(self, pins: Mapping[str, ServedNode]) -> None:
        self.store.write_snapshot(pins)
        if self._listeners:
            served = self.store.served_tree()
            for listener in self._listeners:
                listener(served)

    def _commit(self, changes: Sequence[Change], view: TreeView, decisions: Sequence[PinDecision] = ()) -> None:
        """Registry first (one transaction, the commit point), then the snapshot when pins moved."""
        apply_changes(self.registry, changes)
        checkpoint("db-committed")
        if decisions:
            pins = dict(view.pins) | {d.path: d.served for d in decisions}
            self._switch(pins)

    def served_tree(self) -> BuiltTree:
        return self.store.served_tree()

    # -- verification --------------------------------------------------------------------------
    def _trust_for(self, view: TreeView, path: str | None) -> TrustState:
        nodes = []
        if path:
            nodes.append(NodeVersion(view.node_id(path), view.latest(path), 0))
            parent = view.parent(path)
            if parent:
                nodes.append(NodeVersion(view.node_id(parent), view.stable(parent) or 0, 0))
        return load_trust(self.registry, nodes)

    def _locate(self, view: TreeView, package: Package) -> str | None:
        hint = package.node_hint()
        if hint is None:
            return None  # garbage or unsigned payload: verification says why
        if NodeId.parse(hint).tree != self.tree.name or NodeId.parse(hint).is_base:
            raise NodeNotFound(f"unknown node {hint!r}: this coordinator serves tree {self.tree.name!r}")
        path = view.path_of(hint)
        if path not in view.pins:
            raise NodeNotFound(f"unknown node {hint!r}: list nodes with `treelm registry ls`")
        return path

    def _expectations(self, view: TreeView, path: str | None) -> Expectations:
        base = "sha256:" + self.tree.base_digest
        if path is None:
            return Expectations(base, (LayerShape("(unknown)", 1, 1),), self.policy.max_rank)
        adapter = self.bench.adapter(view.pins[path].link)
        layers = tuple(LayerShape(m, f.out_features, f.in_features) for m, f in adapter.factors.items())
        return Expectations(base, layers, self.policy.max_rank)

    def verify(self, package: Package) -> VerifiedUpdate:
        """Only the verification (keys ... shapes) against the registry; changes nothing."""
        view = self._view()
        path = self._locate(view, package)
        return verify_update(
            self._trust_for(view, path), package.envelope, package.files, self.clock(), self._expectations(view, path)
        )

    def check_envelope(self, envelope: Envelope) -> UpdateManifest:
        """The checks a streamed upload runs on its first chunk (keys, threshold, manifest, expiry,
        version: no payload bytes needed); the manifest whose file lengths bound the rest of the stream."""
        view = self._view()
        path = self._locate(view, Package(envelope, {}))
        manifest, _, _ = verify_envelope(self._trust_for(view, path), envelope, self.clock())
        return manifest

    # -- submit --------------------------------------------------------------------------------
    def submit(self, package: Package) -> UpdateStatus:
        """Verify, screen and gate a package, then store and serve it (see the module docstring)."""
        # Refuse what does not verify before waiting behind a round in progress (read-only and cheap);
        # verified again under the lock, where the keys and versions it checks cannot change.
        self.verify(package)
        with self._locked():
            view = self._view()
            path = self._locate(view, package)
            verified = verify_update(
                self._trust_for(view, path),
                package.envelope,
                package.files,
                self.clock(),
                self._expectations(view, path),
            )
            if path is None:  # a payload that verifies names its node, so _locate found it
                raise ManifestError("the update names no node of this tree", field="node")
            m = verified.manifest
            new = _read_adapter(package.files)
            current = view.pins[path].link
            delta = increment(self.bench.adapter(current), new)
            screen = self._screen(view, path, delta, internal=False)
            screen.raise_if_rejected()
            update_id = new_id()
            parent = view.parent(path)
            figures = {
                "from": current.to_dict(),
                "signers": list(verified.signers),
                "received": self.clock(),
                **screen_figures(screen),
            }
            build = None
            if parent:
                build = build_candidate(
                    self.bench,
                    self.policy,
                    view,
                    parent,
                    [(update_id, scale_delta(delta, screen.clip_factor), 1.0)],
                    override=(path, new, m.digest),
                    own_check=(path, current),
                    sources=(path,),
                )
                report = build.report
            else:  # a first-level node: no parent absorbs it, but it must not hurt itself or general text
                report = own_report(self.bench, view, path, new, m.digest)
            figures["gate"] = report.to_dict()
            report.raise_if_failed()
            # Accepted: from here on the state changes (files, then one transaction, then the snapshot).
            record = {k: v for k, v in self.bench.store.node(current).raw.items() if k != "files"}
            record |= {
                "parent_version": m.parent_version or None,
                "metrics": m.metrics_dict,
                "parent_adapter_digest": view.chain(parent)[-1].adapter if parent else None,
                "update": {"id": update_id, "manifest": m.digest, "signers": list(verified.signers)},
            }
            link = self.store.put(path, m.version, package.files, record)
            figures["to"] = link.to_dict()
            view = self._view(history_for=path)
            made_for = {path: (*view.chain(parent), link)}
            decisions = plan_pins(view, path, {path: link}, made_for, self.bench.revalidate)
            node_id, target = view.node_id(path), view.node_id(parent) if parent else self.tree.name
            changes: list[Change] = [
                AddVersion(
                    node_id,
                    m.version,
                    m.parent_version or None,
                    m.digest[7:],
                    "accepted",
                    {**m.metrics_dict, "adapter_sha256": link.adapter},
                ),
                MoveAlias(node_id, "stable", m.version),
                AddUpdate(
                    update_id,
                    "package",
                    node_id,
                    m.version,
                    m.parent_version,
                    target,
                    "pending" if parent else "stable",
                    m.digest[7:],
                    package.envelope.to_bytes().decode(),
                    figures=figures,
                    reasons=[f"screening: {screen.reason}"],
                ),
                AddEvent(
                    "accepted",
                    node_id,
                    update_id,
                    {"version": m.version, "signers": list(verified.signers), "checks": list(verified.checks)},
                ),
                AddEvent("screened", node_id, update_id, screen_figures(screen)),
                *pin_changes(view, decisions, update_id),
            ]
            changes.append(AddEvent("gated", view.node_id(parent) if parent else node_id, update_id, report.to_dict()))
            own_chain = [*self.bench.adapters(view.chain(parent)), self.bench.adapter(link)]
            changes += history_changes(
                self.bench, view, self.registry, path, m.version, own_chain, (*view.chain(parent), link), "package"
            )
            self._commit(changes, view, decisions)
            self._admission = build if build is not None else None
            if parent:
                self._maybe_aggregate(parent)
            return self.status(update_id)

    def _screen(self, view: TreeView, path: str, delta: Mapping[str, LoraFactors], internal: bool) -> ScreenResult:
        reference = self.bench.reference(view.pins[path].chain)
        ref_norm = delta_norm(reference)
        policy = self.policy.screen
        parent = view.parent(path)
        history = self._accepted_norms(view.node_id(parent)) if parent else ()
        if len(history) < policy.min_history and ref_norm > 0:
            # Too few accepted increments for a median: the parent's own reference sets the scale.
            policy = replace(
                policy,
                min_norm=max(policy.min_norm, policy.min_relative * ref_norm),
                max_norm=policy.max_relative * ref_norm,
            )
        if internal:  # an approved candidate's own increment: its direction was vouched for by approvers
            policy = replace(policy, min_cosine=-1.0)
        result = screen_update(delta, accepted_norms=history, reference=reference, policy=policy)
        scale = f"{policy.max_relative:g} x the parent's reference norm {ref_norm:.3g}"
        return replace(result, reason=result.reason.replace("(max_norm)", f"({scale})"))

    def _accepted_norms(self, target_id: str) -> tuple[float, ...]:
        entries = list_updates(self.registry, target=target_id, states=("aggregated", "absorbed"))
        return tuple(float(e.figures["merged_norm"]) for e in entries if "merged_norm" in e.figures)

    # -- aggregation ---------------------------------------------------------------------------
    def tick(self) -> list[str]:
        """Aggregate every parent whose time window has passed; returns the candidates made."""
        made = []
        with self._locked():
            for node in self.tree.nodes:
                candidate = self._maybe_aggregate(str(node.path))
                if candidate:
                    made.append(candidate)
        return made

    def _maybe_aggregate(self, parent: str) -> str | None:
        if not parent:
            return None
        view = self._view()
        parent_id = view.node_id(parent)
        if list_updates(self.registry, node=parent_id, kind="candidate", states=("awaiting-approval",)):
            return None  # one candidate at a time: new increments wait for it to be decided
        pending = list_updates(self.registry, target=parent_id, states=("pending",))
        if not pending:
            return None
        # The coordinator's clock (injectable), not the database's: windows are measured in one time base.
        oldest = min(float(p.figures.get("received", p.created_at.timestamp())) for p in pending)
        window = self.policy.window_s
        if len(pending) < self.policy.min_updates and not (window and self.clock() - oldest >= window):
            return None
        ids = tuple(p.update_id for p in pending)
        build = self._admission
        if build is None or (build.parent, build.parent_link, build.update_ids) != (
            parent,
            view.pins[parent].link,
            ids,
        ):
            increments = []
            for p in pending:
                before, after = ChainLink.from_dict(p.figures["from"]), ChainLink.from_dict(p.figures["to"])
                delta = increment(self.bench.adapter(before), self.bench.adapter(after))
                increments.append((p.update_id, scale_delta(delta, float(p.figures.get("clip", 1.0))), 1.0))
            sources = tuple(view.path_of(p.node_id) for p in pending)
            build = build_candidate(self.bench, self.policy, view, parent, increments, sources=sources)
        self._admission = None
        if not build.report.passed:
            summary = "gate: " + "; ".join(c.describe() for c in build.report.failures)
            changes: list[Change] = [SetUpdate(u, state="rejected", reasons=[summary]) for u in ids]
            changes.append(AddEvent("gate-rejected", parent_id, None, build.report.to_dict() | {"updates": list(ids)}))
            apply_changes(self.registry, changes)
            return None
        now = datetime.fromtimestamp(int(self.clock()), tz=UTC)
        cand_id, changes = store_candidate(self.store, self.policy, view, build, pending, now)
        chain = view.chain(parent)
        changes += history_changes(
            self.bench,
            view,
            self.registry,
            parent,
            view.latest(parent) + 1,
            [*self.bench.adapters(chain[:-1]), build.adapter],
            (*chain[:-1], ("candidate", tuple(chain), ids)),  # the gate's cache key: its figures are reused
            "candidate",
        )
        apply_changes(self.registry, changes)
        return cand_id

    # -- approval ------------------------------------------------------------------------------
    def approve(self, update_id: str, keyid: str, signature: bytes) -> UpdateStatus:
        """Add one approval (a signature over the candidate envelope's PAE); at k-of-n it becomes stable."""
        with self._locked():
            update_id = self.resolve(update_id)
            entry = get_update(self.registry, update_id)
            if entry.kind != "candidate" or entry.state != "awaiting-approval":
                raise NotAwaitingApproval(
                    f"update {update_id} is a {entry.kind} in state {entry.state}: "
                    "only candidates awaiting approval can be approved"
                )
            envelope = Envelope.from_bytes(entry.envelope.encode())
            manifest = parse_manifest(envelope.payload)
            now = datetime.fromtimestamp(int(self.clock()), tz=UTC)
            if now >= manifest.expires:
                raise ExpiredError(
                    f"candidate {update_id} expired at {manifest.expires.isoformat()}; "
                    "a new aggregation round is needed"
                )
            trust = load_trust(self.registry)
            key = trust.key(keyid)
            if key is None:
                raise UnknownKeyError(f"approval key {keyid[:16]}... is not registered", keyid=keyid)
            if not key.active:
                raise RevokedKeyError(f"approval key {keyid[:16]}... was revoked", keyid=keyid)
            required = self.policy.required_approvals
            node = str(manifest.node)
            if key.role not in required or key.node not in (None, node):
                raise ApprovalRejected(
                    f"key {keyid[:16]}... is a {key.role.value} key for {key.node or 'every node'}; approving {node} "
                    f"needs {', '.join(r.value for r in required)} keys acting for it"
                )
            if not key.public.verify(signature, envelope.pae()):
                raise ApprovalRejected(
                    "the approval signature does not verify over this candidate's manifest "
                    "(sign the DSSE PAE of the envelope GetStatus returns)"
                )
            approvals = [a for a in entry.approvals if a["keyid"] != keyid and _active(trust, a["keyid"])]
            approvals.append({"keyid": keyid, "sig": _b64(signature)})
            sigs = [Signature(a["keyid"], _unb64(a["sig"])) for a in approvals]
            try:
                check_approvals(trust, envelope, sigs, required, node)
            except ThresholdError as exc:
                apply_changes(
                    self.registry,
                    [
                        SetUpdate(update_id, approvals=approvals),
                        AddEvent(
                            "approval", node, update_id, {"keyid": keyid, "role": key.role.value, "missing": str(exc)}
                        ),
                    ],
                )
                return self.status(update_id)
            self._promote(entry, manifest, envelope, approvals)
            return self.status(update_id)

    def _promote(
        self, entry: UpdateEntry, manifest: UpdateManifest, envelope: Envelope, approvals: Sequence[Mapping[str, str]]
    ) -> None:
        view = self._view(history_for=str(manifest.node.path))
        path, parent = str(manifest.node.path), view.parent(str(manifest.node.path))
        link, before = ChainLink.from_dict(entry.figures["to"]), ChainLink.from_dict(entry.figures["from"])
        over = tuple(ChainLink.from_dict(x) for x in entry.figures["over"])
        made_for = {path: (*view.chain(parent), link)} if view.chain(parent) == over else {}
        decisions = plan_pins(view, path, {path: link}, made_for, self.bench.revalidate)
        node_id = view.node_id(path)
        changes: list[Change] = [
            SetStatus(node_id, manifest.version, "accepted"),
            MoveAlias(node_id, "stable", manifest.version),
            SetUpdate(
                entry.update_id,
                state="stable",
                approvals=approvals,
                reasons=[f"approved by {', '.join(a['keyid'][:12] for a in approvals)}"],
            ),
            AddEvent(
                "stable",
                node_id,
                entry.update_id,
                {"version": manifest.version, "approvals": [a["keyid"] for a in approvals]},
            ),
            *pin_changes(view, decisions, entry.update_id),
        ]
        for p in list_updates(self.registry, target=node_id, states=("aggregated",)):
            if p.round_id == entry.update_id:
                changes.append(SetUpdate(p.update_id, state="absorbed"))
        if parent:  # the upward step: this version's own increment is offered to the next level
            delta = increment(self.bench.adapter(before), self.bench.adapter(link))
            screen = self._screen(view, path, delta, internal=True)
            contribution = new_id()
            signed = Envelope(
                envelope.payload_type,
                envelope.payload,
                tuple(Signature(a["keyid"], _unb64(a["sig"])) for a in approvals),
            )
            changes += [
                AddUpdate(
                    contribution,
                    "contribution",
                    node_id,
                    manifest.version,
                    manifest.parent_version,
                    view.node_id(parent),
                    "pending" if screen.accepted else "rejected",
                    manifest.digest[7:],
                    signed.to_bytes().decode(),
                    figures={
                        "from": before.to_dict(),
                        "to": link.to_dict(),
                        "received": self.clock(),
                        **screen_figures(screen),
                    },
                    reasons=[f"screening: {screen.reason}"],
                ),
                AddEvent(
                    "contributed" if screen.accepted else "screen-rejected",
                    view.node_id(parent),
                    contribution,
                    screen_figures(screen),
                ),
            ]
        self._commit(changes, view, decisions)
        if self.policy.rebase.enabled and view.children(path):
            self._run_later(lambda: self._rebase_children(path, before), f"rebasing the children of {path}")
        if parent:
            if self._background is None:
                self._maybe_aggregate(parent)
            else:
                self._background(lambda: self._aggregate_later(parent))

    def _aggregate_later(self, parent: str) -> None:
        try:
            with self._locked():
                self._maybe_aggregate(parent)
        except Exception:  # the contribution stays pending: the next tick or submission tries again
            log.exception("aggregation round for %s failed", parent)

    # -- rebasing ------------------------------------------------------------------------------
    def _run_later(self, job: Callable[[], None], what: str) -> None:
        def run() -> None:
            try:
                job()
            except Exception:  # the children keep their pins; an operator sees the log and the events
                log.exception("%s failed", what)

        if self._background is None:
            run()
        else:
            self._background(run)

    def _rebase_children(self, parent: str, before: ChainLink) -> None:
        """Rebase every child of ``parent`` (whose stable link was ``before``), then their children
        over the rebased versions, a level at a time: a level's re-fits are handed to the refitter
        at once (a Ray cluster runs them in parallel) outside the lock, then each is gated, signed
        and committed under it (see cluster.updates.rebase)."""
        key = load_rebase_key(str(self.policy.rebase.key))
        refitter = self.refitter or LocalRefitter(self.bench)
        level = [(child, before) for child in self._view().children(parent)]
        while level:
            plans = []
            with self._locked():
                view = self._view()
                for child, old in level:
                    own = view.pins[child].link
                    over = view.chain(view.parent(child))
                    if over[-1] == old or self.store.node(own).raw.get("parent_adapter_digest") == over[-1].adapter:
                        continue  # the parent moved back, or the child was already made over its new version
                    plans.append(plan_rebase(self.bench, self.policy, view, child, old))
            fits = refitter.fit([p.request for p in plans]) if plans else []
            level = []
            for plan, (fitted, fit) in zip(plans, fits, strict=True):
                with self._locked():
                    view = self._view(history_for=plan.child)
                    moved = view.pins[plan.child].link != plan.own_link
                    if moved or tuple(view.chain(view.parent(plan.child))) != plan.new_parent:
                        log.info("rebase of %s dropped: its chain moved while it was re-fit", plan.child)
                        continue
                    now = datetime.fromtimestamp(int(self.clock()), tz=UTC)
                    done = rebase_child(
                        self.bench, self.store, self.registry, self.policy, view, plan, fitted, fit, key, now
                    )
                    self._commit(done.changes, view, done.decisions)
                if done.link is not None:
                    level += [(grandchild, plan.own_link) for grandchild in view.children(plan.child)]

    # -- reading -------------------------------------------------------------------------------
    def resolve(self, update_id: str) -> str:
        """The full id of ``update_id`` or of the one update of this tree it is a prefix of (>= 8 characters)."""
        if len(update_id) >= 32 or len(update_id) < 8:
            return update_id
        found = [
            u.update_id for u in list_updates(self.registry, tree=self.tree.name) if u.update_id.startswith(update_id)
        ]
        return found[0] if len(found) == 1 else update_id

    def status(self, update_id: str) -> UpdateStatus:
        needed = sum(self.policy.approvals.values())
        return UpdateStatus.from_entry(get_update(self.registry, self.resolve(update_id)), needed)

    def updates(self, node: str | None = None, states: Sequence[str] | None = None) -> list[UpdateStatus]:
        needed = sum(self.policy.approvals.values())
        entries = list_updates(self.registry, node=node, states=states, tree=self.tree.name)
        return [UpdateStatus.from_entry(e, needed) for e in entries]


# -- helpers -------------------------------------------------------------------------------------
def _read_adapter(files: Mapping[str, bytes]) -> AdapterWeights:
    with tempfile.TemporaryDirectory(prefix="treelm-update-") as scratch:
        for name, data in files.items():
            target = Path(scratch) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            return read_adapter(scratch)
        except AdapterError as exc:
            raise ShapeMismatchError(f"the payload is not a usable LoRA adapter: {exc}") from None


def _active(trust: TrustState, keyid: str) -> bool:
    key = trust.key(keyid)
    return key is not None and key.active


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)
