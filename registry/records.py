"""Frozen values that cross the registry's boundary (ORM rows never do).

Inputs: :class:`TreeImport` (a built tree, as the composition root reads it
from disk), :class:`BaseFacts`, :class:`ImportNode`, :class:`VariantFacts`.
Outputs: the ``*Record`` classes returned by the repository functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hierarchy.errors import InvalidNodePath
from hierarchy.ids import NodePath
from registry.errors import InvalidInput
from registry.vocab import KEY_ROLES, LEVELS, TOKEN_ROLES, VARIANT_KINDS, VERSION_STATUSES, VISIBILITIES

__all__ = [
    "AliasRecord",
    "BaseFacts",
    "DeploymentRecord",
    "ImportNode",
    "ImportResult",
    "IssuedToken",
    "NodeDetail",
    "NodeRecord",
    "SigningKeyRecord",
    "TenantRecord",
    "TokenGrant",
    "TokenRecord",
    "TreeImport",
    "VariantFacts",
    "VariantRecord",
    "VersionRecord",
]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def check_name(value: str, what: str) -> str:
    """Tenant and tree names: no spaces; they become keys, metadata values and URLs."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidInput(
            f"{what} {value!r} must be 1-64 letters, digits, '.', '@', '-' or '_' (starting with a letter or digit)",
            field=what,
        )
    return value


def normalise_label(value: str, what: str) -> str:
    """Tags, languages, domains: matched case-insensitively, so stored lower-case."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if not text or len(text) > 64 or not text.isprintable():
        raise InvalidInput(f"{what} {value!r} must be 1-64 printable characters", field=what)
    return text


def check_digest(value: str, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise InvalidInput(
            f"{what} must be a sha256 hex digest (64 lower-case hex characters), got {value!r}", field=what
        )
    return value


def _check_positive(obj: object, names: tuple[str, ...], *, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
            bound = ">= 0" if allow_zero else "> 0"
            raise InvalidInput(f"{name} must be an integer {bound}, got {value!r}", field=name)


@dataclass(frozen=True)
class BaseFacts:
    """A base model's digest and the architecture facts memory estimates need."""

    digest: str
    model: str  # the spec's base.model ("tiny", "smollm2", a dir)
    architecture: str  # e.g. "LlamaForCausalLM"
    weight_dtype: str  # dtype the weights are stored in ("float32", "bfloat16", ...)
    parameter_count: int
    quantizable_parameter_count: int  # 2-D linear weights that int8 dynamic quantization shrinks
    weights_bytes: int  # bytes of the weight files on disk
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    intermediate_size: int | None = None

    def __post_init__(self) -> None:
        check_digest(self.digest, "base digest")
        _check_positive(
            self,
            (
                "parameter_count",
                "layers",
                "hidden_size",
                "attention_heads",
                "kv_heads",
                "head_dim",
                "vocab_size",
                "max_context",
            ),
        )
        _check_positive(self, ("quantizable_parameter_count", "weights_bytes"), allow_zero=True)
        if self.quantizable_parameter_count > self.parameter_count:
            raise InvalidInput(
                "quantizable_parameter_count exceeds parameter_count", field="quantizable_parameter_count"
            )


@dataclass(frozen=True)
class VariantFacts:
    """One variant of a node version: its size and, when measured, its speed."""

    kind: str  # one of registry.models.VARIANT_KINDS (chain, flat, merged, merged-int8, gguf-lora, ...)
    bytes: int  # what a device downloads and stores
    bytes_estimated: bool  # True when computed from the architecture, not measured on disk
    adapter_parameters: int = 0  # LoRA parameters held beside the weights (chain/flat), 0 when merged
    tokens_per_second: float | None = None
    measured_device: str | None = None
    uri: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in VARIANT_KINDS:
            raise InvalidInput(f"variant kind {self.kind!r} is not one of {', '.join(VARIANT_KINDS)}", field="kind")
        _check_positive(self, ("bytes", "adapter_parameters"), allow_zero=True)
        if self.tokens_per_second is not None and not self.tokens_per_second > 0:
            raise InvalidInput(
                f"tokens_per_second must be > 0, got {self.tokens_per_second!r}", field="tokens_per_second"
            )


@dataclass(frozen=True)
class ImportNode:
    """One node of a built tree as the registry records it (the base is the node with path "")."""

    path: str
    level: str
    manifest_digest: str
    version: int = 1
    parent_version: int | None = None
    language: str | None = None
    domain: str | None = None
    subdomain: str | None = None
    tags: tuple[str, ...] = ()
    visibility: str = "public"
    owner: str | None = None
    description: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    variants: tuple[VariantFacts, ...] = ()

    def __post_init__(self) -> None:
        try:
            NodePath(self.path)
        except InvalidNodePath as exc:
            raise InvalidInput(str(exc), field="path") from None
        if self.level not in LEVELS:
            raise InvalidInput(
                f"node {self.path!r}: level {self.level!r} is not one of {', '.join(LEVELS)}", field="level"
            )
        if self.visibility not in VISIBILITIES:
            raise InvalidInput(
                f"node {self.path!r}: visibility {self.visibility!r} is not public or private", field="visibility"
            )
        if self.visibility == "private" and not self.owner:
            raise InvalidInput(f"node {self.path!r} is private but names no owner tenant", field="owner")
        if self.owner is not None:
            check_name(self.owner, "owner")
        check_digest(self.manifest_digest, "manifest_digest")
        _check_positive(self, ("version",))
        for key in ("language", "domain", "subdomain"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, normalise_label(getattr(self, key), key))
        tags = tuple(dict.fromkeys(normalise_label(tag, "tag") for tag in self.tags))
        kinds = [v.kind for v in self.variants]
        if len(set(kinds)) != len(kinds):
            raise InvalidInput(f"node {self.path!r} lists a variant kind twice: {kinds}", field="variants")
        object.__setattr__(self, "tags", tags)
        object.__setattr__(self, "variants", tuple(self.variants))

    @property
    def depth(self) -> int:
        return len(self.path.split("/")) if self.path else 0

    @property
    def parent_path(self) -> str | None:
        if not self.path:
            return None
        return self.path.rpartition("/")[0]


@dataclass(frozen=True)
class TreeImport:
    """A whole built tree: its base facts and its nodes, parents before children."""

    name: str
    base: BaseFacts
    nodes: tuple[ImportNode, ...]

    def __post_init__(self) -> None:
        check_name(self.name, "tree name")
        seen: dict[str, ImportNode] = {}
        for node in self.nodes:
            if node.path in seen:
                raise InvalidInput(f"tree {self.name!r}: node {node.path!r} appears twice", field="nodes")
            if node.path == "":
                if node.level != "base":
                    raise InvalidInput(f"tree {self.name!r}: the root node must have level base", field="level")
            else:
                parent = seen.get(node.parent_path or "")
                if parent is None:
                    raise InvalidInput(
                        f"tree {self.name!r}: node {node.path!r} comes before (or without) its parent", field="nodes"
                    )
                if LEVELS.index(node.level) <= LEVELS.index(parent.level):
                    raise InvalidInput(
                        f"tree {self.name!r}: node {node.path!r} ({node.level}) is not below its parent's level "
                        f"({parent.level})",
                        field="level",
                    )
            seen[node.path] = node
        if "" not in seen:
            raise InvalidInput(f"tree {self.name!r} has no base node (path '')", field="nodes")
        object.__setattr__(self, "nodes", tuple(self.nodes))


@dataclass(frozen=True)
class ImportResult:
    tree: str
    base_digest: str
    nodes_added: int
    versions_added: int
    variants_added: int
    variants_updated: int
    tenants_added: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(
            self.nodes_added
            or self.versions_added
            or self.variants_added
            or self.variants_updated
            or self.tenants_added
        )


@dataclass(frozen=True)
class NodeRecord:
    node_id: str  # "<tree>/<path>", or "<tree>" for the base
    tree: str
    path: str
    level: str
    parent: str | None
    base_digest: str
    language: str | None
    domain: str | None
    subdomain: str | None
    tags: tuple[str, ...]
    visibility: str
    owner: str | None
    description: str | None
    stable_version: int | None
    candidate_version: int | None
    created_at: datetime

    @property
    def depth(self) -> int:
        return len(self.path.split("/")) if self.path else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "tree": self.tree,
            "path": self.path,
            "level": self.level,
            "parent": self.parent,
            "language": self.language,
            "domain": self.domain,
            "subdomain": self.subdomain,
            "tags": list(self.tags),
            "visibility": self.visibility,
            "owner": self.owner,
            "stable": self.stable_version,
            "candidate": self.candidate_version,
        }


@dataclass(frozen=True)
class VersionRecord:
    node_id: str
    version: int
    parent_version: int | None
    manifest_digest: str
    status: str
    metrics: Mapping[str, Any]
    created_at: datetime
    status_changed_at: datetime
    aliases: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "version": self.version,
            "parent_version": self.parent_version,
            "manifest_digest": self.manifest_digest,
            "status": self.status,
            "aliases": list(self.aliases),
            "metrics": dict(self.metrics),
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class VariantRecord:
    node_id: str
    version: int
    kind: str
    bytes: int
    bytes_estimated: bool
    adapter_parameters: int
    tokens_per_second: float | None
    measured_device: str | None
    uri: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "bytes": self.bytes,
            "bytes_estimated": self.bytes_estimated,
            "adapter_parameters": self.adapter_parameters,
            "tokens_per_second": self.tokens_per_second,
            "measured_device": self.measured_device,
            "uri": self.uri,
        }


@dataclass(frozen=True)
class DeploymentRecord:
    node_id: str
    trunk: str
    endpoint: str
    status: str
    version: int | None
    updated_at: datetime


@dataclass(frozen=True)
class NodeDetail:
    """A node with its base, versions, the stable version's variants and where it is deployed."""

    node: NodeRecord
    base: BaseFacts
    versions: tuple[VersionRecord, ...]
    variants: tuple[VariantRecord, ...]
    deployments: tuple[DeploymentRecord, ...]

    def to_json(self) -> dict[str, Any]:
        base = self.base
        return {
            **self.node.to_json(),
            "description": self.node.description,
            "base": {
                "digest": base.digest,
                "model": base.model,
                "architecture": base.architecture,
                "parameters": base.parameter_count,
                "layers": base.layers,
                "kv_heads": base.kv_heads,
                "head_dim": base.head_dim,
                "max_context": base.max_context,
            },
            "versions": [v.to_json() for v in self.versions],
            "variants": [v.to_json() for v in self.variants],
            "deployments": [
                {"trunk": d.trunk, "endpoint": d.endpoint, "status": d.status, "version": d.version}
                for d in self.deployments
            ],
        }


@dataclass(frozen=True)
class AliasRecord:
    node_id: str
    name: str
    version: int
    previous_version: int | None


@dataclass(frozen=True)
class TenantRecord:
    name: str
    created_at: datetime


@dataclass(frozen=True)
class IssuedToken:
    """A freshly issued API token. ``token`` is the secret: shown once, never stored."""

    tenant: str
    token_id: str
    token: str = field(repr=False)
    role: str = "tenant"
    expires_at: datetime | None = None


@dataclass(frozen=True)
class TokenGrant:
    """What a valid bearer token grants: its tenant and role, until ``expires_at`` (None: no expiry)."""

    tenant: str
    role: str  # one of TOKEN_ROLES
    token_id: str
    expires_at: datetime | None = None


@dataclass(frozen=True)
class TokenRecord:
    """An issued token as `token ls` shows it: never its secret nor its hash."""

    token_id: str
    tenant: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_json(self, now: datetime) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "token_id": self.token_id,
            "tenant": self.tenant,
            "role": self.role,
            "state": self.state(now),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
        }


@dataclass(frozen=True)
class SigningKeyRecord:
    key_id: str
    public_key: str
    algorithm: str
    role: str
    status: str
    node_id: str | None
    created_at: datetime
    revoked_at: datetime | None


def check_status(value: str) -> str:
    if value not in VERSION_STATUSES:
        raise InvalidInput(f"status {value!r} is not one of {', '.join(VERSION_STATUSES)}", field="status")
    return value


def check_token_role(value: str) -> str:
    if value not in TOKEN_ROLES:
        raise InvalidInput(f"token role {value!r} is not one of {', '.join(TOKEN_ROLES)}", field="role")
    return value


def check_role(value: str) -> str:
    if value not in KEY_ROLES:
        raise InvalidInput(f"key role {value!r} is not one of {', '.join(KEY_ROLES)}", field="role")
    return value
