"""Values of pulling a model onto a device: what the server offers, what a pull did, and its errors.

PullError (PicklableError)    a pull that did not produce a ready directory (nothing half-written is left)
├── VerificationFailed        a signature, delegation, manifest or file hash that does not verify
└── DiskError                 the output directory cannot be written (not writable, disk full)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Offer",
    "PullResult",
    "TrustBundle",
    "UpdateCheck",
    "offer_from_proto",
    "trust_from_proto",
]


@dataclass(frozen=True)
class Offer:
    """A variant as a server offers it: signed manifest, root's delegation, and the base it runs over."""

    manifest: bytes  # DSSE envelope JSON of the canonical variant manifest
    delegation: bytes  # DSSE envelope JSON of root's delegation of the signing key(s)
    requires: Offer | None = None
    stable_note: str = ""  # which update made the version and who approved it, when one did


@dataclass(frozen=True)
class TrustBundle:
    """The root keys a server reports (raw Ed25519 public keys), their threshold, the tree's delegation."""

    root_keys: tuple[bytes, ...]
    root_threshold: int
    delegation: bytes


@dataclass(frozen=True)
class PullResult:
    """A finished pull: a verified directory, ready to run offline."""

    directory: Path
    node: str
    version: int
    variant: str
    key: str  # the variant's content key
    files: tuple[str, ...]
    bytes_total: int  # every file of the variant and of the base it runs over
    bytes_transferred: int  # what travelled this time (less after an interrupted pull)
    signers: tuple[str, ...]  # key ids of the manifest's valid signatures
    base_dir: Path | None = None  # the base variant (flat, gguf-lora), inside ``directory``
    stable_note: str = ""
    upgraded_from: int | None = None  # the version replaced by an upgrade

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.directory),
            "node": self.node,
            "version": self.version,
            "variant": self.variant,
            "key": self.key,
            "files": list(self.files),
            "bytes": self.bytes_total,
            "bytes_transferred": self.bytes_transferred,
            "signers": list(self.signers),
            "base_dir": str(self.base_dir) if self.base_dir else None,
            "stable_note": self.stable_note,
            "upgraded_from": self.upgraded_from,
        }


@dataclass(frozen=True)
class UpdateCheck:
    """What ``pull --check`` found: the pulled version against the server's stable one."""

    directory: Path
    node: str
    variant: str
    current: int
    stable: int
    note: str = ""  # why the stable version is what it is (its update, its approvals)
    details: dict[str, Any] = field(default_factory=dict)
    # The chains ("en@v1 -> en/medical@v2 -> ...") of the pulled copy and of what the server serves:
    # a re-pin over a new parent version changes the weights without a new version of the node.
    current_chain: str = ""
    stable_chain: str = ""

    @property
    def repinned(self) -> bool:
        """The same version of the node, served over another chain of ancestors' versions."""
        return self.stable == self.current and bool(self.current_chain) and self.stable_chain != self.current_chain

    @property
    def newer(self) -> bool:
        return self.stable > self.current or self.repinned

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.directory),
            "node": self.node,
            "variant": self.variant,
            "current": self.current,
            "stable": self.stable,
            "newer": self.newer,
            "repinned": self.repinned,
            "current_chain": self.current_chain,
            "stable_chain": self.stable_chain,
            "note": self.note,
        }


def offer_from_proto(message: Any) -> Offer:
    requires = offer_from_proto(message.requires) if message.HasField("requires") else None
    return Offer(bytes(message.manifest), bytes(message.delegation), requires, str(message.stable_note))


def trust_from_proto(message: Any) -> TrustBundle:
    return TrustBundle(
        tuple(bytes(k) for k in message.root_keys), int(message.root_threshold), bytes(message.delegation)
    )
