"""What a receiver trusts: keys with roles, thresholds, node versions, accepted delta norms.

A :class:`TrustState` is an immutable value. Every change returns a *new* state:
:func:`rotate_keys` (a new key set for one group, accepted only with a threshold
of the old keys AND a threshold of the new keys, as in TUF root rotation),
:func:`revoke_key` (signed by a threshold of root keys), ``with_node_version``
and ``with_accepted_norm`` (used by ``verify.apply_to_trust`` and screening).
Storage (the registry) persists ``to_dict()`` and rebuilds with ``from_dict()``.

Keys live in *groups* ``(role, node)``: ``node`` is None for role-wide keys (root,
operators) or a node id for keys that may act for that node only. A group's
threshold falls back to its role-wide threshold. A group with no usable keys
(never created, or revoked below its threshold) is (re)created by root: root's
threshold replaces the old-key signatures, the new keys must still sign.
"""

from __future__ import annotations

import enum
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hierarchy.errors import (
    InvalidNodePath,
    RevokedKeyError,
    RotationError,
    ThresholdError,
    UnknownKeyError,
    UpdateError,
)
from hierarchy.ids import NodeId
from hierarchy.updates.envelope import Signature, pae, sign_payload
from hierarchy.updates.keys import PublicKey, SigningKey
from hierarchy.updates.manifest import sha256_digest

__all__ = [
    "REVOCATION_PAYLOAD_TYPE",
    "ROTATION_PAYLOAD_TYPE",
    "KeyGroup",
    "KeyStatus",
    "NodeVersion",
    "NormHistory",
    "Role",
    "TrustState",
    "TrustedKey",
    "count_valid_signatures",
    "revocation_statement",
    "revoke_key",
    "rotate_keys",
    "rotation_statement",
    "sign_revocation",
    "sign_rotation",
]

ROTATION_PAYLOAD_TYPE = "application/vnd.treelm.key-rotation.v1+json"
REVOCATION_PAYLOAD_TYPE = "application/vnd.treelm.key-revocation.v1+json"
DEFAULT_NORM_WINDOW = 64


class Role(str, enum.Enum):
    ROOT = "root"  # offline keys: create groups, revoke keys
    NODE = "node"  # a node's own keys: sign its updates
    EVALUATOR = "evaluator"  # a parent's evaluator: approves candidates after the gate
    OPERATOR = "operator"  # people: approve, roll back

    @classmethod
    def parse(cls, value: str | Role) -> Role:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(r.value for r in cls)
            raise RotationError(f"unknown role {value!r} (expected one of: {names})") from None


class KeyStatus(str, enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"  # revoked, or rotated out of its group: never trusted again


def _scope(node: str | NodeId | None) -> str | None:
    """Canonical node id text (raises InvalidNodePath for a malformed one), or None."""
    if node is None:
        return None
    return str(node if isinstance(node, NodeId) else NodeId.parse(str(node)))


def _node_key(node: str | NodeId) -> str:
    scope = _scope(node)
    if scope is None:
        raise InvalidNodePath("a node id is required here")
    return scope


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class TrustedKey:
    """A public key the receiver knows, with its role, optional node scope and status."""

    public: PublicKey
    role: Role
    node: str | None = None  # the node this key acts for; None: any node
    status: KeyStatus = KeyStatus.ACTIVE

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role.parse(self.role))
        object.__setattr__(self, "status", KeyStatus(self.status))
        object.__setattr__(self, "node", _scope(self.node))
        if self.role is Role.ROOT and self.node is not None:
            raise RotationError("root keys cannot be scoped to a node")

    @property
    def keyid(self) -> str:
        return self.public.keyid

    @property
    def active(self) -> bool:
        return self.status is KeyStatus.ACTIVE

    @property
    def group(self) -> tuple[Role, str | None]:
        return (self.role, self.node)


@dataclass(frozen=True)
class KeyGroup:
    """Signing policy of one group: how many of its keys must sign, and its key-set version."""

    role: Role
    node: str | None
    threshold: int
    version: int = 0  # bumped by every accepted rotation; a rotation statement names version + 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role.parse(self.role))
        object.__setattr__(self, "node", _scope(self.node))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 1:
            raise RotationError(f"threshold must be an integer >= 1, got {self.threshold!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise RotationError(f"group version must be an integer >= 0, got {self.version!r}")


@dataclass(frozen=True)
class NodeVersion:
    """A node's current accepted version and the parent version it is pinned to."""

    node: str
    version: int
    parent_version: int


@dataclass(frozen=True)
class NormHistory:
    """Frobenius norms of the deltas a parent accepted, oldest first."""

    parent: str
    norms: tuple[float, ...]


def _sorted_unique(items: Iterable[Any], key: Any, what: str) -> tuple[Any, ...]:
    out = tuple(sorted(items, key=key))
    keys = [key(i) for i in out]
    if len(set(keys)) != len(keys):
        raise RotationError(f"trust state lists a {what} twice")
    return out


def _group_key(g: KeyGroup) -> tuple[str, str]:
    return (g.role.value, g.node or "")


@dataclass(frozen=True)
class TrustState:
    """The receiver's whole trust: an immutable value, equal when its content is equal."""

    keys: tuple[TrustedKey, ...] = ()
    groups: tuple[KeyGroup, ...] = ()
    nodes: tuple[NodeVersion, ...] = ()
    delta_norms: tuple[NormHistory, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "keys", _sorted_unique(self.keys, lambda k: k.keyid, "key"))
        set_(self, "groups", _sorted_unique(self.groups, _group_key, "key group"))
        set_(self, "nodes", _sorted_unique(self.nodes, lambda n: n.node, "node"))
        set_(self, "delta_norms", _sorted_unique(self.delta_norms, lambda h: h.parent, "norm history"))

    @classmethod
    def genesis(
        cls,
        root_keys: Sequence[PublicKey],
        root_threshold: int = 1,
        role_thresholds: Mapping[Role, int] | None = None,
        keys: Sequence[TrustedKey] = (),
    ) -> TrustState:
        """The first trusted state (shipped out of band, like TUF's first root.json)."""
        thresholds = {Role.NODE: 1, Role.EVALUATOR: 1, Role.OPERATOR: 1, **(role_thresholds or {})}
        if not root_keys or root_threshold > len(root_keys):
            raise RotationError(f"root needs at least {root_threshold} key(s), got {len(root_keys)}")
        groups = [KeyGroup(Role.ROOT, None, root_threshold)]
        groups += [KeyGroup(Role.parse(r), None, t) for r, t in thresholds.items() if Role.parse(r) is not Role.ROOT]
        all_keys = [TrustedKey(k, Role.ROOT) for k in root_keys] + list(keys)
        return cls(keys=tuple(all_keys), groups=tuple(groups))

    # -- queries -------------------------------------------------------------------------
    def key(self, keyid: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.keyid == keyid), None)

    def group(self, role: Role, node: str | NodeId | None = None) -> KeyGroup:
        """The group's policy; a scoped group without its own falls back to the role-wide threshold."""
        role, scope = Role.parse(role), _scope(node)
        for g in self.groups:
            if g.role is role and g.node == scope:
                return g
        wide = next((g for g in self.groups if g.role is role and g.node is None), None)
        return KeyGroup(role, scope, wide.threshold if wide else 1, 0)

    def threshold(self, role: Role, node: str | NodeId | None = None) -> int:
        return self.group(role, node).threshold

    def active_keys(self, role: Role, node: str | NodeId | None = None) -> tuple[TrustedKey, ...]:
        """Active keys of exactly the group (role, node)."""
        role, scope = Role.parse(role), _scope(node)
        return tuple(k for k in self.keys if k.active and k.role is role and k.node == scope)

    def keys_acting_for(self, role: Role, node: str | NodeId) -> tuple[TrustedKey, ...]:
        """Active keys of ``role`` that may act for ``node``: scoped to it, or role-wide."""
        role, scope = Role.parse(role), _scope(node)
        return tuple(k for k in self.keys if k.active and k.role is role and k.node in (None, scope))

    def node_version(self, node: str | NodeId) -> NodeVersion | None:
        scope = _scope(node)
        return next((n for n in self.nodes if n.node == scope), None)

    def version_of(self, node: str | NodeId) -> int:
        """The node's current accepted version; 0 when it has none yet (its first update is 1)."""
        current = self.node_version(node)
        return current.version if current else 0

    def accepted_norms(self, parent: str | NodeId) -> tuple[float, ...]:
        scope = _scope(parent)
        return next((h.norms for h in self.delta_norms if h.parent == scope), ())

    def median_norm(self, parent: str | NodeId) -> float | None:
        norms = self.accepted_norms(parent)
        return statistics.median(norms) if norms else None

    # -- new states ----------------------------------------------------------------------
    def with_node_version(self, node: str | NodeId, version: int, parent_version: int) -> TrustState:
        scope = _node_key(node)
        nodes = [n for n in self.nodes if n.node != scope] + [NodeVersion(scope, version, parent_version)]
        return replace(self, nodes=tuple(nodes))

    def with_accepted_norm(self, parent: str | NodeId, norm: float, window: int = DEFAULT_NORM_WINDOW) -> TrustState:
        """Record the norm of a delta the parent accepted; keeps the last ``window`` norms."""
        if not math.isfinite(norm) or norm < 0:
            raise ValueError(f"an accepted delta norm must be finite and >= 0, got {norm!r}")
        scope = _node_key(parent)
        norms = (*self.accepted_norms(scope), float(norm))[-window:]
        histories = [h for h in self.delta_norms if h.parent != scope] + [NormHistory(scope, norms)]
        return replace(self, delta_norms=tuple(histories))

    # -- storage -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": [
                {
                    "keyid": k.keyid,
                    "public": k.public.hex,
                    "role": k.role.value,
                    "node": k.node,
                    "status": k.status.value,
                }
                for k in self.keys
            ],
            "groups": [
                {"role": g.role.value, "node": g.node, "threshold": g.threshold, "version": g.version}
                for g in self.groups
            ],
            "nodes": [{"node": n.node, "version": n.version, "parent_version": n.parent_version} for n in self.nodes],
            "delta_norms": {h.parent: list(h.norms) for h in self.delta_norms},
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> TrustState:
        try:
            for k in obj.get("keys", []):
                if "keyid" in k and k["keyid"] != PublicKey.from_hex(k["public"]).keyid:
                    raise RotationError(f"stored key id {k['keyid'][:12]}... does not match its public key")
            return cls(
                keys=tuple(
                    TrustedKey(PublicKey.from_hex(k["public"]), k["role"], k.get("node"), k.get("status", "active"))
                    for k in obj.get("keys", [])
                ),
                groups=tuple(
                    KeyGroup(g["role"], g.get("node"), g["threshold"], g.get("version", 0))
                    for g in obj.get("groups", [])
                ),
                nodes=tuple(
                    NodeVersion(n["node"], int(n["version"]), int(n["parent_version"])) for n in obj.get("nodes", [])
                ),
                delta_norms=tuple(
                    NormHistory(p, tuple(float(x) for x in v)) for p, v in obj.get("delta_norms", {}).items()
                ),
            )
        except UpdateError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise RotationError(f"not a stored trust state: {exc!r}") from exc

    def to_bytes(self) -> bytes:
        return _canonical(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustState:
        return cls.from_dict(json.loads(data))

    @property
    def digest(self) -> str:
        return sha256_digest(self.to_bytes())


# -- signatures over statements ------------------------------------------------------------
def count_valid_signatures(
    message: bytes, signatures: Sequence[Signature], keys: Iterable[TrustedKey | PublicKey]
) -> tuple[str, ...]:
    """Key ids (each once, in signature order) among ``keys`` whose signature of ``message`` verifies."""
    by_id = {k.keyid: (k.public if isinstance(k, TrustedKey) else k) for k in keys}
    valid: list[str] = []
    for s in signatures:
        public = by_id.get(s.keyid)
        if public is not None and s.keyid not in valid and public.verify(s.sig, message):
            valid.append(s.keyid)
    return tuple(valid)


def rotation_statement(
    trust: TrustState, role: Role, new_keys: Sequence[PublicKey], threshold: int, node: str | None = None
) -> bytes:
    """The exact bytes a rotation signs; naming the group's next version makes it single-use."""
    group = trust.group(role, node)
    return _canonical(
        {
            "keys": sorted(k.hex for k in new_keys),
            "node": group.node,
            "role": group.role.value,
            "threshold": threshold,
            "version": group.version + 1,
        }
    )


def sign_rotation(
    trust: TrustState,
    role: Role,
    new_keys: Sequence[PublicKey],
    threshold: int,
    signers: Sequence[SigningKey],
    node: str | None = None,
) -> tuple[Signature, ...]:
    return sign_payload(ROTATION_PAYLOAD_TYPE, rotation_statement(trust, role, new_keys, threshold, node), signers)


def _check_new_keys(
    trust: TrustState, role: Role, scope: str | None, new_keys: Sequence[PublicKey], threshold: int
) -> None:
    if role is Role.ROOT and scope is not None:
        raise RotationError("root keys cannot be scoped to a node")
    if not new_keys:
        raise RotationError("a key set needs at least one key; revoke keys to remove them")
    if len({k.keyid for k in new_keys}) != len(new_keys):
        raise RotationError("the new key set lists a key twice")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= len(new_keys):
        raise RotationError(f"threshold must be between 1 and {len(new_keys)} (the new key count), got {threshold!r}")
    for k in new_keys:
        known = trust.key(k.keyid)
        if known is None:
            continue
        if not known.active:
            raise RevokedKeyError(f"key {k.keyid[:12]}... was revoked and can never be trusted again", keyid=k.keyid)
        if known.group != (role, scope):
            raise RotationError(
                f"key {k.keyid[:12]}... already belongs to group {known.role.value}/{known.node or '*'}",
                keyid=k.keyid,
            )


def rotate_keys(
    trust: TrustState,
    role: Role,
    new_keys: Sequence[PublicKey],
    threshold: int,
    signatures: Sequence[Signature],
    node: str | NodeId | None = None,
) -> TrustState:
    """A new state whose group (role, node) holds exactly ``new_keys`` with ``threshold``.

    Accepted only when signed by the group's threshold of its current active keys
    (root's threshold of root keys when the group has too few usable keys) AND by
    ``threshold`` of the new keys. Old keys left out become revoked. ``trust`` is
    never modified; on failure nothing is returned.
    """
    role, scope = Role.parse(role), _scope(node)
    _check_new_keys(trust, role, scope, new_keys, threshold)
    group = trust.group(role, scope)
    message = pae(ROTATION_PAYLOAD_TYPE, rotation_statement(trust, role, new_keys, threshold, scope))
    old = trust.active_keys(role, scope)
    if len(old) >= group.threshold:
        authority, needed, who = old, group.threshold, f"current {role.value} keys"
    else:  # empty or broken group: root delegates afresh (root itself can never get here, see revoke_key)
        authority, needed, who = trust.active_keys(Role.ROOT), trust.threshold(Role.ROOT), "root keys"
    got = count_valid_signatures(message, signatures, authority)
    if len(got) < needed:
        raise ThresholdError(
            f"key rotation of {role.value}/{scope or '*'} needs {needed} signature(s) from the {who}, "
            f"got {len(got)} valid",
            needed=needed,
            valid=len(got),
        )
    got_new = count_valid_signatures(message, signatures, new_keys)
    if len(got_new) < threshold:
        raise ThresholdError(
            f"key rotation of {role.value}/{scope or '*'} needs {threshold} signature(s) from the new keys "
            f"(proof of possession), got {len(got_new)} valid",
            needed=threshold,
            valid=len(got_new),
        )
    new_ids = {k.keyid for k in new_keys}
    keys = [
        replace(k, status=KeyStatus.REVOKED) if k.group == (role, scope) and k.active and k.keyid not in new_ids else k
        for k in trust.keys
        if k.keyid not in new_ids
    ]
    keys += [TrustedKey(k, role, scope) for k in new_keys]
    groups = [g for g in trust.groups if (g.role, g.node) != (role, scope)]
    groups.append(KeyGroup(role, scope, threshold, group.version + 1))
    return replace(trust, keys=tuple(keys), groups=tuple(groups))


def revocation_statement(keyid: str) -> bytes:
    return _canonical({"revoke": keyid})


def sign_revocation(keyid: str, signers: Sequence[SigningKey]) -> tuple[Signature, ...]:
    return sign_payload(REVOCATION_PAYLOAD_TYPE, revocation_statement(keyid), signers)


def revoke_key(trust: TrustState, keyid: str, signatures: Sequence[Signature]) -> TrustState:
    """A new state in which ``keyid`` is revoked; needs root's threshold of root signatures.

    Revoking an already revoked key returns ``trust`` itself (revocation is permanent, so a
    replayed statement changes nothing). Root may not revoke itself below its threshold.
    """
    key = trust.key(keyid)
    if key is None:
        raise UnknownKeyError(f"no key {keyid[:12]}... to revoke", keyid=keyid)
    if not key.active:
        return trust
    roots = trust.active_keys(Role.ROOT)
    needed = trust.threshold(Role.ROOT)
    got = count_valid_signatures(pae(REVOCATION_PAYLOAD_TYPE, revocation_statement(keyid)), signatures, roots)
    if len(got) < needed:
        raise ThresholdError(
            f"revoking a key needs {needed} root signature(s), got {len(got)} valid", needed=needed, valid=len(got)
        )
    if key.role is Role.ROOT and len(roots) - 1 < needed:
        raise RotationError(
            f"revoking root key {keyid[:12]}... would leave {len(roots) - 1} root key(s) for a threshold of "
            f"{needed}; rotate the root keys instead"
        )
    keys = tuple(replace(k, status=KeyStatus.REVOKED) if k.keyid == keyid else k for k in trust.keys)
    return replace(trust, keys=keys)
