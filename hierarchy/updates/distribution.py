"""Who may sign variant manifests for devices, and the check a device runs before it trusts a download.

Variants are built on first request, so they are signed online, by a server's *variant signing
key*, never by root keys (those stay offline). Root delegates once, offline: a
:class:`SignerDelegation` names the tree, the public keys that may sign its variant
manifests, and how many of them must, and a threshold of root keys signs it (a DSSE
envelope). A device is given the root keys' fingerprints (their key ids: sha256 of the raw
public key), out of band or confirmed once; :func:`verify_variant` then checks, in order and
with no I/O:

1. the delegation is signed by at least ``root_threshold`` of the device's root keys;
2. the manifest envelope is signed by at least the delegation's threshold of its keys;
3. the manifest is a canonical variant manifest of the delegation's tree.

Any failure raises a typed error of the update protocol (``UnknownKeyError``, ``ThresholdError``,
``EnvelopeError``, ``ManifestError``) and nothing is trusted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hierarchy.errors import EnvelopeError, ManifestError, ThresholdError, UnknownKeyError
from hierarchy.updates.envelope import Envelope, sign_envelope
from hierarchy.updates.keys import PublicKey, SigningKey
from hierarchy.updates.trust import count_valid_signatures
from hierarchy.updates.variants import VARIANT_PAYLOAD_TYPE, VariantManifest, parse_variant_manifest

__all__ = [
    "DELEGATION_PAYLOAD_TYPE",
    "SignerDelegation",
    "parse_delegation",
    "sign_delegation",
    "verify_variant",
]

DELEGATION_PAYLOAD_TYPE = "application/vnd.treelm.variant-signers.v1+json"
_TREE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class SignerDelegation:
    """Root's statement: ``keys`` may sign variant manifests of ``tree``, ``threshold`` of them at once."""

    tree: str
    keys: tuple[PublicKey, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.tree, str) or not _TREE.match(self.tree):
            raise ManifestError(f"delegation: tree {self.tree!r} is not a tree name", field="tree")
        keys = tuple(self.keys)
        if not keys or not all(isinstance(k, PublicKey) for k in keys) or len({k.keyid for k in keys}) != len(keys):
            raise ManifestError("delegation: name at least one signing key, each once", field="keys")
        object.__setattr__(self, "keys", tuple(sorted(keys, key=lambda k: k.keyid)))
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= len(keys):
            raise ManifestError(f"delegation: threshold must be 1..{len(keys)}, got {t!r}", field="threshold")

    def to_bytes(self) -> bytes:
        body = {"keys": [k.hex for k in self.keys], "threshold": self.threshold, "tree": self.tree}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def parse_delegation(payload: bytes) -> SignerDelegation:
    """The delegation in its canonical bytes; anything else is refused."""
    try:
        obj: Any = json.loads(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"delegation is not UTF-8 JSON: {exc}", field="delegation") from exc
    if not isinstance(obj, dict) or set(obj) != {"keys", "threshold", "tree"} or not isinstance(obj["keys"], list):
        raise ManifestError("delegation must be {keys, threshold, tree}", field="delegation")
    delegation = SignerDelegation(obj["tree"], tuple(PublicKey.from_hex(str(k)) for k in obj["keys"]), obj["threshold"])
    if delegation.to_bytes() != payload:
        raise ManifestError("delegation bytes are not in canonical form", field="delegation")
    return delegation


def sign_delegation(delegation: SignerDelegation, root_signers: Sequence[SigningKey]) -> Envelope:
    """The delegation as a DSSE envelope signed by each of ``root_signers`` (offline, by root)."""
    return sign_envelope(DELEGATION_PAYLOAD_TYPE, delegation.to_bytes(), root_signers)


def _signed_by(envelope: Envelope, keys: Iterable[PublicKey], threshold: int, what: str) -> tuple[str, ...]:
    keys = tuple(keys)
    valid = count_valid_signatures(envelope.pae(), envelope.signatures, keys)
    if len(valid) >= threshold:
        return valid
    known = {k.keyid for k in keys}
    if not any(s.keyid in known for s in envelope.signatures):
        ids = ", ".join(s.keyid[:12] for s in envelope.signatures) or "none"
        raise UnknownKeyError(f"{what} is not signed by any key trusted for it (signed by: {ids})")
    raise ThresholdError(f"{what} has {len(valid)} valid signature(s) of trusted keys; {threshold} needed")


def verify_variant(
    manifest: Envelope,
    delegation: Envelope,
    roots: Sequence[PublicKey],
    root_threshold: int = 1,
) -> tuple[VariantManifest, SignerDelegation, tuple[str, ...]]:
    """Check a variant manifest from root keys down (see the module doc).

    Returns the manifest, the delegation and the key ids of the manifest's valid signers.
    """
    if delegation.payload_type != DELEGATION_PAYLOAD_TYPE:
        raise EnvelopeError(f"expected a {DELEGATION_PAYLOAD_TYPE} envelope, got {delegation.payload_type!r}")
    if not roots or root_threshold < 1:
        raise ThresholdError("no root keys to verify against: give the root keys' fingerprints")
    _signed_by(delegation, roots, root_threshold, "the variant signers' delegation")
    signers = parse_delegation(delegation.payload)
    if manifest.payload_type != VARIANT_PAYLOAD_TYPE:
        raise EnvelopeError(f"expected a {VARIANT_PAYLOAD_TYPE} envelope, got {manifest.payload_type!r}")
    valid = _signed_by(manifest, signers.keys, signers.threshold, "the variant manifest")
    parsed = parse_variant_manifest(manifest.payload)
    if parsed.node.tree != signers.tree:
        raise ManifestError(
            f"the manifest is for tree {parsed.node.tree!r}; its signers are delegated for {signers.tree!r}",
            field="node",
        )
    return parsed, signers, valid
