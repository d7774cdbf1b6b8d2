"""Ed25519 keys: generation, serialisation, key ids, signing and verifying bytes.

A key id is the sha256 (hex) of the 32 raw public-key bytes, so it names the key
itself and cannot be chosen by a signer. Keys sign whatever bytes they are given;
the protocol always hands them DSSE pre-authentication encodings (see envelope.py).
Writing key files (mode 0600) is the CLI's job: this module returns bytes only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hierarchy.errors import KeyEncryptedError, KeyFormatError

__all__ = ["PASSPHRASE_ENV", "PublicKey", "SigningKey", "is_encrypted_pem", "key_id"]

# Where every loader of a private key (CLI, server, SDK) looks for its passphrase by default.
PASSPHRASE_ENV = "TREELM_KEY_PASSPHRASE"

_RAW_LEN = 32
SIGNATURE_LEN = 64


def is_encrypted_pem(data: bytes) -> bool:
    """Whether PEM bytes hold an encrypted private key (PKCS#8, or OpenSSL's legacy Proc-Type header)."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def key_id(raw_public: bytes) -> str:
    """sha256 hex of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(raw_public).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key, held as its 32 raw bytes."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != _RAW_LEN:
            raise KeyFormatError(f"an Ed25519 public key is {_RAW_LEN} raw bytes, got {len(self.raw)!r}")
        try:
            Ed25519PublicKey.from_public_bytes(self.raw)
        except ValueError as exc:
            raise KeyFormatError(f"not an Ed25519 public key: {exc}") from exc

    @property
    def keyid(self) -> str:
        return key_id(self.raw)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        try:
            return cls(bytes.fromhex(text))
        except (ValueError, TypeError) as exc:
            raise KeyFormatError(f"public key must be {2 * _RAW_LEN} hex characters: {exc}") from exc

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError(f"cannot read PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFormatError(f"expected an Ed25519 public key, got {type(key).__name__}")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def to_pem(self) -> bytes:
        return self._key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True only for a valid signature of exactly ``message``; never raises on a bad one."""
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
            return False
        try:
            self._key().verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def _key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey(keyid={self.keyid[:12]}...)"


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key (its 32-byte seed, never shown in repr)."""

    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != _RAW_LEN:
            raise KeyFormatError(f"an Ed25519 private key is a {_RAW_LEN}-byte seed")

    @classmethod
    def generate(cls) -> SigningKey:
        key = Ed25519PrivateKey.generate()
        return cls(
            key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        )

    @classmethod
    def from_pem(cls, data: bytes, password: bytes | None = None) -> SigningKey:
        """The key in PEM ``data``; ``password`` opens an encrypted one and is ignored for a plain one
        (one passphrase in the environment must not break the unencrypted keys beside it)."""
        encrypted = is_encrypted_pem(data)
        if encrypted and not password:
            raise KeyEncryptedError("this private key is encrypted and no passphrase was given")
        if not encrypted:
            password = None
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError(f"cannot read PEM private key (wrong password?): {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFormatError(f"expected an Ed25519 private key, got {type(key).__name__}")
        return cls(
            key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        )

    def to_pem(self, password: bytes | None = None) -> bytes:
        """PKCS#8 PEM; encrypted with the best available scheme when ``password`` is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self._key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    @property
    def public(self) -> PublicKey:
        return PublicKey(
            self._key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, message: bytes) -> bytes:
        return self._key().sign(message)

    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid[:12]}...)"
