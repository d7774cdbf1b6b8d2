"""DSSE envelopes: a payload, its type, and signatures over the pre-authentication encoding.

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

(LEN is the byte length in ASCII decimal, SP one space.) Signatures cover these
exact bytes, never a re-serialisation of the payload, and bind the payload type
too, so a key-rotation statement can never pass as an update. On the wire:

    {"payload": "<base64>", "payloadType": "...", "signatures": [{"keyid": "...", "sig": "<base64>"}]}
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hierarchy.errors import EnvelopeError
from hierarchy.updates.keys import SigningKey

__all__ = ["Envelope", "Signature", "pae", "sign_envelope", "sign_payload"]

# More signatures than this is not a real threshold, only work for the verifier.
MAX_SIGNATURES = 32


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of (type, payload)."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    """One signature: the signer's key id and the 64 signature bytes."""

    keyid: str
    sig: bytes = b""

    def __repr__(self) -> str:
        return f"Signature(keyid={self.keyid[:12]}..., sig={self.sig[:6].hex()}...)"


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope. ``payload`` is the exact signed bytes."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.payload_type, str) or not self.payload_type:
            raise EnvelopeError("envelope field 'payloadType' must be a non-empty string")
        if not isinstance(self.payload, bytes):
            raise EnvelopeError("envelope field 'payload' must be bytes")
        object.__setattr__(self, "signatures", tuple(self.signatures))
        if len(self.signatures) > MAX_SIGNATURES:
            raise EnvelopeError(f"envelope has {len(self.signatures)} signatures; at most {MAX_SIGNATURES} allowed")

    def pae(self) -> bytes:
        return pae(self.payload_type, self.payload)

    def with_signatures(self, *signatures: Signature) -> Envelope:
        """A new envelope with ``signatures`` appended (co-signing never re-encodes the payload)."""
        return Envelope(self.payload_type, self.payload, (*self.signatures, *signatures))

    def to_dict(self) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in self.signatures],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        try:
            obj = json.loads(data, object_pairs_hook=_no_duplicates)
        except EnvelopeError:
            raise
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeError(f"envelope is not JSON: {exc}") from exc
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> Envelope:
        if not isinstance(obj, dict):
            raise EnvelopeError("envelope must be a JSON object")
        extra = set(obj) - {"payload", "payloadType", "signatures"}
        if extra:
            raise EnvelopeError(f"envelope has unknown field(s): {', '.join(sorted(extra))}")
        payload_type = obj.get("payloadType")
        if not isinstance(payload_type, str):
            raise EnvelopeError("envelope field 'payloadType' must be a string")
        payload = _b64("payload", obj.get("payload"))
        sigs = obj.get("signatures", [])
        if not isinstance(sigs, list):
            raise EnvelopeError("envelope field 'signatures' must be a list")
        if len(sigs) > MAX_SIGNATURES:
            raise EnvelopeError(f"envelope has {len(sigs)} signatures; at most {MAX_SIGNATURES} allowed")
        signatures = []
        for i, s in enumerate(sigs):
            if not isinstance(s, dict) or not isinstance(s.get("keyid"), str) or set(s) - {"keyid", "sig"}:
                raise EnvelopeError(f"envelope field 'signatures[{i}]' must be {{'keyid': str, 'sig': base64}}")
            signatures.append(Signature(s["keyid"], _b64(f"signatures[{i}].sig", s.get("sig"))))
        return cls(payload_type, payload, tuple(signatures))


def sign_payload(payload_type: str, payload: bytes, signers: Sequence[SigningKey]) -> tuple[Signature, ...]:
    """One signature per signer over PAE(payload_type, payload)."""
    message = pae(payload_type, payload)
    return tuple(Signature(key.keyid, key.sign(message)) for key in signers)


def sign_envelope(payload_type: str, payload: bytes, signers: Sequence[SigningKey]) -> Envelope:
    return Envelope(payload_type, payload, sign_payload(payload_type, payload, signers))


def _b64(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeError(f"envelope field {name!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError(f"envelope field {name!r} is not valid base64: {exc}") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that keep different copies of a duplicated key would read different documents.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise EnvelopeError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out
