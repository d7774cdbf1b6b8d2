"""The update manifest: what a node signs when it sends a new adapter version upward.

It serialises to exactly one byte string (sorted keys, no spaces, UTF-8, times as
``YYYY-MM-DDTHH:MM:SSZ``) and :func:`parse_manifest` accepts only that string, so a
manifest and its digest correspond one to one. Payload files (the PEFT adapter)
travel beside the envelope and are named here with their sha256 and length.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hierarchy.errors import InvalidNodePath, ManifestError
from hierarchy.ids import NodeId
from hierarchy.updates.envelope import Envelope, sign_envelope
from hierarchy.updates.keys import SigningKey

__all__ = [
    "ADAPTER_FORMAT",
    "UPDATE_PAYLOAD_TYPE",
    "FileEntry",
    "LayerSpec",
    "UpdateManifest",
    "format_time",
    "parse_manifest",
    "parse_time",
    "sha256_digest",
    "sign_manifest",
]

UPDATE_PAYLOAD_TYPE = "application/vnd.treelm.update.v1+json"
ADAPTER_FORMAT = "peft-lora-safetensors"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_MODULE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,255}$")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_FIELDS = (
    "adapter_format",
    "base_digest",
    "created",
    "expires",
    "files",
    "layers",
    "metrics",
    "node",
    "parent",
    "parent_version",
    "training_data_digest",
    "version",
)


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>``, the form every digest field of a manifest uses."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(value: Any, field: str = "time") -> datetime:
    """A UTC datetime (second precision) from an aware datetime, epoch seconds, or ``...Z`` text."""
    if isinstance(value, bool):
        raise ManifestError(f"field {field!r} must be a time, got {value!r}", field=field)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ManifestError(f"field {field!r} must be timezone-aware (UTC), got a naive datetime", field=field)
        return value.astimezone(UTC).replace(microsecond=0)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return datetime.fromtimestamp(int(value), tz=UTC)
    if isinstance(value, str):
        try:
            return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            pass
    raise ManifestError(f"field {field!r} must be UTC time like 2030-01-31T12:00:00Z, got {value!r}", field=field)


def _int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ManifestError(f"field {field!r} must be an integer >= {minimum}, got {value!r}", field=field)
    return value


def _check_file_name(name: Any) -> str:
    # Names become paths on the receiver: relative, no '..', no backslashes, no empty parts.
    if not (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and "\\" not in name
        and "\0" not in name
        and not name.startswith("/")
        and all(part not in ("", ".", "..") for part in name.split("/"))
    ):
        raise ManifestError(f"field 'files': file name {name!r} must be a relative path without '..'", field="files")
    return name


@dataclass(frozen=True, order=True)
class FileEntry:
    """One payload file as signed: its relative name, sha256 (hex) and length in bytes."""

    name: str
    sha256: str
    length: int

    def __post_init__(self) -> None:
        _check_file_name(self.name)
        if not isinstance(self.sha256, str) or not _HEX64.match(self.sha256):
            raise ManifestError(
                f"field 'files': {self.name!r} sha256 must be 64 lower-case hex characters", field="files"
            )
        _int(self.length, f"files.{self.name}.length", 0)

    @classmethod
    def of(cls, name: str, data: bytes) -> FileEntry:
        return cls(name, hashlib.sha256(data).hexdigest(), len(data))


@dataclass(frozen=True, order=True)
class LayerSpec:
    """One adapted linear layer: its module name in the base model and its LoRA shape."""

    module: str  # e.g. model.layers.0.self_attn.q_proj (as in nodes.store.adapters)
    out_features: int
    in_features: int
    rank: int

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not _MODULE.match(self.module):
            raise ManifestError(f"field 'layers': {self.module!r} is not a dotted module name", field="layers")
        _int(self.out_features, f"layers.{self.module}.out", 1)
        _int(self.in_features, f"layers.{self.module}.in", 1)
        _int(self.rank, f"layers.{self.module}.rank", 1)


def _node(value: Any, field: str) -> NodeId:
    if isinstance(value, NodeId):
        return value
    if not isinstance(value, str):
        raise ManifestError(f"field {field!r} must be a node id string, got {value!r}", field=field)
    try:
        return NodeId.parse(value)
    except InvalidNodePath as exc:
        raise ManifestError(f"field {field!r}: {exc}", field=field) from exc


def _files(value: Any) -> tuple[FileEntry, ...]:
    if isinstance(value, Mapping):
        entries = []
        for name, info in value.items():
            if isinstance(info, FileEntry):
                entries.append(info)
            elif isinstance(info, Mapping) and set(info) == {"sha256", "length"}:
                entries.append(FileEntry(_check_file_name(name), info["sha256"], info["length"]))
            else:
                raise ManifestError(f"files[{name!r}] must be {{'sha256': hex, 'length': int}}", field="files")
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        entries = list(value)
        if not all(isinstance(e, FileEntry) for e in entries):
            raise ManifestError("field 'files' must hold FileEntry values", field="files")
    else:
        raise ManifestError("field 'files' must map file names to their sha256 and length", field="files")
    names = [e.name for e in entries]
    if not entries or len(set(names)) != len(names):
        raise ManifestError("field 'files' must name at least one file, each once", field="files")
    return tuple(sorted(entries))


def _layers(value: Any) -> tuple[LayerSpec, ...]:
    if isinstance(value, Mapping):
        specs = []
        for module, shape in value.items():
            if isinstance(shape, LayerSpec):
                specs.append(shape)
            elif isinstance(shape, Mapping) and set(shape) == {"out", "in", "rank"}:
                specs.append(LayerSpec(module, shape["out"], shape["in"], shape["rank"]))
            else:
                raise ManifestError(f"layers[{module!r}] must be {{'out', 'in', 'rank'}}", field="layers")
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        specs = list(value)
        if not all(isinstance(s, LayerSpec) for s in specs):
            raise ManifestError("field 'layers' must hold LayerSpec values", field="layers")
    else:
        raise ManifestError("field 'layers' must map module names to {out, in, rank}", field="layers")
    modules = [s.module for s in specs]
    if not specs or len(set(modules)) != len(modules):
        raise ManifestError("field 'layers' must name at least one module, each once", field="layers")
    return tuple(sorted(specs))


def _metrics(value: Any) -> tuple[tuple[str, float], ...]:
    pairs = value.items() if isinstance(value, Mapping) else value
    out: dict[str, float] = {}
    try:
        for name, v in pairs:
            if not isinstance(name, str) or not name or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ManifestError(f"field 'metrics': {name!r} must be a named number, got {v!r}", field="metrics")
            if not math.isfinite(v) or name in out:
                raise ManifestError(f"field 'metrics': {name!r} must be finite and named once", field="metrics")
            out[name] = float(v)
    except ManifestError:
        raise
    except (TypeError, ValueError) as exc:
        raise ManifestError("field 'metrics' must map names to numbers", field="metrics") from exc
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class UpdateManifest:
    """What a child signs: which node, over which parent and base, which files, which version."""

    node: NodeId
    parent: NodeId
    parent_version: int  # the parent version the adapter was trained over (0: the base itself)
    base_digest: str  # sha256:<hex> of the base model
    version: int  # must be the receiver's current version of ``node`` + 1
    files: tuple[FileEntry, ...]
    layers: tuple[LayerSpec, ...]
    training_data_digest: str  # sha256:<hex> of the training data
    metrics: tuple[tuple[str, float], ...]  # the child's own evaluation, sorted by name
    created: datetime  # UTC, second precision
    expires: datetime
    adapter_format: str = ADAPTER_FORMAT

    def __post_init__(self) -> None:
        # Normalise friendly inputs (strings, dicts, epoch seconds) to the canonical value types.
        set_ = object.__setattr__
        set_(self, "node", _node(self.node, "node"))
        set_(self, "parent", _node(self.parent, "parent"))
        if self.node.is_base:
            raise ManifestError("field 'node': the base is not updated through this protocol", field="node")
        if self.parent != self.node.parent:
            raise ManifestError(
                f"field 'parent' is {self.parent}, but the parent of {self.node} is {self.node.parent}", field="parent"
            )
        _int(self.parent_version, "parent_version", 0)
        _int(self.version, "version", 1)
        for name in ("base_digest", "training_data_digest"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _DIGEST.match(value):
                raise ManifestError(f"field {name!r} must be 'sha256:' + 64 hex characters, got {value!r}", field=name)
        set_(self, "files", _files(self.files))
        set_(self, "layers", _layers(self.layers))
        set_(self, "metrics", _metrics(self.metrics))
        set_(self, "created", parse_time(self.created, "created"))
        set_(self, "expires", parse_time(self.expires, "expires"))
        if self.expires <= self.created:
            raise ManifestError("field 'expires' must be later than 'created'", field="expires")
        if not isinstance(self.adapter_format, str) or not self.adapter_format:
            raise ManifestError("field 'adapter_format' must be a non-empty string", field="adapter_format")

    def file(self, name: str) -> FileEntry | None:
        return next((f for f in self.files if f.name == name), None)

    def layer(self, module: str) -> LayerSpec | None:
        return next((s for s in self.layers if s.module == module), None)

    @property
    def metrics_dict(self) -> dict[str, float]:
        return dict(self.metrics)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_format": self.adapter_format,
            "base_digest": self.base_digest,
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "files": {f.name: {"length": f.length, "sha256": f.sha256} for f in self.files},
            "layers": {s.module: {"in": s.in_features, "out": s.out_features, "rank": s.rank} for s in self.layers},
            "metrics": dict(self.metrics),
            "node": str(self.node),
            "parent": str(self.parent),
            "parent_version": self.parent_version,
            "training_data_digest": self.training_data_digest,
            "version": self.version,
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes: sorted keys, no whitespace, UTF-8."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")

    @property
    def digest(self) -> str:
        return sha256_digest(self.to_bytes())

    @classmethod
    def from_dict(cls, obj: Any) -> UpdateManifest:
        if not isinstance(obj, dict):
            raise ManifestError("manifest must be a JSON object")
        missing = [f for f in _FIELDS if f not in obj]
        extra = sorted(set(obj) - set(_FIELDS))
        if missing or extra:
            what = [f"missing field(s): {', '.join(missing)}"] if missing else []
            what += [f"unknown field(s): {', '.join(extra)}"] if extra else []
            raise ManifestError("manifest has " + "; ".join(what), field=(missing or extra)[0])
        if not isinstance(obj["metrics"], dict):
            raise ManifestError("field 'metrics' must be an object", field="metrics")
        for name in ("created", "expires"):
            if not isinstance(obj[name], str):  # on the wire a time is only ever text
                raise ManifestError(f"field {name!r} must be text like 2030-01-31T12:00:00Z", field=name)
        return cls(**obj)


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"manifest contains {name}, which is not a number", field="metrics")


def _no_duplicates(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ManifestError(f"manifest repeats the JSON key {key!r}", field=key)
        out[key] = value
    return out


def parse_manifest(payload: bytes) -> UpdateManifest:
    """Parse canonical manifest bytes; anything else (even equivalent JSON) is refused."""
    try:
        obj = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ManifestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not UTF-8 JSON: {exc}") from exc
    manifest = UpdateManifest.from_dict(obj)
    if manifest.to_bytes() != payload:
        raise ManifestError("manifest bytes are not in canonical form (sorted keys, no spaces, UTF-8)")
    return manifest


def sign_manifest(manifest: UpdateManifest, signers: Sequence[SigningKey]) -> Envelope:
    """A DSSE envelope carrying the manifest's canonical bytes, signed by each of ``signers``."""
    return sign_envelope(UPDATE_PAYLOAD_TYPE, manifest.to_bytes(), signers)
