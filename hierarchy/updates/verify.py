"""The update verifier: a pure state machine, checks in a fixed order, nothing changed.

``verify_update(trust, envelope, files, now, expectations)`` runs, in this order,
and raises the first failure's own error type:

    keys       every signature names a known, unrevoked key     UnknownKeyError / RevokedKeyError
    threshold  enough valid signatures over the DSSE PAE bytes  ThresholdError
               from keys acting for the manifest's node
    manifest   the signed payload is a canonical manifest       ManifestError
    expiry     now < expires                                    ExpiredError
    version    version == current + 1                           ReplayError / RollbackError / SkippedVersionError
    files      every signed file present, length, sha256        Missing/Length/Hash/UnexpectedFileError
    parent     parent_version == the parent's current version   StaleParentError / UnknownParentVersionError
    base       base digest == the receiver's base               BaseMismatchError
    shapes     layers (and real tensor shapes) fit the parent   ShapeMismatchError

The manifest is parsed only after at least a threshold of signatures from keys of
the signer role verify (its node then decides which of them count: scoped keys act
for one node only). Inputs are never mutated; success returns a VerifiedUpdate,
which ``apply_to_trust`` turns into a new TrustState after re-checking what may
have moved since (signers, versions).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hierarchy.errors import (
    BaseMismatchError,
    ExpiredError,
    HashMismatchError,
    LengthMismatchError,
    ManifestError,
    MissingFileError,
    ReplayError,
    RevokedKeyError,
    RollbackError,
    ShapeMismatchError,
    SkippedVersionError,
    StaleParentError,
    ThresholdError,
    UnexpectedFileError,
    UnknownKeyError,
    UnknownParentVersionError,
)
from hierarchy.updates.envelope import Envelope, Signature
from hierarchy.updates.manifest import (
    ADAPTER_FORMAT,
    UPDATE_PAYLOAD_TYPE,
    UpdateManifest,
    format_time,
    parse_manifest,
    sha256_digest,
)
from hierarchy.updates.tensor_header import lora_shapes, read_tensor_shapes
from hierarchy.updates.trust import Role, TrustState, count_valid_signatures

__all__ = [
    "VERIFICATION_CHECKS",
    "Expectations",
    "FileMeasure",
    "LayerShape",
    "VerifiedUpdate",
    "apply_to_trust",
    "check_approvals",
    "check_parent",
    "check_version",
    "verify_envelope",
    "verify_update",
]

VERIFICATION_CHECKS = ("keys", "threshold", "manifest", "expiry", "version", "files", "parent", "base", "shapes")


@dataclass(frozen=True)
class FileMeasure:
    """A payload file measured while streaming it (so the verifier needs no bytes)."""

    sha256: str
    length: int

    @classmethod
    def of(cls, data: bytes) -> FileMeasure:
        return cls(hashlib.sha256(data).hexdigest(), len(data))


FileInput = bytes | bytearray | memoryview | FileMeasure


@dataclass(frozen=True, order=True)
class LayerShape:
    """One linear layer of the parent an update must adapt: [out_features, in_features]."""

    module: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class Expectations:
    """What the receiver knows about the parent: its base, its adapted layers, who signs updates."""

    base_digest: str  # sha256:<hex>
    layers: tuple[LayerShape, ...]  # accepts {module: (out, in)}
    max_rank: int | None = None  # refuse adapters of higher rank (memory, screening cost)
    signer_role: Role = Role.NODE

    def __post_init__(self) -> None:
        layers: Any = self.layers
        if isinstance(layers, Mapping):
            layers = [LayerShape(m, int(s[0]), int(s[1])) for m, s in layers.items()]
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        object.__setattr__(self, "signer_role", Role.parse(self.signer_role))
        if not self.layers:
            raise ValueError("expectations need at least one layer shape")


@dataclass(frozen=True)
class VerifiedUpdate:
    """An update that passed every check; the only input ``apply_to_trust`` accepts."""

    manifest: UpdateManifest
    manifest_digest: str  # sha256:<hex> of the exact signed payload bytes
    signers: tuple[str, ...]  # key ids whose signatures counted toward the threshold
    previous_version: int  # the node's version when verified (manifest.version - 1)
    tensor_shapes_checked: bool  # False when only measures (no bytes) of .safetensors files were given
    signer_role: Role = Role.NODE
    checks: tuple[str, ...] = VERIFICATION_CHECKS


def _utc(now: datetime | int | float) -> datetime:
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (UTC); got a naive datetime")
        return now.astimezone(UTC)
    return datetime.fromtimestamp(float(now), tz=UTC)


def _check_keys(trust: TrustState, envelope: Envelope) -> None:
    for i, s in enumerate(envelope.signatures):
        key = trust.key(s.keyid)
        if key is None:
            raise UnknownKeyError(
                f"signature {i} is by key {s.keyid[:16]}..., which this registry does not know "
                "(register its public key first)",
                keyid=s.keyid,
                index=i,
            )
        if not key.active:
            raise RevokedKeyError(
                f"signature {i} is by key {s.keyid[:16]}... ({key.role.value}), which was revoked",
                keyid=s.keyid,
                index=i,
            )


def _check_threshold(trust: TrustState, envelope: Envelope, role: Role) -> tuple[UpdateManifest, tuple[str, ...]]:
    message = envelope.pae()
    role_keys = [k for k in trust.keys if k.active and k.role is role]
    valid = count_valid_signatures(message, envelope.signatures, role_keys)
    floor = min((g.threshold for g in trust.groups if g.role is role), default=1)
    if len(valid) < floor:
        raise ThresholdError(
            f"{len(valid)} valid {role.value} signature(s) over the envelope, at least {floor} required "
            f"({len(envelope.signatures)} signature(s) present; signatures cover the exact payload bytes)",
            needed=floor,
            valid=len(valid),
        )
    if envelope.payload_type != UPDATE_PAYLOAD_TYPE:
        raise ManifestError(f"payload type is {envelope.payload_type!r}, expected {UPDATE_PAYLOAD_TYPE!r}")
    manifest = parse_manifest(envelope.payload)
    acting = {k.keyid for k in trust.keys_acting_for(role, manifest.node)}
    counted = tuple(k for k in valid if k in acting)
    needed = trust.threshold(role, manifest.node)
    if len(counted) < needed:
        raise ThresholdError(
            f"{len(counted)} valid signature(s) from {role.value} keys acting for {manifest.node}, {needed} required"
            + (
                f" ({len(valid) - len(counted)} more by keys scoped to other nodes)"
                if len(valid) > len(counted)
                else ""
            ),
            needed=needed,
            valid=len(counted),
        )
    return manifest, counted


def _check_expiry(manifest: UpdateManifest, now: datetime) -> None:
    if now >= manifest.expires:
        raise ExpiredError(
            f"update expired at {format_time(manifest.expires)} (now {format_time(now)}); ask the sender to re-sign",
            expires=format_time(manifest.expires),
            now=format_time(now),
        )


def check_version(trust: TrustState, manifest: UpdateManifest) -> int:
    """The node's current version, or the VersionError subtype that says why ``manifest`` is not next."""
    current, got = trust.version_of(manifest.node), manifest.version
    details = {"node": str(manifest.node), "current": current, "got": got}
    if got == current:
        raise ReplayError(f"{manifest.node} is already at version {current}: this update was applied before", **details)
    if got < current:
        raise RollbackError(f"{manifest.node} is at version {current}; version {got} would roll it back", **details)
    if got > current + 1:
        raise SkippedVersionError(
            f"{manifest.node} is at version {current}; version {got} skips {got - current - 1} version(s) "
            f"(expected {current + 1})",
            **details,
        )
    return current


def _check_files(manifest: UpdateManifest, files: Mapping[str, FileInput]) -> None:
    for entry in manifest.files:
        if entry.name not in files:
            raise MissingFileError(f"payload file {entry.name!r} is signed but missing", file=entry.name)
        got = files[entry.name]
        measure = got if isinstance(got, FileMeasure) else FileMeasure.of(bytes(got))
        if measure.length != entry.length:
            raise LengthMismatchError(
                f"payload file {entry.name!r} has {measure.length} bytes, the manifest signs {entry.length}",
                file=entry.name,
                expected=entry.length,
                got=measure.length,
            )
        if measure.sha256 != entry.sha256:
            raise HashMismatchError(
                f"payload file {entry.name!r} has sha256 {measure.sha256[:16]}..., "
                f"the manifest signs {entry.sha256[:16]}...: the file was altered",
                file=entry.name,
                expected=entry.sha256,
                got=measure.sha256,
            )
    extra = sorted(set(files) - {e.name for e in manifest.files})
    if extra:
        raise UnexpectedFileError(f"file(s) not signed by the manifest: {', '.join(extra)}", files=extra)


def check_parent(trust: TrustState, manifest: UpdateManifest) -> None:
    """StaleParentError unless the update was trained over the parent's current version."""
    current, got = trust.version_of(manifest.parent), manifest.parent_version
    details = {"parent": str(manifest.parent), "current": current, "got": got}
    if got < current:
        raise StaleParentError(
            f"trained over {manifest.parent} version {got}, but the parent is now at version {current}: "
            "re-train (or re-base) the update over the current parent",
            **details,
        )
    if got > current:
        raise UnknownParentVersionError(
            f"trained over {manifest.parent} version {got}, newer than this receiver's version {current}", **details
        )


def _check_base(manifest: UpdateManifest, expectations: Expectations) -> None:
    if manifest.base_digest != expectations.base_digest:
        raise BaseMismatchError(
            f"trained over base {manifest.base_digest[:19]}..., this tree's base is {expectations.base_digest[:19]}...",
            expected=expectations.base_digest,
            got=manifest.base_digest,
        )


def _check_shapes(manifest: UpdateManifest, files: Mapping[str, FileInput], expectations: Expectations) -> bool:
    if manifest.adapter_format != ADAPTER_FORMAT:
        raise ShapeMismatchError(f"adapter format {manifest.adapter_format!r} is not {ADAPTER_FORMAT!r}")
    expected = {s.module: s for s in expectations.layers}
    declared = {s.module: s for s in manifest.layers}
    missing, extra = sorted(set(expected) - set(declared)), sorted(set(declared) - set(expected))
    if missing or extra:
        raise ShapeMismatchError(
            f"adapted layers differ from the parent's: missing {missing or 'none'}, unexpected {extra or 'none'}",
            missing=missing,
            unexpected=extra,
        )
    for module, spec in declared.items():
        want = expected[module]
        if (spec.out_features, spec.in_features) != (want.out_features, want.in_features):
            raise ShapeMismatchError(
                f"layer {module} is {spec.out_features}x{spec.in_features} in the update, "
                f"{want.out_features}x{want.in_features} in the parent",
                module=module,
            )
        if expectations.max_rank is not None and spec.rank > expectations.max_rank:
            raise ShapeMismatchError(
                f"layer {module} has rank {spec.rank} > the allowed {expectations.max_rank}", module=module
            )
    checked = True
    for entry in manifest.files:
        if not entry.name.endswith(".safetensors"):
            continue
        data = files[entry.name]
        if isinstance(data, FileMeasure):
            checked = False  # measured while streaming: the loader must compare shapes on load
            continue
        actual = lora_shapes(read_tensor_shapes(bytes(data), entry.name))
        if set(actual) != set(declared):
            raise ShapeMismatchError(
                f"{entry.name} holds LoRA tensors for {sorted(actual)}, the manifest declares {sorted(declared)}",
                file=entry.name,
            )
        for module, spec in declared.items():
            want_ab = {"A": (spec.rank, spec.in_features), "B": (spec.out_features, spec.rank)}
            if actual[module] != want_ab:
                raise ShapeMismatchError(
                    f"{entry.name}: layer {module} has tensors {actual[module]}, the manifest declares {want_ab}",
                    file=entry.name,
                    module=module,
                )
    return checked


def verify_envelope(
    trust: TrustState, envelope: Envelope, now: datetime | int | float, signer_role: Role = Role.NODE
) -> tuple[UpdateManifest, tuple[str, ...], int]:
    """The checks that need no payload bytes (keys, threshold, manifest, expiry, version), in
    verify_update's order: a streamed upload runs them on its first chunk, before taking any payload.
    Returns the manifest, the signers that counted and the node's current version."""
    when = _utc(now)
    _check_keys(trust, envelope)
    manifest, signers = _check_threshold(trust, envelope, signer_role)
    _check_expiry(manifest, when)
    return manifest, signers, check_version(trust, manifest)


def verify_update(
    trust: TrustState,
    envelope: Envelope,
    files: Mapping[str, FileInput],
    now: datetime | int | float,
    expectations: Expectations,
) -> VerifiedUpdate:
    """Run every check in order (see the module docstring); raise the first failure's own error."""
    manifest, signers, previous = verify_envelope(trust, envelope, now, expectations.signer_role)
    _check_files(manifest, files)
    check_parent(trust, manifest)
    _check_base(manifest, expectations)
    shapes_checked = _check_shapes(manifest, files, expectations)
    return VerifiedUpdate(
        manifest, sha256_digest(envelope.payload), signers, previous, shapes_checked, expectations.signer_role
    )


def apply_to_trust(trust: TrustState, verified: VerifiedUpdate) -> TrustState:
    """A new TrustState with the node at the verified version, pinned to its parent version.

    Re-checks what may have changed since verification (a key revoked, a threshold
    raised, another update applied, a new parent version) and raises the same error
    types as verify_update; ``trust`` itself is never modified.
    """
    m, role = verified.manifest, verified.signer_role
    for keyid in verified.signers:
        key = trust.key(keyid)
        if key is None:
            raise UnknownKeyError(f"signer {keyid[:16]}... is no longer known", keyid=keyid)
        if not key.active:
            raise RevokedKeyError(f"signer {keyid[:16]}... was revoked after verification", keyid=keyid)
    acting = {k.keyid for k in trust.keys_acting_for(role, m.node)}
    counted = [k for k in verified.signers if k in acting]
    if len(counted) < trust.threshold(role, m.node):
        raise ThresholdError(
            f"{len(counted)} signer(s) still act for {m.node}, {trust.threshold(role, m.node)} required now"
        )
    check_version(trust, m)
    check_parent(trust, m)
    return trust.with_node_version(m.node, m.version, m.parent_version)


def check_approvals(
    trust: TrustState,
    envelope: Envelope,
    approvals: Sequence[Signature],
    required: Mapping[Role, int],
    node: str,
) -> dict[Role, tuple[str, ...]]:
    """Key ids per role whose approval of ``envelope`` verifies; ThresholdError if a role falls short.

    Approvals are detached signatures over the same PAE bytes as the update itself
    (so they approve exactly that manifest), by keys of ``required``'s roles acting
    for ``node`` (usually the parent): e.g. {EVALUATOR: 1, OPERATOR: 1}. Unknown or
    revoked approval keys raise UnknownKeyError / RevokedKeyError first.
    """
    _check_keys(trust, Envelope(envelope.payload_type, envelope.payload, tuple(approvals)))
    message = envelope.pae()
    out: dict[Role, tuple[str, ...]] = {}
    for role, needed in sorted(required.items(), key=lambda kv: Role.parse(kv[0]).value):
        role = Role.parse(role)
        got = count_valid_signatures(message, approvals, trust.keys_acting_for(role, node))
        if len(got) < needed:
            raise ThresholdError(
                f"{len(got)} valid {role.value} approval(s) for {node}, {needed} required",
                role=role.value,
                needed=needed,
                valid=len(got),
            )
        out[role] = got
    return out
