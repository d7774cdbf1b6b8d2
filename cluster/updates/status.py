"""Values the coordinator returns, and the check of operator statements (hierarchy.updates.statements)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hierarchy.errors import RevokedKeyError, ThresholdError, UnknownKeyError
from hierarchy.updates.envelope import Signature, pae, sign_payload
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.trust import Role, TrustState, count_valid_signatures
from registry.updates import UpdateEntry

__all__ = ["RollbackResult", "UpdateStatus", "check_operator", "flatten_figures", "sign_statement"]


def sign_statement(payload_type: str, statement: bytes, keys: Sequence[SigningKey]) -> tuple[Signature, ...]:
    return sign_payload(payload_type, statement, keys)


def check_operator(
    trust: TrustState, payload_type: str, statement: bytes, signatures: Sequence[Signature], node: str
) -> tuple[str, ...]:
    """Key ids of operator keys acting for ``node`` whose signatures verify; ThresholdError if too few."""
    for s in signatures:
        key = trust.key(s.keyid)
        if key is None:
            raise UnknownKeyError(f"key {s.keyid[:16]}... is not registered", keyid=s.keyid)
        if not key.active:
            raise RevokedKeyError(f"key {s.keyid[:16]}... was revoked", keyid=s.keyid)
    valid = count_valid_signatures(pae(payload_type, statement), signatures, trust.keys_acting_for(Role.OPERATOR, node))
    needed = trust.threshold(Role.OPERATOR, node)
    if len(valid) < needed:
        raise ThresholdError(
            f"{len(valid)} valid operator signature(s) for {node}, {needed} required "
            "(an operator key acting for the node must sign this exact statement)",
            needed=needed,
            valid=len(valid),
        )
    return valid


@dataclass(frozen=True)
class UpdateStatus:
    """Where one update stands (``treelm update status``, Updates.GetStatus)."""

    update_id: str
    kind: str  # package | candidate | contribution
    node: str  # whose version it is
    version: int
    parent: str  # the parent it contributes to
    parent_version: int  # the parent version it was made over
    state: str  # pending | aggregated | absorbed | awaiting-approval | stable | rejected
    reasons: tuple[str, ...]
    approvals: int
    approvals_needed: int
    candidate_id: str | None  # the parent candidate it went into
    figures: Mapping[str, float] = field(default_factory=dict)  # flattened numbers: screening, gate
    manifest_digest: str = ""
    envelope: bytes = field(default=b"", repr=False)  # what approvers sign (DSSE PAE of it)

    @classmethod
    def from_entry(cls, entry: UpdateEntry, needed: int) -> UpdateStatus:
        return cls(
            update_id=entry.update_id,
            kind=entry.kind,
            node=entry.node_id,
            version=entry.version,
            parent=entry.target,
            parent_version=entry.parent_version,
            state=entry.state,
            reasons=tuple(entry.reasons),
            approvals=len(entry.approvals),
            approvals_needed=needed if entry.kind == "candidate" else 0,
            candidate_id=entry.round_id,
            figures=flatten_figures(entry.figures),
            manifest_digest=entry.manifest_digest,
            envelope=entry.envelope.encode(),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "update_id": self.update_id,
            "kind": self.kind,
            "node": self.node,
            "version": self.version,
            "parent": self.parent,
            "parent_version": self.parent_version,
            "state": self.state,
            "reasons": list(self.reasons),
            "approvals": self.approvals,
            "approvals_needed": self.approvals_needed,
            "candidate_id": self.candidate_id,
            "figures": dict(self.figures),
            "manifest_digest": self.manifest_digest,
        }


@dataclass(frozen=True)
class RollbackResult:
    node: str
    alias: str
    version: int
    previous_version: int
    held: tuple[str, ...] = ()  # nodes that could not follow and stay on their chain


def flatten_figures(figures: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a nested figures record as ``a.b.c`` keys (gate checks by their name)."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, (bool, int, float)):
            out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(flatten_figures(value, name + "."))
        elif isinstance(value, list) and key == "checks":
            for check in value:
                if isinstance(check, Mapping) and "name" in check:
                    out[f"{name}.{check['name']}.change"] = float(check["change"])
    return out
