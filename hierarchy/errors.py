"""Errors raised by the pure domain layer, and the picklable base every TreeLM error tree uses.

    PicklableError                    (the root of every package's tree: survives pickle and Ray)
    └── HierarchyError
        ├── InvalidNodePath           a path or node id with bad characters or shape
        ├── SpecError                 a tree spec with one or more problems (all listed)
        ├── ChainError                adapter factors that cannot be composed (shapes, ranks)
        └── UpdateError               the signed update protocol (raised before anything is changed)
            ├── EnvelopeError            envelope bytes that are not a DSSE envelope
            │   └── ManifestError        signed payload that is not a valid update manifest
            ├── KeyFormatError           key bytes (PEM, raw) that cannot be loaded
            │   └── KeyEncryptedError    an encrypted private key and no passphrase for it
            ├── TrustError               who signed it
            │   ├── UnknownKeyError      a signature by a key the trust state does not know
            │   ├── RevokedKeyError      a signature by a revoked (or rotated-out) key
            │   ├── ThresholdError       too few valid signatures from authorised keys
            │   └── RotationError        a key-set change that is malformed (not: under-signed)
            ├── ExpiredError             the manifest's expiry time has passed
            ├── VersionError             new version is not current + 1
            │   ├── ReplayError          ... it equals the current version
            │   ├── RollbackError        ... it is older than the current version
            │   └── SkippedVersionError  ... it jumps over one or more versions
            ├── PayloadMismatchError     payload files differ from what the manifest signs
            │   ├── LengthMismatchError
            │   ├── HashMismatchError
            │   ├── MissingFileError
            │   └── UnexpectedFileError
            ├── StaleParentError         trained over a parent version that is not current
            │   └── UnknownParentVersionError   ... or one newer than the receiver knows
            ├── BaseMismatchError        trained over a different base model
            ├── ShapeMismatchError       adapted layers / tensor shapes do not fit the parent
            ├── ScreeningRejected        screening refused the delta (norm, direction)
            ├── GateRejected             the evaluation gate refused a candidate (perplexity regressions)
            └── AggregationError         children's deltas that cannot be merged

Every error of the update protocol has ``check``: the name of the verification step it belongs to (see
``hierarchy.updates.verify.VERIFICATION_CHECKS``), so a CLI can print which
checks passed before the failing one, and ``details``: the figures involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "AggregationError",
    "BaseMismatchError",
    "ChainError",
    "EnvelopeError",
    "ExpiredError",
    "GateRejected",
    "HashMismatchError",
    "HierarchyError",
    "InvalidNodePath",
    "KeyEncryptedError",
    "KeyFormatError",
    "LengthMismatchError",
    "ManifestError",
    "MissingFileError",
    "PayloadMismatchError",
    "PicklableError",
    "ReplayError",
    "RevokedKeyError",
    "RollbackError",
    "RotationError",
    "ScreeningRejected",
    "ShapeMismatchError",
    "SkippedVersionError",
    "SpecError",
    "SpecProblem",
    "StaleParentError",
    "ThresholdError",
    "TrustError",
    "UnexpectedFileError",
    "UnknownKeyError",
    "UnknownParentVersionError",
    "UpdateError",
    "VersionError",
]


def _rebuild(cls: type[PicklableError], args: tuple[Any, ...], state: dict[str, Any]) -> PicklableError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class PicklableError(Exception):
    """An exception that survives pickle (Ray actors and Serve replicas, worker processes) whatever
    its ``__init__`` takes: it is rebuilt from its ``args`` and attributes, not by calling
    ``__init__`` again (the default would call ``cls(*args)``, which breaks for errors whose
    constructor takes a field and a message). Every package's root error derives from it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class HierarchyError(PicklableError):
    """Base of every error raised by :mod:`hierarchy`."""


class InvalidNodePath(HierarchyError, ValueError):
    """A node path or node id that is not well formed."""


class ChainError(HierarchyError, ValueError):
    """Adapter factors whose shapes or settings do not compose."""


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a tree spec, located as precisely as we can."""

    file: str
    node: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.node is not None:
            where += f": node '{self.node}'"
        if self.field is not None:
            where += f": field '{self.field}'"
        return f"{where}: {self.message}"


class SpecError(HierarchyError, ValueError):
    """A tree spec that failed validation; ``problems`` lists every problem found."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in tree spec:\n{lines}")


# -- the signed update protocol ------------------------------------------------------------


class UpdateError(HierarchyError):
    """Base of every error of the update protocol."""

    check: ClassVar[str] = "update"

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.details: dict[str, Any] = dict(details)


class EnvelopeError(UpdateError, ValueError):
    """Bytes that do not parse as a DSSE envelope, or an envelope of the wrong payload type."""

    check = "envelope"


class ManifestError(EnvelopeError):
    """A (signed) payload that is not a canonical, well-formed update manifest; names the field."""

    check = "manifest"


class KeyFormatError(UpdateError, ValueError):
    """A key that cannot be loaded (not Ed25519, bad PEM, wrong password, wrong length)."""

    check = "keys"


class KeyEncryptedError(KeyFormatError):
    """An encrypted private key, and no passphrase to open it."""


class TrustError(UpdateError):
    """Base of the signer checks."""

    check = "keys"


class UnknownKeyError(TrustError):
    """A signature names a key id the trust state has never seen."""


class RevokedKeyError(TrustError):
    """A signature names a key that was revoked or rotated out."""


class ThresholdError(TrustError):
    """Fewer valid signatures from authorised keys than the threshold requires."""

    check = "threshold"


class RotationError(TrustError, ValueError):
    """A key-set change that is malformed: empty, impossible threshold, key owned by another group."""

    check = "rotation"


class ExpiredError(UpdateError):
    """The manifest expired before it was verified."""

    check = "expiry"


class VersionError(UpdateError):
    """The new version is not exactly the current version + 1."""

    check = "version"


class ReplayError(VersionError):
    """The version equals the current one: an already-applied update sent again."""


class RollbackError(VersionError):
    """The version is older than the current one: an attempt to roll the node back."""


class SkippedVersionError(VersionError):
    """The version jumps past current + 1: an intermediate version is missing."""


class PayloadMismatchError(UpdateError, ValueError):
    """Payload files that differ from the signed manifest."""

    check = "files"


class LengthMismatchError(PayloadMismatchError):
    """A payload file whose length differs from the signed length."""


class HashMismatchError(PayloadMismatchError):
    """A payload file whose sha256 differs from the signed digest."""


class MissingFileError(PayloadMismatchError):
    """A file the manifest signs did not arrive."""


class UnexpectedFileError(PayloadMismatchError):
    """A file arrived that the manifest does not sign."""


class StaleParentError(UpdateError):
    """The update was trained over a parent version that is no longer current."""

    check = "parent"


class UnknownParentVersionError(StaleParentError):
    """The update claims a parent version newer than the receiver's current one."""


class BaseMismatchError(UpdateError):
    """The update was trained over a different base model."""

    check = "base"


class ShapeMismatchError(UpdateError, ValueError):
    """Adapted layers or tensor shapes that do not fit the parent's layers."""

    check = "shapes"


class ScreeningRejected(UpdateError):
    """Screening refused a delta; ``details['result']`` holds the ScreenResult."""

    check = "screening"


class GateRejected(UpdateError):
    """The gate found a regression beyond its bound; ``details['report']`` holds every figure."""

    check = "gate"


class AggregationError(UpdateError, ValueError):
    """Children's deltas that cannot be merged (no positive weight, mismatched layers)."""

    check = "aggregation"
