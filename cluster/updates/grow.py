"""Growing a tree while it serves: add a node a fine-tuning job made, retire a node.

A mixin of :class:`cluster.updates.coordinator.Coordinator` (its lock, registry view, snapshot
switch and workbench); kept apart so each module stays small.

``add_node`` registers a trained, gated node (cluster/jobs/train.py wrote its adapter into a
staged dir) exactly like a built one, under the coordinator's lock:

1. refuse a taken id (a node of the tree dir, a folder on disk, or a registry node, retired ones
   too) and a signing key the registry does not trust to act for the node;
2. files: the node's folder ``TREE/nodes/<path>/`` (PEFT adapter + node.json, written into a temp
   dir and renamed, as the builder commits a node), its texts in ``TREE/node-texts/<path>/`` (its
   held-out text is its probe for later updates, its training text what its own children replay),
   then tree.json's node list (temp file + ``os.replace``), then version 1 in ``TREE/versions/``;
3. the registry: ``import_tree`` (idempotent: the node, version 1 and ``stable``; a private node's
   owner tenant), then one transaction with its pin over the parent's chain it was trained over,
   an update record of kind ``create`` carrying version 1's manifest signed by the policy's
   ``customize.key``, and an event;
4. the snapshot switch: engines serve it from their next request (``on_snapshot`` listeners).

A failure before the registry transaction undoes the files (and retires what ``import_tree``
registered, so the id stays taken and nothing is listed). A crash between the transaction and the
snapshot switch is reconciled by ``Coordinator.open`` like any other apply.

``retire_node`` takes a node (with ``force``, its whole subtree) out of tree.json and the snapshot
and marks it retired in the registry: new requests get NOT_FOUND, requests already admitted keep
the chain they were admitted with and finish. Its folders, versions and records stay, and its id
is never given to another node.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cluster.errors import JobError, UpdateStateError
from cluster.tree_import import import_tree
from cluster.updates.keys import load_rebase_key, load_trust
from cluster.updates.pins import TreeView
from cluster.updates.policy import UpdatePolicy
from cluster.updates.rounds import new_id
from cluster.updates.workbench import Workbench
from hierarchy.ids import Level, NodeId, NodePath
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import FileEntry, LayerSpec, UpdateManifest, sign_manifest
from hierarchy.updates.trust import Role
from nodes.build.files import commit_node, write_json_atomic
from nodes.errors import NodesError
from nodes.store.adapters import read_adapter
from nodes.store.digest import sha256_bytes
from nodes.store.tree import TREE_RECORD, BuiltTree, node_dir
from nodes.store.versions import VERSIONS_DIR, ChainLink, ServedNode, VersionStore
from registry.db import Registry
from registry.errors import Conflict, NodeExists, NodeNotFound, RegistryError
from registry.trees import get_node
from registry.updates import AddEvent, AddPin, AddUpdate, Change, RetireNode, apply_changes

__all__ = ["NODE_TEXTS_DIR", "GrowthCore", "NewNode", "NodeAdded", "TreeGrowth", "node_texts_dir"]

NODE_TEXTS_DIR = "node-texts"  # under the tree dir: the texts of nodes fine-tuning jobs made
JOB_BUILDER = "treelm-job/1"
_LEVELS = {1: Level.LANGUAGE, 2: Level.DOMAIN, 3: Level.SUBDOMAIN}


def node_texts_dir(tree_dir: str | Path, path: str) -> Path:
    return Path(tree_dir) / NODE_TEXTS_DIR / path


@dataclass(frozen=True)
class NewNode:
    """A trained, gated node to register (the runner makes it from the job and its result)."""

    node: str  # the new node's id: its parent's id + "/" + its name
    staged_dir: Path  # adapter/ (PEFT files), train.txt, eval.txt (cluster/jobs/train.py's out_dir)
    over: Sequence[Mapping[str, Any]]  # the parent's served chain it was trained over (ChainLink dicts)
    visibility: str = "private"
    owner: str | None = None  # the tenant that owns it (a private node must have one)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    lora: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)  # the uploaded files' digests
    description: str | None = None
    job_id: str | None = None


@dataclass(frozen=True)
class NodeAdded:
    """What ``add_node`` registered and serves."""

    node: str
    version: int
    link: Mapping[str, Any]  # its version's ChainLink (path, version, adapter sha256)
    chain: tuple[Mapping[str, Any], ...]  # the chain it is served over, itself last
    pin_status: str  # pinned | held (the parent moved while it trained: it stays over that version)
    update_id: str
    manifest_digest: str  # sha256:... of its signed version-1 manifest
    signer: str  # the key id that signed it


class GrowthCore(Protocol):
    """What growing needs of the coordinator that mixes it in (no import of it)."""

    store: VersionStore
    tree: BuiltTree
    bench: Workbench
    registry: Registry
    policy: UpdatePolicy

    def _locked(self) -> AbstractContextManager[None]: ...

    def _view(self, history_for: str | None = None) -> TreeView: ...

    def _switch(self, pins: Mapping[str, ServedNode]) -> None: ...


def _reopen(core: GrowthCore) -> None:
    """Read tree.json again (the node list changed); the workbench keeps its loaded base."""
    core.store = VersionStore(core.store.root)
    core.tree = core.store.tree
    core.bench.store = core.store


def _set_nodes(root: Path, add: str | None = None, remove: Sequence[str] = ()) -> None:
    file = root / TREE_RECORD
    record = json.loads(file.read_text())
    nodes = [p for p in record.get("nodes", []) if p not in set(remove)]
    if add is not None and add not in nodes:
        nodes.append(add)  # after its parent, which is listed already: parents stay first
    record["nodes"] = nodes
    write_json_atomic(file, record)


def _private_text(path: Path, text: str) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a tenant's data: owner only
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return {"file": str(path), "sha256": sha256_bytes(data), "bytes": len(data)}


class TreeGrowth:
    """``add_node`` and ``retire_node`` (see the module docstring), mixed into the Coordinator."""

    def growth_key(self: GrowthCore, node: str | None = None) -> SigningKey:
        """The policy's ``customize.key``, checked to be a node key the registry trusts (for ``node``,
        or for every node); JobError("registration") naming the fix otherwise."""
        path = self.policy.customize.key
        if not path:
            raise JobError("registration", "the update policy has no customize.key: no key signs new nodes")
        key = load_rebase_key(path)
        trust = load_trust(self.registry)
        known = trust.key(key.keyid)
        acting = {k.keyid for k in trust.keys_acting_for(Role.NODE, node)} if node else set()
        if known is None or not known.active or known.role is not Role.NODE or (node and key.keyid not in acting):
            raise JobError(
                "registration",
                f"customize.key {key.keyid[:16]}... is not an active node key the registry trusts for "
                f"{node or 'every node'}: register it with `treelm keys register KEY_DIR --role node --sign-with ROOT_KEY` (no --node)",
            )
        return key

    def add_node(self: GrowthCore, new: NewNode, key: SigningKey | None = None) -> NodeAdded:
        """Register, sign and serve ``new`` (see the module docstring)."""
        with self._locked():
            node_id = NodeId.parse(new.node)
            if node_id.tree != self.tree.name or node_id.is_base:
                raise UpdateStateError(f"{new.node} is not a node of tree {self.tree.name!r}")
            path, parent_path = str(node_id.path), str(node_id.path.parent)
            level = _LEVELS.get(len(path.split("/")))
            if level is None:
                raise UpdateStateError(f"{new.node} is deeper than a sub-domain node")
            _refuse_taken(self, node_id)
            view = self._view()
            if parent_path and parent_path not in view.pins:
                raise NodeNotFound(f"the parent {node_id.parent} is not served here (retired, or never built)")
            over = tuple(ChainLink.from_dict(x) for x in new.over)
            if [x.path for x in over] != [str(p) for p in NodePath(parent_path).lineage()]:
                raise UpdateStateError(f"{new.node} was trained over {[x.path for x in over]}, not its parent's chain")
            key = key or TreeGrowth.growth_key(self, str(node_id))
            try:
                adapter = read_adapter(Path(new.staged_dir) / "adapter")
                texts = {
                    kind: (Path(new.staged_dir) / f"{kind}.txt").read_text(encoding="utf-8")
                    for kind in ("train", "eval")
                }
            except (NodesError, OSError, UnicodeDecodeError) as exc:
                raise JobError("registration", f"the staged node {new.staged_dir} is unusable: {exc}") from None
            current = view.chain(parent_path)
            status, reason = "pinned", ""
            if over != current:
                status = "held"
                reason = (
                    f"trained over {parent_path} v{over[-1].version}; the parent serves v{current[-1].version} now "
                    "(a later update of this node re-fits it)"
                )
            record = _record(self, node_id, level, new, over, key)
            imported = False
            try:
                record["data"] = {
                    kind: _private_text(node_texts_dir(self.store.root, path) / f"{kind}.txt", text)
                    for kind, text in texts.items()
                } | {"job": dict(new.data)}
                record = commit_node(self.store.root, NodePath(path), adapter, record, str(self.tree.base_dir))
                _set_nodes(self.store.root, add=path)
                _reopen(self)
                folder = node_dir(self.store.root, path)
                files = {name: (folder / name).read_bytes() for name in record["files"]}
                link = self.store.put(path, 1, files, {k: v for k, v in record.items() if k != "files"})
                import_tree(self.registry, self.store.root)
                imported = True
                manifest = _manifest(self, node_id, over, files, adapter, texts["train"], new.metrics)
                envelope = sign_manifest(manifest, [key])
                update_id = new_id()
                served = ServedNode(path, (*over, link), status, reason)
                parent_id = str(node_id.parent)
                changes: list[Change] = [
                    AddPin(str(node_id), 1, [x.to_dict() for x in served.chain], status, reason),
                    AddUpdate(
                        update_id,
                        "create",
                        str(node_id),
                        1,
                        manifest.parent_version,
                        parent_id,
                        "stable",
                        manifest.digest[7:],
                        envelope.to_bytes().decode(),
                        figures={
                            "job": new.job_id,
                            "to": link.to_dict(),
                            "over": [x.to_dict() for x in over],
                            "signer": key.keyid,
                            "metrics": dict(new.metrics),
                        },
                        reasons=[f"created by fine-tuning job {new.job_id}" if new.job_id else "created"],
                    ),
                    AddEvent(
                        "created",
                        str(node_id),
                        update_id,
                        {"job": new.job_id, "version": 1, "visibility": new.visibility, "pin": status},
                    ),
                ]
                apply_changes(self.registry, changes)
            except BaseException:
                _undo_add(self, path, str(node_id), imported)
                raise
            self._switch(dict(view.pins) | {path: served})
            return NodeAdded(
                str(node_id),
                1,
                link.to_dict(),
                tuple(x.to_dict() for x in served.chain),
                status,
                update_id,
                manifest.digest,
                key.keyid,
            )

    def retire_node(self: GrowthCore, node: str, force: bool = False) -> tuple[str, ...]:
        """Stop serving ``node`` (with ``force``, its subtree); the retired node ids, parents first."""
        with self._locked():
            node_id = NodeId.parse(node)
            if node_id.tree != self.tree.name or not self.tree.has(node_id):
                raise NodeNotFound(f"unknown node {node!r}: tree {self.tree.name!r} serves no such node")
            if node_id.is_base:
                raise UpdateStateError("the base cannot be retired: it is the tree")
            path = str(node_id.path)
            subtree = [
                str(n.path) for n in self.tree.nodes if str(n.path) == path or str(n.path).startswith(path + "/")
            ]
            if len(subtree) > 1 and not force:
                below = ", ".join(f"{self.tree.name}/{p}" for p in subtree[1:])
                raise Conflict(f"{node_id} has nodes below it ({below}): retire them first, or retire the subtree")
            view = self._view()
            ids = tuple(view.node_id(p) for p in subtree)
            _set_nodes(self.store.root, remove=subtree)  # files first: a crash here serves it no more
            _reopen(self)
            changes: list[Change] = [RetireNode(n) for n in ids]
            changes.append(AddEvent("retired", str(node_id), None, {"nodes": list(ids), "force": force}))
            apply_changes(self.registry, changes)
            self._switch({p: s for p, s in view.pins.items() if p not in subtree})
            return ids


def _refuse_taken(core: GrowthCore, node_id: NodeId) -> None:
    path = str(node_id.path)
    if core.tree.has(node_id) or node_dir(core.store.root, path).exists():
        raise NodeExists(f"node {node_id} exists already (or did: a retired node's id stays taken)")
    try:
        get_node(core.registry, str(node_id), include_private=True)
    except NodeNotFound:
        return
    raise NodeExists(f"node {node_id} exists already in the registry (a retired node's id stays taken)")


def _record(
    core: GrowthCore, node_id: NodeId, level: Level, new: NewNode, over: tuple[ChainLink, ...], key: SigningKey
) -> dict[str, Any]:
    """node.json of the new node (files are added by commit_node)."""
    parent = None if node_id.parent.is_base else core.tree.node(node_id.parent)
    name = node_id.path.name
    labels = {
        "language": name if level is Level.LANGUAGE else (parent.language if parent else None),
        "domain": name if level is Level.DOMAIN else (parent.domain if parent else None),
        "subdomain": name if level is Level.SUBDOMAIN else None,
    }
    customize = core.policy.customize
    return labels | {
        "id": str(node_id),
        "parent": str(node_id.parent),
        "level": level.value,
        "tags": [],
        "description": new.description,
        "visibility": new.visibility,
        "owner": new.owner,
        "version": 1,
        "parent_version": over[-1].version if over else None,
        "parent_adapter_digest": over[-1].adapter if over else None,
        "base_digest": core.tree.base_digest,
        "lora": dict(new.lora),
        "training": dict(new.training),
        "guard": {"replay": customize.replay, "kl_weight": customize.kl_weight},
        "metrics": dict(new.metrics),
        "builder": JOB_BUILDER,
        "job": new.job_id,
        "signer": key.keyid,
    }


def _manifest(
    core: GrowthCore,
    node_id: NodeId,
    over: tuple[ChainLink, ...],
    files: Mapping[str, bytes],
    adapter: Any,
    train_text: str,
    metrics: Mapping[str, Any],
) -> UpdateManifest:
    now = datetime.now(UTC).replace(microsecond=0)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return UpdateManifest(
        node=node_id,
        parent=node_id.parent,
        parent_version=over[-1].version if over else 0,
        base_digest="sha256:" + core.tree.base_digest,
        version=1,
        files=tuple(FileEntry.of(name, data) for name, data in sorted(files.items())),
        layers=tuple(LayerSpec(m, f.out_features, f.in_features, f.rank) for m, f in adapter.factors.items()),
        training_data_digest="sha256:" + sha256_bytes(train_text.encode()),
        metrics=tuple(sorted(numbers.items())),
        created=now,
        expires=now + timedelta(seconds=core.policy.approval_ttl_s),
    )


def _undo_add(core: GrowthCore, path: str, node: str, imported: bool) -> None:
    """Take back what a failed ``add_node`` wrote (best effort: the caller's error is what matters)."""
    root = core.store.root
    try:
        _set_nodes(root, remove=[path])
    except (OSError, ValueError):
        pass
    shutil.rmtree(node_dir(root, path), ignore_errors=True)
    shutil.rmtree(node_texts_dir(root, path), ignore_errors=True)
    shutil.rmtree(root / VERSIONS_DIR / path, ignore_errors=True)
    try:
        _reopen(core)
    except NodesError:
        pass
    if imported:  # registered but never served: retired, so nothing lists it and its id stays taken
        try:
            apply_changes(core.registry, [RetireNode(node), AddEvent("create-failed", node, None, {})])
        except RegistryError:
            pass
