"""The variant manifest: what a device downloads and verifies for one node version in one form.

The downward half of the update protocol. A server builds a variant (a merged model, a flat
adapter, GGUF files, ...; see ``nodes.build.variants``) and describes it here: which node
version, over which chain of stored versions and which base, every file with its sha256
and length, how to load it, and which other variant it runs over (a flat adapter needs its
base). Like :class:`~hierarchy.updates.manifest.UpdateManifest` it has exactly one byte
form (sorted keys, no spaces, UTF-8), which is what gets signed; :func:`parse_variant_manifest`
accepts only that form. No I/O here: hashing files is the caller's job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hierarchy.errors import InvalidNodePath, ManifestError
from hierarchy.ids import NodeId, NodePath
from hierarchy.updates.envelope import Envelope, sign_envelope
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import FileEntry, sha256_digest

__all__ = [
    "VARIANT_FORMAT",
    "VARIANT_PAYLOAD_TYPE",
    "VariantLink",
    "VariantManifest",
    "VariantRequirement",
    "parse_variant_manifest",
    "sign_variant_manifest",
]

VARIANT_FORMAT = "treelm-variant/1"
VARIANT_PAYLOAD_TYPE = "application/vnd.treelm.variant.v1+json"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KIND = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_ROLE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_FIELDS = (
    "base",
    "builder",
    "bytes",
    "chain",
    "files",
    "format",
    "key",
    "kind",
    "load",
    "metrics",
    "node",
    "requires",
    "version",
)


def _fail(message: str, field: str) -> ManifestError:
    return ManifestError(f"variant manifest: {message}", field=field)


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(f"field {name!r} must be an integer >= {minimum}, got {value!r}", name)
    return value


def _hex(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise _fail(f"field {name!r} must be 64 lower-case hex characters, got {value!r}", name)
    return value


def _text(value: Any, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > 500:
        raise _fail(f"field {name!r} must be a non-empty string, got {value!r}", name)
    return value


@dataclass(frozen=True, order=True)
class VariantLink:
    """One element of the chain a variant was made of: node path, version, adapter sha256."""

    path: str
    version: int
    adapter: str

    def __post_init__(self) -> None:
        try:
            NodePath(self.path)
        except (InvalidNodePath, TypeError) as exc:
            raise _fail(f"chain path {self.path!r}: {exc}", "chain") from exc
        _int(self.version, "chain.version", 1)
        _hex(self.adapter, "chain.adapter")

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "path": self.path, "version": self.version}


@dataclass(frozen=True)
class VariantRequirement:
    """Another variant this one runs over (the base a flat adapter or LoRA GGUF files need)."""

    kind: str
    node: str  # a node id (the tree's base: the tree's name)
    key: str  # that variant's content key

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not _KIND.match(self.kind):
            raise _fail(f"requires.kind {self.kind!r} is not a variant kind", "requires")
        _text(self.node, "requires.node")
        _hex(self.key, "requires.key")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "node": self.node}


def _json_value(value: Any, name: str) -> Any:
    """A plain JSON value (metrics and builder facts are free-form but must round-trip exactly)."""
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _fail(f"field {name!r} must be plain JSON without NaN or infinity: {exc}", name) from exc
    return json.loads(text)


@dataclass(frozen=True)
class VariantManifest:
    """Everything a device needs to check one downloaded variant (see the module doc)."""

    key: str  # the content key: sha256 over (format, kind, base digest, chain)
    kind: str  # merged, flat, merged-int8, gguf-lora, ...
    node: NodeId
    version: int  # the node's version; 0 for the base
    chain: tuple[VariantLink, ...]  # top ancestor first; empty for the base
    base: Mapping[str, Any]  # {"digest": hex, "model": str, "hub_id": str | None}
    files: tuple[FileEntry, ...]  # sorted by name
    load: Mapping[str, tuple[str, ...]]  # role -> files, e.g. {"gguf": ("m.gguf",)}, {"lora": (a, b)}
    requires: VariantRequirement | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)  # the node version's own evaluation
    builder: Mapping[str, Any] = field(default_factory=dict)  # what built it (library versions)
    format: str = VARIANT_FORMAT
    total: int | None = None  # "bytes": the files' total length; filled in, and checked when given

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.format != VARIANT_FORMAT:
            raise _fail(f"format {self.format!r} is not {VARIANT_FORMAT!r}", "format")
        _hex(self.key, "key")
        if not isinstance(self.kind, str) or not _KIND.match(self.kind):
            raise _fail(f"field 'kind' {self.kind!r} is not a variant kind", "kind")
        if not isinstance(self.node, NodeId):
            try:
                set_(self, "node", NodeId.parse(str(self.node)))
            except InvalidNodePath as exc:
                raise _fail(f"field 'node': {exc}", "node") from exc
        _int(self.version, "version", 0)
        chain = tuple(x if isinstance(x, VariantLink) else VariantLink(**x) for x in self.chain)
        lineage = [str(p) for p in self.node.path.lineage()]
        if [x.path for x in chain] != lineage:
            raise _fail(f"field 'chain' must name {lineage}, got {[x.path for x in chain]}", "chain")
        if chain and chain[-1].version != self.version:
            raise _fail(f"the chain ends at version {chain[-1].version}, the manifest says {self.version}", "version")
        if not chain and self.version != 0:
            raise _fail("the base has version 0", "version")
        set_(self, "chain", chain)
        base = dict(self.base) if isinstance(self.base, Mapping) else None
        if base is None or set(base) != {"digest", "model", "hub_id"}:
            raise _fail("field 'base' must be {digest, model, hub_id}", "base")
        _hex(base["digest"], "base.digest")
        _text(base["model"], "base.model")
        _text(base["hub_id"], "base.hub_id", optional=True)
        set_(self, "base", base)
        files = tuple(sorted(f if isinstance(f, FileEntry) else FileEntry(**f) for f in self.files))
        names = [f.name for f in files]
        if not files or len(set(names)) != len(names):
            raise _fail("field 'files' must name at least one file, each once", "files")
        set_(self, "files", files)
        total = sum(f.length for f in files)
        if self.total is not None and _int(self.total, "bytes", 0) != total:
            raise _fail(f"field 'bytes' is {self.total}, the files add up to {total}", "bytes")
        set_(self, "total", total)
        load: dict[str, tuple[str, ...]] = {}
        for role, listed in dict(self.load).items():
            entries = (listed,) if isinstance(listed, str) else tuple(listed)
            if not isinstance(role, str) or not _ROLE.match(role) or not entries:
                raise _fail(f"load role {role!r} must be a lower-case name with at least one file", "load")
            unknown = [n for n in entries if n not in names]
            if unknown:
                raise _fail(f"load role {role!r} names files the manifest does not list: {unknown}", "load")
            load[role] = entries
        if not load:
            raise _fail("field 'load' must say how to load the files", "load")
        set_(self, "load", load)
        if self.requires is not None and not isinstance(self.requires, VariantRequirement):
            if not isinstance(self.requires, Mapping):
                raise _fail("field 'requires' must be {kind, node, key} or null", "requires")
            set_(self, "requires", VariantRequirement(**self.requires))
        set_(self, "metrics", _json_value(dict(self.metrics), "metrics"))
        set_(self, "builder", _json_value(dict(self.builder), "builder"))

    @property
    def size(self) -> int:
        """Total length of the files in bytes (the manifest itself not included)."""
        return sum(f.length for f in self.files)

    def file(self, name: str) -> FileEntry | None:
        return next((f for f in self.files if f.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": dict(self.base),
            "builder": dict(self.builder),
            "bytes": self.size,
            "chain": [x.to_dict() for x in self.chain],
            "files": [{"length": f.length, "name": f.name, "sha256": f.sha256} for f in self.files],
            "format": self.format,
            "key": self.key,
            "kind": self.kind,
            "load": {role: list(names) for role, names in self.load.items()},
            "metrics": dict(self.metrics),
            "node": str(self.node),
            "requires": self.requires.to_dict() if self.requires else None,
            "version": self.version,
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes: sorted keys, no whitespace, UTF-8 (what is signed)."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")

    @property
    def digest(self) -> str:
        return sha256_digest(self.to_bytes())

    @classmethod
    def from_dict(cls, obj: Any) -> VariantManifest:
        if not isinstance(obj, dict):
            raise _fail("must be a JSON object", "manifest")
        missing = [f for f in _FIELDS if f not in obj]
        extra = sorted(set(obj) - set(_FIELDS))
        if missing or extra:
            what = [f"missing field(s): {', '.join(missing)}"] if missing else []
            what += [f"unknown field(s): {', '.join(extra)}"] if extra else []
            raise _fail("; ".join(what), (missing or extra)[0])
        for name, kind in (("chain", list), ("files", list), ("load", dict), ("base", dict)):
            if not isinstance(obj[name], kind):
                raise _fail(f"field {name!r} must be a JSON {kind.__name__}", name)
        try:
            chain = tuple(VariantLink(**x) for x in obj["chain"])
            files = tuple(FileEntry(**x) for x in obj["files"])
        except TypeError as exc:
            raise _fail(f"a chain or file entry has the wrong fields: {exc}", "files") from exc
        fields = {k: v for k, v in obj.items() if k != "bytes"}
        return cls(**{**fields, "chain": chain, "files": files, "total": obj["bytes"]})


def _no_duplicates(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _fail(f"repeats the JSON key {key!r}", key)
        out[key] = value
    return out


def parse_variant_manifest(payload: bytes) -> VariantManifest:
    """Parse canonical variant manifest bytes; anything else (even equivalent JSON) is refused."""
    try:
        obj = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ManifestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(f"not UTF-8 JSON: {exc}", "manifest") from exc
    manifest = VariantManifest.from_dict(obj)
    if manifest.to_bytes() != payload:
        raise _fail("bytes are not in canonical form (sorted keys, no spaces, UTF-8)", "manifest")
    return manifest


def sign_variant_manifest(manifest: VariantManifest, signers: Sequence[SigningKey]) -> Envelope:
    """A DSSE envelope carrying the manifest's canonical bytes, signed by each of ``signers``."""
    return sign_envelope(VARIANT_PAYLOAD_TYPE, manifest.to_bytes(), signers)
