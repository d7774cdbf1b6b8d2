"""The on-disk layout of a built tree, shared by the builder, the engine and the exporters.

    DIR/tree.json                    tree name, base location + digest, spec digest, node order
    DIR/base/                        the base model dir (tiny or converted bases live here)
    DIR/nodes/<path>/                a node's adapter in PEFT format + node.json
        adapter_config.json
        adapter_model.safetensors
        node.json                    id, level, parent, digests, training settings, metrics
    DIR/versions/, DIR/snapshot.json stored node versions and the snapshot served (nodes.store.versions)

A nested node's folder sits inside its parent's folder (nodes/en/medical/...);
each node.json lists only its own files.

Fields the tree builder (nodes.build.builder) adds. tree.json: ``description``, ``builder``,
``spec_source``, and under ``base``: ``kind`` (tiny | smollm2 | gguf | hf), ``hub_id``
(public model id or null) and ``source`` (the GGUF file and its sha256). node.json:
``description``, ``guard`` (replay, kl_weight, max_forgetting), ``build_digest`` (the
training digest that decides reuse), ``builder``, ``training.precision``/``steps_run``,
``data`` = {train, eval: {file, sha256, tokens}, parent_text: [{node, train_sha256,
eval_sha256}]}, and ``metrics`` = {``eval_ppl``, ``parent_eval_ppl`` (node / parent on
the node's eval text), ``specialisation_gain`` (1 - eval_ppl / parent_eval_ppl),
``parent_text_ppl``, ``parent_text_parent_ppl`` (node / parent on the parent's eval
text; for children of the base: their sibling nodes' text), ``forgetting``
(parent_text_ppl / parent_text_parent_ppl - 1, null without a reference text),
``forgetting_bound``, ``forgetting_reference``, ``train_loss_first``, ``train_loss_last``,
``steps``, ``tokens``, ``train_seconds``, ``precision``}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hierarchy.ids import Level, NodeId, NodePath
from nodes.errors import AdapterError, IntegrityError, NodesError
from nodes.store.digest import sha256_file

__all__ = [
    "NODE_RECORD",
    "TREE_RECORD",
    "BuiltNode",
    "BuiltTree",
    "node_dir",
    "open_tree",
    "verify_node_files",
]

TREE_RECORD = "tree.json"
NODE_RECORD = "node.json"


@dataclass(frozen=True)
class BuiltNode:
    """What node.json records about one built node."""

    node_id: NodeId
    level: Level
    parent_id: NodeId
    directory: Path
    files: Mapping[str, Mapping[str, Any]]  # file name -> {"sha256": str, "length": int}
    version: int = 1
    parent_version: int | None = None
    parent_adapter_digest: str | None = None  # sha256 of the parent's adapter weights file
    base_digest: str = ""
    language: str | None = None
    domain: str | None = None
    subdomain: str | None = None
    tags: tuple[str, ...] = ()
    visibility: str = "public"
    owner: str | None = None
    lora: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)  # data file digests
    metrics: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    store_key: str = ""  # set for a stored version (nodes.store.versions): "<path>@v<version>-<sha12>"

    @property
    def path(self) -> NodePath:
        return self.node_id.path

    @property
    def cache_key(self) -> str:
        """The adapter cache's name for these weights: one key per stored version, else the path."""
        return self.store_key or str(self.path)

    @property
    def sha256(self) -> Mapping[str, str]:
        return {name: str(info["sha256"]) for name, info in self.files.items()}

    @property
    def adapter_digest(self) -> str:
        return str(self.files["adapter_model.safetensors"]["sha256"])

    @classmethod
    def from_record(cls, directory: Path, record: Mapping[str, Any]) -> BuiltNode:
        return cls(
            node_id=NodeId.parse(record["id"]),
            level=Level.parse(record["level"]),
            parent_id=NodeId.parse(record["parent"]),
            directory=directory,
            files=record.get("files", {}),
            version=int(record.get("version", 1)),
            parent_version=record.get("parent_version"),
            parent_adapter_digest=record.get("parent_adapter_digest"),
            base_digest=record.get("base_digest", ""),
            language=record.get("language"),
            domain=record.get("domain"),
            subdomain=record.get("subdomain"),
            tags=tuple(record.get("tags", ())),
            visibility=record.get("visibility", "public"),
            owner=record.get("owner"),
            lora=record.get("lora", {}),
            training=record.get("training", {}),
            data=record.get("data", {}),
            metrics=record.get("metrics", {}),
            raw=record,
        )


@dataclass(frozen=True)
class BuiltTree:
    """A built tree on disk: its base and its nodes, parents first."""

    root: Path
    name: str
    base_dir: Path
    base_digest: str
    base_model: str  # the spec's base.model value ("tiny", "smollm2", a dir, ...)
    nodes: tuple[BuiltNode, ...]
    spec_digest: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def node(self, node_id: NodeId | str) -> BuiltNode:
        key = node_id if isinstance(node_id, NodeId) else NodeId.parse(str(node_id))
        for n in self.nodes:
            if n.node_id == key:
                return n
        raise NodesError(f"tree {self.name!r} has no node {str(key)!r}")

    def has(self, node_id: NodeId | str) -> bool:
        key = node_id if isinstance(node_id, NodeId) else NodeId.parse(str(node_id))
        return (key.is_base and key.tree == self.name) or any(n.node_id == key for n in self.nodes)

    def chain(self, node_id: NodeId | str) -> tuple[BuiltNode, ...]:
        """Built nodes from the first child of the base down to ``node_id`` (empty for the base)."""
        key = node_id if isinstance(node_id, NodeId) else NodeId.parse(str(node_id))
        if key.tree != self.name:
            raise NodesError(f"node {key} is not in tree {self.name!r}")
        return tuple(self.node(NodeId(self.name, p)) for p in key.path.lineage())

    def children(self, node_id: NodeId | str) -> tuple[BuiltNode, ...]:
        key = node_id if isinstance(node_id, NodeId) else NodeId.parse(str(node_id))
        return tuple(n for n in self.nodes if n.parent_id == key)


def node_dir(root: str | Path, path: NodePath | str) -> Path:
    return Path(root) / "nodes" / str(path)


def _read_record(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; NodesError naming the file for anything else (never a traceback)."""
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise NodesError(f"{file} is corrupt: {str(exc)[:200]}") from None
    if not isinstance(record, dict):
        raise NodesError(f"{file} is corrupt: expected a JSON object, found a JSON {type(record).__name__}")
    return record


def open_tree(root: str | Path) -> BuiltTree:
    """Read tree.json and every node.json; raises NodesError if the dir is not a built tree."""
    root = Path(root)
    record_file = root / TREE_RECORD
    if not record_file.is_file():
        raise NodesError(f"{root} is not a built tree (no {TREE_RECORD}); run `treelm tree build SPEC --out {root}`")
    record = _read_record(record_file)
    current = record_file
    try:
        base_dir = Path(record["base"]["dir"])
        if not base_dir.is_absolute():
            base_dir = root / base_dir
        nodes = []
        for path in record.get("nodes", []):
            directory = node_dir(root, path)
            current = directory / NODE_RECORD
            if not current.is_file():
                raise NodesError(f"node {record['name']}/{path} is listed in {record_file} but {current} is missing")
            nodes.append(BuiltNode.from_record(directory, _read_record(current)))
        return BuiltTree(
            root=root,
            name=record["name"],
            base_dir=base_dir,
            base_digest=record["base"]["digest"],
            base_model=record["base"].get("model", ""),
            nodes=tuple(nodes),
            spec_digest=record.get("spec_digest", ""),
            raw=record,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field missing or of the wrong kind
        what = f"no field {exc}" if isinstance(exc, KeyError) else str(exc)[:200]
        raise NodesError(f"{current} is corrupt: {what}") from None


def verify_node_files(node: BuiltNode) -> None:
    """Re-hash the node's files against node.json; raise IntegrityError on any mismatch."""
    if not node.files:
        raise AdapterError(f"node {node.node_id} records no files")
    for name, info in node.files.items():
        file = node.directory / name
        if not file.is_file():
            raise IntegrityError(f"node {node.node_id}: {file} is missing")
        actual = sha256_file(file)
        if actual != info["sha256"]:
            raise IntegrityError(
                f"node {node.node_id}: {name} has sha256 {actual[:12]}..., recorded {str(info['sha256'])[:12]}...: "
                "the file was changed on disk"
            )
