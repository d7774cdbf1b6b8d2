"""Versioned adapters beside a built tree, and the snapshot the engine serves.

    DIR/versions/<path>/@v<N>-<sha12>/     one immutable node version (content-addressed by the sha256
        adapter_config.json                of its adapter weights): the PEFT files and node.json
        adapter_model.safetensors
        node.json
    DIR/snapshot.json                      what is served: per node, the exact chain of versions

A node's entry in the snapshot pins its *whole chain* (every ancestor's version and its own),
so a node that failed re-validation over a new parent version keeps serving over the old one
while its siblings move on: no node is ever served over a chain it was not validated against.

Writes never leave a mix. A version is written into a hidden temp dir and renamed into place
(an orphan version dir that no snapshot names is harmless and is reused or ignored); the
snapshot is written to a temp file and switched with ``os.replace``. Readers (the engine)
therefore see the old snapshot or the new one. :func:`checkpoint` marks each step so a test
can kill a process there (see tests/cluster/test_updates_crash.py); it does nothing otherwise.

'@' cannot appear in a node path segment, so version dirs never clash with child nodes' dirs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hierarchy.ids import NodeId, NodePath
from nodes.build.files import share_permissions
from nodes.errors import IntegrityError, NodesError
from nodes.store.adapters import ADAPTER_WEIGHTS, AdapterWeights, read_adapter, write_adapter
from nodes.store.digest import sha256_bytes, sha256_file
from nodes.store.tree import NODE_RECORD, BuiltNode, BuiltTree, open_tree, verify_node_files

__all__ = [
    "SNAPSHOT_RECORD",
    "VERSIONS_DIR",
    "ChainLink",
    "ServedNode",
    "Snapshot",
    "SnapshotTree",
    "VersionStore",
    "checkpoint",
    "links_of",
    "open_served_tree",
]

SNAPSHOT_RECORD = "snapshot.json"
VERSIONS_DIR = "versions"
SNAPSHOT_FORMAT = "treelm-snapshot/1"
PIN_STATUSES = ("pinned", "held")


def checkpoint(step: str) -> None:
    """A named step of an atomic apply; does nothing (tests replace it to kill the process there)."""


@dataclass(frozen=True, order=True)
class ChainLink:
    """One element of a served chain: a node path, its version, the sha256 of its adapter weights."""

    path: str
    version: int
    adapter: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "version": self.version, "adapter": self.adapter}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> ChainLink:
        return cls(str(obj["path"]), int(obj["version"]), str(obj["adapter"]))

    @property
    def dirname(self) -> str:
        return f"@v{self.version}-{self.adapter[:12]}"


@dataclass(frozen=True)
class ServedNode:
    """How one node is served: its chain (top ancestor first, the node itself last) and why."""

    path: str
    chain: tuple[ChainLink, ...]
    status: str = "pinned"  # pinned: over its ancestors' stable versions; held: over older ones
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "chain", tuple(self.chain))
        if self.status not in PIN_STATUSES:
            raise NodesError(f"pin status {self.status!r} is not one of {', '.join(PIN_STATUSES)}")
        lineage = [str(p) for p in NodePath(self.path).lineage()]
        if [link.path for link in self.chain] != lineage:
            raise NodesError(f"the chain of {self.path} names {[x.path for x in self.chain]}, expected {lineage}")

    @property
    def version(self) -> int:
        return self.chain[-1].version

    @property
    def link(self) -> ChainLink:
        return self.chain[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"chain": [x.to_dict() for x in self.chain], "status": self.status, "reason": self.reason}

    @classmethod
    def from_dict(cls, path: str, obj: Mapping[str, Any]) -> ServedNode:
        return cls(
            path,
            tuple(ChainLink.from_dict(x) for x in obj["chain"]),
            obj.get("status", "pinned"),
            obj.get("reason", ""),
        )


@dataclass(frozen=True)
class Snapshot:
    """A consistent set of served chains; ``serial`` grows by one with every switch."""

    tree: str
    serial: int
    nodes: Mapping[str, ServedNode] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "tree": self.tree,
            "serial": self.serial,
            "nodes": {p: self.nodes[p].to_dict() for p in sorted(self.nodes)},
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Snapshot:
        if obj.get("format") != SNAPSHOT_FORMAT:
            raise NodesError(f"snapshot format {obj.get('format')!r} is not {SNAPSHOT_FORMAT!r}")
        nodes = {p: ServedNode.from_dict(p, v) for p, v in obj.get("nodes", {}).items()}
        return cls(str(obj["tree"]), int(obj["serial"]), nodes)

    def same_chains(self, other: Snapshot | None) -> bool:
        """Whether ``other`` serves exactly the same chains with the same statuses (serial aside)."""
        return other is not None and self.to_dict()["nodes"] == other.to_dict()["nodes"]

    def links(self) -> set[ChainLink]:
        return {link for served in self.nodes.values() for link in served.chain}


@dataclass(frozen=True)
class SnapshotTree(BuiltTree):
    """A BuiltTree whose nodes are stored versions and whose chains are the snapshot's pins."""

    serial: int = 0
    chains: Mapping[NodeId, tuple[BuiltNode, ...]] = field(default_factory=dict, repr=False)
    served: Mapping[str, ServedNode] = field(default_factory=dict, repr=False)

    def chain(self, node_id: NodeId | str) -> tuple[BuiltNode, ...]:
        key = node_id if isinstance(node_id, NodeId) else NodeId.parse(str(node_id))
        if key.tree != self.name:
            raise NodesError(f"node {key} is not in tree {self.name!r}")
        if key.is_base:
            return ()
        try:
            return self.chains[key]
        except KeyError:
            raise NodesError(f"tree {self.name!r} has no node {str(key)!r}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class VersionStore:
    """The versions and snapshot of one built tree directory (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.tree = open_tree(self.root)

    # -- versions --------------------------------------------------------------------------
    def version_dir(self, link: ChainLink) -> Path:
        return self.root / VERSIONS_DIR / link.path / link.dirname

    def has(self, link: ChainLink) -> bool:
        return (self.version_dir(link) / NODE_RECORD).is_file()

    def node(self, link: ChainLink) -> BuiltNode:
        """The stored version as a BuiltNode (its directory, files, metrics, cache key)."""
        directory = self.version_dir(link)
        try:
            record = json.loads((directory / NODE_RECORD).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IntegrityError(
                f"version {link.path} v{link.version} is missing or damaged in {directory}: {exc}"
            ) from exc
        node = BuiltNode.from_record(directory, record)
        return replace(node, store_key=f"{link.path}@{link.dirname[1:]}")

    def adapter(self, link: ChainLink) -> AdapterWeights:
        """The version's adapter, every file checked against its node.json first."""
        node = self.node(link)
        if node.files.get(ADAPTER_WEIGHTS, {}).get("sha256") != link.adapter:
            raise IntegrityError(f"{self.version_dir(link)} does not hold adapter {link.adapter[:12]}...")
        return read_adapter(node.directory, expected_sha256=node.sha256)

    def put(self, path: str, version: int, files: Mapping[str, bytes], record: Mapping[str, Any]) -> ChainLink:
        """Store ``files`` (the PEFT adapter files) as ``path`` version ``version``; idempotent.

        ``record`` becomes node.json (``files`` is filled in). Written to a temp dir, fsynced,
        then renamed; an existing dir for the same content is kept as it is.
        """
        if ADAPTER_WEIGHTS not in files:
            raise NodesError(f"a version needs {ADAPTER_WEIGHTS}")
        link = ChainLink(str(NodePath(path)), int(version), sha256_bytes(files[ADAPTER_WEIGHTS]))
        final = self.version_dir(link)
        if final.is_dir():
            verify_node_files(self.node(link))  # same name, so same weights: must also be intact
            return link
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            entries = {}
            for i, (name, data) in enumerate(sorted(files.items())):
                _write_synced(tmp / name, data)
                entries[name] = {"sha256": sha256_bytes(data), "length": len(data)}
                if i == 0:
                    checkpoint("version-files-partial")
            body = dict(record) | {"files": entries, "version": int(version)}
            _write_synced(tmp / NODE_RECORD, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
            share_permissions(tmp)
            _fsync_dir(tmp)
            checkpoint("version-files-written")
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        checkpoint("version-renamed")
        return link

    def put_adapter(self, path: str, version: int, adapter: AdapterWeights, record: Mapping[str, Any]) -> ChainLink:
        """Store an in-memory adapter (written in PEFT format first, in a scratch dir)."""
        with tempfile.TemporaryDirectory(prefix="treelm-adapter-") as scratch:
            write_adapter(adapter, scratch, base_model_name_or_path=str(self.tree.base_dir))
            files = {p.name: p.read_bytes() for p in Path(scratch).iterdir() if p.is_file()}
        return self.put(path, version, files, record)

    # -- snapshots -------------------------------------------------------------------------
    @property
    def snapshot_file(self) -> Path:
        return self.root / SNAPSHOT_RECORD

    def read_snapshot(self) -> Snapshot | None:
        try:
            return Snapshot.from_dict(json.loads(self.snapshot_file.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NodesError(f"{self.snapshot_file} is damaged: {exc}") from exc

    def write_snapshot(self, nodes: Mapping[str, ServedNode]) -> Snapshot:
        """Switch to a snapshot serving ``nodes`` (serial + 1); every version it names must be stored."""
        missing = sorted(f"{x.path} v{x.version}" for s in nodes.values() for x in s.chain if not self.has(x))
        if missing:
            raise IntegrityError(f"cannot serve versions that are not stored: {', '.join(missing)}")
        unknown = sorted(set(nodes) - {str(n.path) for n in self.tree.nodes})
        if unknown:
            raise NodesError(f"snapshot names nodes tree {self.tree.name!r} does not have: {', '.join(unknown)}")
        current = self.read_snapshot()
        snapshot = Snapshot(self.tree.name, (current.serial if current else 0) + 1, dict(nodes))
        data = (json.dumps(snapshot.to_dict(), indent=2, sort_keys=True) + "\n").encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{SNAPSHOT_RECORD}.tmp-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            checkpoint("snapshot-written")
            os.replace(tmp, self.snapshot_file)
            _fsync_dir(self.root)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        checkpoint("snapshot-switched")
        return snapshot

    def genesis_nodes(self) -> dict[str, ServedNode]:
        """Every built node at the version node.json records, stored as versions (idempotent)."""
        links: dict[str, ChainLink] = {}
        out: dict[str, ServedNode] = {}
        for node in self.tree.nodes:  # parents first
            verify_node_files(node)
            files = {name: (node.directory / name).read_bytes() for name in node.files}
            record = {k: v for k, v in node.raw.items() if k != "files"}
            link = self.put(str(node.path), node.version, files, record)
            links[str(node.path)] = link
            out[str(node.path)] = ServedNode(str(node.path), tuple(links[str(p)] for p in node.path.lineage()))
        return out

    def served_tree(self, snapshot: Snapshot | None = None) -> BuiltTree:
        """The tree as the snapshot serves it (the built tree itself when there is no snapshot)."""
        snapshot = snapshot or self.read_snapshot()
        if snapshot is None:
            return self.tree
        if snapshot.tree != self.tree.name:
            raise NodesError(f"{self.snapshot_file} is for tree {snapshot.tree!r}, not {self.tree.name!r}")
        cache: dict[ChainLink, BuiltNode] = {}

        def load(link: ChainLink) -> BuiltNode:
            if link not in cache:
                cache[link] = self.node(link)
            return cache[link]

        order = [str(n.path) for n in self.tree.nodes if str(n.path) in snapshot.nodes]
        chains = {NodeId(self.tree.name, NodePath(p)): tuple(load(x) for x in snapshot.nodes[p].chain) for p in order}
        nodes = tuple(chains[NodeId(self.tree.name, NodePath(p))][-1] for p in order)
        return SnapshotTree(
            root=self.tree.root,
            name=self.tree.name,
            base_dir=self.tree.base_dir,
            base_digest=self.tree.base_digest,
            base_model=self.tree.base_model,
            nodes=nodes,
            spec_digest=self.tree.spec_digest,
            raw=self.tree.raw,
            serial=snapshot.serial,
            chains=chains,
            served=dict(snapshot.nodes),
        )

    def clean_leftovers(self) -> list[Path]:
        """Remove temp dirs and files a killed writer left (never named by any snapshot)."""
        removed = []
        versions = self.root / VERSIONS_DIR
        candidates = list(versions.rglob(".tmp-*")) if versions.is_dir() else []
        candidates += list(self.root.glob(f".{SNAPSHOT_RECORD}.tmp-*"))
        for path in sorted(candidates, key=lambda p: -len(p.parts)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def verify(self, snapshot: Snapshot | None = None) -> None:
        """Re-hash every file of every version the snapshot serves; IntegrityError on a mismatch."""
        snapshot = snapshot or self.read_snapshot()
        for link in sorted(snapshot.links() if snapshot else ()):
            node = self.node(link)
            verify_node_files(node)
            if sha256_file(node.directory / ADAPTER_WEIGHTS) != link.adapter:
                raise IntegrityError(f"{node.directory} does not hold adapter {link.adapter[:12]}...")


def open_served_tree(root: str | Path) -> BuiltTree:
    """What a server should serve from ``root``: the snapshot's chains, else the built tree."""
    store = VersionStore(root)
    return store.served_tree()


def links_of(chain: Sequence[BuiltNode]) -> tuple[ChainLink, ...]:
    """The chain links of served BuiltNodes (for comparing what two snapshots serve)."""
    return tuple(ChainLink(str(n.path), n.version, n.adapter_digest) for n in chain)
