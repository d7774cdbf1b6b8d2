"""Status codes for the update protocol's errors (cluster/service/interceptors.py asks here first).

| error | code | `treelm-error-kind` |
|---|---|---|
| malformed envelope, manifest, package, key; payload files that differ from the manifest; another base; shapes | INVALID_ARGUMENT | envelope, manifest, package, hash-mismatch, length-mismatch, missing-file, unexpected-file, base-mismatch, shape-mismatch |
| unknown key, revoked key, too few valid signatures (unsigned, tampered, wrong key); an approval that may not count | PERMISSION_DENIED | unknown-key, revoked-key, threshold, approval-rejected |
| the same version again | ALREADY_EXISTS | replay |
| expired; an older or skipped version; a stale parent version; refused by screening or the gate; not awaiting approval | FAILED_PRECONDITION | expired, rollback, skipped-version, stale-parent, unknown-parent-version, screening-too-large (-too-small, -opposed, -non-finite), gate-rejected, not-awaiting-approval |
| an unknown update id | NOT_FOUND | (registry.updates.UpdateNotFound, in the main table) |
"""

from __future__ import annotations

import re

import grpc

from cluster.updates.errors import ApprovalRejected, NotAwaitingApproval, PackageError, UpdateStateError
from hierarchy.updates import errors as e

__all__ = ["update_wire_status"]

_S = grpc.StatusCode
# First match wins: subclasses before their bases.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (e.ReplayError, _S.ALREADY_EXISTS),
    (e.VersionError, _S.FAILED_PRECONDITION),
    (e.ExpiredError, _S.FAILED_PRECONDITION),
    (e.StaleParentError, _S.FAILED_PRECONDITION),
    (e.ScreeningRejected, _S.FAILED_PRECONDITION),
    (e.GateRejected, _S.FAILED_PRECONDITION),
    (e.AggregationError, _S.FAILED_PRECONDITION),
    (e.RotationError, _S.INVALID_ARGUMENT),
    (e.TrustError, _S.PERMISSION_DENIED),
    (e.EnvelopeError, _S.INVALID_ARGUMENT),
    (e.KeyFormatError, _S.INVALID_ARGUMENT),
    (e.PayloadMismatchError, _S.INVALID_ARGUMENT),
    (e.BaseMismatchError, _S.INVALID_ARGUMENT),
    (e.ShapeMismatchError, _S.INVALID_ARGUMENT),
    (e.UpdateError, _S.INVALID_ARGUMENT),
    (ApprovalRejected, _S.PERMISSION_DENIED),
    (NotAwaitingApproval, _S.FAILED_PRECONDITION),
    (UpdateStateError, _S.FAILED_PRECONDITION),
    (PackageError, _S.INVALID_ARGUMENT),
)
_KINDS = {
    e.ThresholdError: "threshold",
    e.EnvelopeError: "envelope",
    e.ManifestError: "manifest",
    PackageError: "package",
}


def _kind(exc: BaseException) -> str:
    if isinstance(exc, e.ScreeningRejected):
        result = exc.details.get("result")
        verdict = getattr(getattr(result, "verdict", None), "value", "rejected")
        return "screening-" + verdict.replace("_", "-")
    for cls in type(exc).__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    name = re.sub(r"Error$", "", type(exc).__name__)
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def update_wire_status(exc: BaseException) -> tuple[grpc.StatusCode, str, str | None] | None:
    """(code, kind, field) for an error of the update protocol; None for any other error."""
    for error_type, code in _CODES:
        if isinstance(exc, error_type):
            field = getattr(exc, "field", None)
            if isinstance(exc, e.UpdateError):
                field = exc.details.get("field") or exc.details.get("file")
                if isinstance(exc, e.ManifestError) and field:
                    field = f"manifest.{field}"
            return code, _kind(exc), field
    return None
