"""Which weights a variant is made of: a node version and the exact chain of stored versions under it.

A node's version is not enough to name its weights: after a parent's update a node may be
served (re-pinned) over a newer parent version than the one it was trained over. So a
variant is built from a *chain* of :class:`~nodes.store.versions.ChainLink` (path, version,
adapter sha256), top ancestor first, and resolved here, in this order:

1. an explicit chain (the cluster passes the registry's pin for the version asked for);
2. the version the snapshot serves now (no ``version``, or the served one);
3. another stored version: its chain from node.json (``parent_version`` and
   ``parent_adapter_digest``, link by link up to the base);
4. a built tree without a snapshot: the built nodes.

Every file of every chain element is re-hashed against its node.json before use, and each
element must be stored over the tree's base.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hierarchy.ids import NodeId, NodePath
from nodes.errors import ExportError, IntegrityError
from nodes.store.tree import NODE_RECORD, BuiltNode, BuiltTree, verify_node_files
from nodes.store.versions import VERSIONS_DIR, ChainLink, VersionStore, links_of

__all__ = ["VariantSource", "parse_node", "resolve_source"]


@dataclass(frozen=True)
class VariantSource:
    """A node version with its resolved chain: what one variant is made of."""

    tree: BuiltTree
    node_id: NodeId
    chain: tuple[BuiltNode, ...]  # top ancestor first, the node itself last; empty for the base

    @property
    def links(self) -> tuple[ChainLink, ...]:
        return links_of(self.chain)

    @property
    def version(self) -> int:
        """The node's version (the base answers as version 0, as the engine does)."""
        return self.chain[-1].version if self.chain else 0

    @property
    def is_base(self) -> bool:
        return not self.chain

    @property
    def base_source(self) -> VariantSource:
        return VariantSource(self.tree, NodeId(self.tree.name, NodePath("")), ())

    def describe(self) -> str:
        return f"{self.node_id} v{self.version}" if self.chain else f"{self.node_id} (base)"


def parse_node(tree: BuiltTree, node: str) -> NodeId:
    """``<tree>/<path>``, a bare path, or the tree's name (its base); ExportError listing the nodes otherwise."""
    text = str(node).strip().strip("/")
    if text == tree.name:
        return NodeId(tree.name, NodePath(""))
    candidates = []
    for make in (lambda: NodeId.parse(text), lambda: NodeId(tree.name, NodePath(text))):
        try:
            candidates.append(make())
        except ValueError:
            pass
    for key in candidates:
        if key.tree == tree.name and any(n.node_id == key for n in tree.nodes):
            return key
    known = ", ".join(str(n.node_id) for n in tree.nodes) or "(none built)"
    raise ExportError(f"unknown node {node!r} in tree {tree.name!r} at {tree.root}; nodes: {known}")


def _check_links(source: VariantSource) -> VariantSource:
    """Re-hash every chain element and check it sits on the tree's base."""
    for node in source.chain:
        verify_node_files(node)
        if node.base_digest and node.base_digest != source.tree.base_digest:
            raise IntegrityError(
                f"{node.node_id} v{node.version} was trained over base {node.base_digest[:12]}..., "
                f"the tree's base is {source.tree.base_digest[:12]}..."
            )
    return source


def _stored(store: VersionStore, path: str, version: int) -> list[ChainLink]:
    """Every stored version ``version`` of ``path`` (normally one; two if updates raced)."""
    folder = store.root / VERSIONS_DIR / path
    found = []
    for entry in sorted(folder.glob(f"@v{version}-*")) if folder.is_dir() else ():
        try:
            record = json.loads((entry / NODE_RECORD).read_text())
        except (OSError, ValueError):
            continue  # a leftover of a killed writer: never named by any snapshot
        found.append(ChainLink(path, version, BuiltNode.from_record(entry, record).adapter_digest))
    return found


def _walk_up(store: VersionStore, link: ChainLink) -> tuple[ChainLink, ...]:
    """The chain a stored version records it was trained over (node.json), down to ``link``."""
    links = [link]
    node = store.node(link)
    while str(node.path.parent):
        parent_path = str(node.path.parent)
        digest, version = node.parent_adapter_digest, node.parent_version
        if not digest or version is None:
            raise ExportError(
                f"{node.node_id} v{node.version} does not record the parent version it was trained over; "
                "name the chain explicitly"
            )
        parent = ChainLink(parent_path, int(version), str(digest))
        if not store.has(parent):
            raise IntegrityError(
                f"{node.node_id} v{node.version} was trained over {parent_path} v{version}, not stored"
            )
        links.insert(0, parent)
        node = store.node(parent)
    return tuple(links)


def resolve_source(
    tree_dir: str | Path, node: str, *, version: int | None = None, chain: Sequence[ChainLink] | None = None
) -> VariantSource:
    """The chain a variant of ``node`` (at ``version``, default: as served now) is made of; see the module doc."""
    store = VersionStore(tree_dir)
    tree = store.tree
    key = parse_node(tree, node)
    path = str(key.path)
    if key.is_base:
        if version not in (None, 0) or chain:
            raise ExportError(f"{key} is the base: it has no versions (got version {version})")
        return VariantSource(tree, key, ())
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ExportError(f"version must be a positive integer, got {version!r}")
    lineage = [str(p) for p in key.path.lineage()]
    if chain:
        links = tuple(chain)
        if [x.path for x in links] != lineage:
            raise ExportError(f"the chain for {key} must name {lineage}, got {[x.path for x in links]}")
        if version is not None and links[-1].version != version:
            raise ExportError(f"the chain ends at {path} v{links[-1].version}, not v{version}")
        return _check_links(VariantSource(tree, key, tuple(_load(store, tree, x) for x in links)))
    snapshot = store.read_snapshot()
    if snapshot is None or path not in snapshot.nodes:
        built = tree.chain(key)
        if version is not None and built[-1].version != version:
            raise ExportError(f"{key} is built at version {built[-1].version}; version {version} is not stored")
        _check_built(built)
        return _check_links(VariantSource(tree, key, built))
    served = snapshot.nodes[path]
    if version is None or version == served.version:
        return _check_links(VariantSource(tree, key, tuple(store.node(x) for x in served.chain)))
    matches = _stored(store, path, version)
    if not matches:
        have = sorted({int(p.name[2:].split("-")[0]) for p in (store.root / VERSIONS_DIR / path).glob("@v*-*")})
        raise ExportError(f"{key} has no stored version {version}; stored versions: {have or 'none'}")
    if len(matches) > 1:
        raise ExportError(f"{key} has {len(matches)} stored versions numbered {version}: name the chain explicitly")
    return _check_links(VariantSource(tree, key, tuple(store.node(x) for x in _walk_up(store, matches[0]))))


def _load(store: VersionStore, tree: BuiltTree, link: ChainLink) -> BuiltNode:
    if store.has(link):
        return store.node(link)
    built = next((n for n in tree.nodes if str(n.path) == link.path), None)
    if built is not None and built.version == link.version and built.adapter_digest == link.adapter:
        return built  # a built tree whose versions were never copied into the version store
    raise ExportError(f"{link.path} v{link.version} ({link.adapter[:12]}...) is not stored in {store.root}")


def _check_built(chain: tuple[BuiltNode, ...]) -> None:
    """A built chain: each node must have been trained over exactly its parent's adapter."""
    parent_digest = None
    for node in chain:
        if node.parent_adapter_digest != parent_digest:
            raise IntegrityError(
                f"node {node.node_id} was trained over a different version of {node.parent_id} "
                f"(recorded {str(node.parent_adapter_digest)[:12]}..., found {str(parent_digest)[:12]}...): "
                "rebuild the tree with `treelm tree build SPEC --out DIR`"
            )
        parent_digest = node.adapter_digest
