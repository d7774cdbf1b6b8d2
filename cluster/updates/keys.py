"""Trust as the registry stores it: signing keys and key groups <-> hierarchy.updates.TrustState.

Every change goes through the pure functions of ``hierarchy.updates.trust`` (``rotate_keys``,
``revoke_key``) on a TrustState loaded from the registry; the difference between the old and
the new state is then written in one transaction, with an event. So the rules (a new key set
needs a threshold of the old keys AND of the new keys; revocation needs root's threshold; a
group without keys is created by root) hold whatever the CLI or the server does.

The first root key is the exception (there is nothing to sign it): registering a root key
into a registry that has none creates root's group, like TUF's first root.json.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hierarchy.errors import KeyEncryptedError, KeyFormatError, RotationError, ThresholdError
from hierarchy.ids import NodeId
from hierarchy.secret_files import exposed_secret_file, read_passphrase
from hierarchy.updates.envelope import Signature, pae
from hierarchy.updates.keys import PASSPHRASE_ENV, PublicKey, SigningKey
from hierarchy.updates.trust import (
    ROTATION_PAYLOAD_TYPE,
    KeyGroup,
    KeyStatus,
    NodeVersion,
    Role,
    TrustedKey,
    TrustState,
    count_valid_signatures,
    revoke_key,
    rotate_keys,
    rotation_statement,
    sign_revocation,
    sign_rotation,
)
from registry.access import list_signing_keys
from registry.db import Registry
from registry.updates import AddEvent, AddKey, Change, RevokeKey, SetKeyGroup, apply_changes, list_key_groups

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "KeyFiles",
    "load_public_key",
    "load_rebase_key",
    "load_signing_key",
    "load_trust",
    "register_key",
    "revoke",
    "rotate",
    "trust_changes",
    "write_key_files",
]

PRIVATE_KEY_FILE = "private.pem"
PUBLIC_KEY_FILE = "public.pem"


@dataclass(frozen=True)
class KeyFiles:
    """Where ``treelm keys gen`` put a key pair."""

    private: Path
    public: Path
    keyid: str


def write_key_files(out: str | Path, key: SigningKey | None = None, password: bytes | None = None) -> KeyFiles:
    """A new (or the given) Ed25519 key in ``out``: private.pem (mode 0600, encrypted with
    ``password`` when given) and public.pem beside it."""
    out = Path(out)
    key = key or SigningKey.generate()
    private, public = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    if private.exists() or public.exists():
        raise KeyFormatError(f"{out} already holds a key; choose another --out (keys are never overwritten)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new key folder is private too
    # Created 0600 from the start: the secret is never readable by others, not even for a moment.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.to_pem(password))
    public.write_bytes(key.public.to_pem())
    return KeyFiles(private, public, key.keyid)


def load_rebase_key(path: str) -> SigningKey:
    """The key that signs rebased versions (the policy's ``rebase.key``); an encrypted one needs
    $TREELM_KEY_PASSPHRASE where the coordinator runs (as the feedback policy's key does)."""
    passphrase = os.environ.get("TREELM_KEY_PASSPHRASE")
    return load_signing_key(path, passphrase.encode() if passphrase else None)


def load_signing_key(path: str | Path, password: bytes | None = None) -> SigningKey:
    """A private key from a key directory (its private.pem) or a PEM file.

    An encrypted key opens with ``password``, else with $TREELM_KEY_PASSPHRASE; without either it
    is KeyEncryptedError naming the file and both ways to give the passphrase.
    """
    path = Path(path)
    file = path / PRIVATE_KEY_FILE if path.is_dir() else path
    exposed = exposed_secret_file(file)
    if exposed is not None:
        raise KeyFormatError(exposed)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise KeyFormatError(f"cannot read private key {file}: {exc.strerror or exc}") from None
    try:
        return SigningKey.from_pem(data, password if password is not None else read_passphrase())
    except KeyEncryptedError:
        raise KeyEncryptedError(f"key {file} is encrypted: set {PASSPHRASE_ENV} or pass --password-file") from None


def load_public_key(path: str | Path) -> PublicKey:
    """A public key from a key directory (its public.pem) or a PEM file."""
    path = Path(path)
    file = path / PUBLIC_KEY_FILE if path.is_dir() else path
    try:
        return PublicKey.from_pem(file.read_bytes())
    except OSError as exc:
        raise KeyFormatError(f"cannot read public key {file}: {exc.strerror or exc}") from None


def _public_text(public: PublicKey) -> str:
    return public.to_pem().decode("ascii")


def load_trust(reg: Registry, nodes: Sequence[NodeVersion] = ()) -> TrustState:
    """The registry's keys and key groups as a TrustState (with ``nodes``' versions, for verification).

    Keys whose stored text is not an Ed25519 public key, or whose id is not the sha256 of the key,
    are left out: they could never verify a signature anyway.
    """
    keys = []
    for record in list_signing_keys(reg):
        try:
            public = PublicKey.from_pem(record.public_key.encode())
        except KeyFormatError:
            continue
        if public.keyid != record.key_id:
            continue
        keys.append(TrustedKey(public, Role.parse(record.role), record.node_id, KeyStatus(record.status)))
    groups = tuple(KeyGroup(Role.parse(g.role), g.scope, g.threshold, g.version) for g in list_key_groups(reg))
    return TrustState(keys=tuple(keys), groups=groups, nodes=tuple(nodes))


def trust_changes(before: TrustState, after: TrustState) -> list[Change]:
    """The registry changes that turn ``before`` into ``after`` (keys added or revoked, groups)."""
    changes: list[Change] = []
    for key in after.keys:
        old = before.key(key.keyid)
        if old is None:
            changes.append(AddKey(key.keyid, _public_text(key.public), key.role.value, key.node))
            if not key.active:
                changes.append(RevokeKey(key.keyid))
        elif old.active and not key.active:
            changes.append(RevokeKey(key.keyid))
    for group in after.groups:
        if group not in before.groups:
            changes.append(SetKeyGroup(group.role.value, group.node, group.threshold, group.version))
    return changes


def _describe(trust: TrustState, role: Role, node: str | None) -> dict:
    group = trust.group(role, node)
    return {
        "role": role.value,
        "node": node,
        "threshold": group.threshold,
        "group_version": group.version,
        "keys": sorted(k.keyid for k in trust.active_keys(role, node)),
    }


def _commit(
    reg: Registry, before: TrustState, after: TrustState, event: str, node: str | None, detail: dict
) -> TrustState:
    apply_changes(reg, [*trust_changes(before, after), AddEvent(event, node=node, detail=detail)])
    return after


def register_key(
    reg: Registry,
    new: SigningKey,
    role: Role | str,
    node: str | None = None,
    signers: Sequence[SigningKey] = (),
    threshold: int | None = None,
) -> TrustState:
    """Add ``new`` to the group (role, node): a rotation to (current keys + new), signed by ``signers``.

    ``new`` itself always signs (proof that its owner holds the private key). The first root key
    of a registry needs no other signature; every other key needs the group's threshold of its
    current keys, or root's threshold when the group has no keys yet.
    """
    role = Role.parse(role)
    scope = str(NodeId.parse(node)) if node else None
    trust = load_trust(reg)
    if role is Role.ROOT and scope is not None:
        raise RotationError("root keys act for the whole registry; drop --node")
    if role is Role.ROOT and not any(k.role is Role.ROOT for k in trust.keys):
        wanted = threshold or 1
        if wanted != 1:
            raise RotationError("the first root key starts a group of one key: its threshold is 1")
        message = pae(ROTATION_PAYLOAD_TYPE, rotation_statement(trust, role, [new.public], 1))
        proof = sign_rotation(trust, role, [new.public], 1, [new])
        if not count_valid_signatures(message, proof, [new.public]):  # pragma: no cover - a broken key
            raise ThresholdError("the new root key could not sign")
        after = TrustState(
            keys=(*trust.keys, TrustedKey(new.public, Role.ROOT)),
            groups=(*[g for g in trust.groups if g.role is not Role.ROOT], KeyGroup(Role.ROOT, None, 1, 1)),
        )
        return _commit(reg, trust, after, "root-key-created", None, _describe(after, role, None))
    current = list(trust.active_keys(role, scope))
    if any(k.keyid == new.keyid for k in current):
        raise RotationError(f"key {new.keyid[:16]}... is already in group {role.value}/{scope or '*'}")
    keys = [k.public for k in current] + [new.public]
    wanted = threshold or trust.threshold(role, scope)
    signatures = sign_rotation(trust, role, keys, wanted, [*signers, new], node=scope)
    after = rotate_keys(trust, role, keys, wanted, signatures, node=scope)
    return _commit(reg, trust, after, "key-registered", scope, _describe(after, role, scope) | {"added": new.keyid})


def rotate(
    reg: Registry,
    role: Role | str,
    new_keys: Sequence[PublicKey],
    threshold: int,
    signers: Sequence[SigningKey],
    node: str | None = None,
) -> TrustState:
    """Replace the group's keys by ``new_keys`` (old keys left out are revoked for good)."""
    role = Role.parse(role)
    scope = str(NodeId.parse(node)) if node else None
    trust = load_trust(reg)
    signatures: tuple[Signature, ...] = sign_rotation(trust, role, list(new_keys), threshold, list(signers), node=scope)
    after = rotate_keys(trust, role, list(new_keys), threshold, signatures, node=scope)
    return _commit(reg, trust, after, "keys-rotated", scope, _describe(after, role, scope))


def revoke(reg: Registry, keyid: str, signers: Sequence[SigningKey]) -> TrustState:
    """Revoke one key for good; needs root's threshold of root signatures."""
    trust = load_trust(reg)
    after = revoke_key(trust, keyid, sign_revocation(keyid, list(signers)))
    if after is trust:  # already revoked: revocation is permanent, nothing to record
        return trust
    key = after.key(keyid)
    return _commit(
        reg,
        trust,
        after,
        "key-revoked",
        key.node if key else None,
        {"keyid": keyid, "role": key.role.value if key else None},
    )
