"""Errors raised by the registry. Every one is the user's (or operator's) to fix.

    RegistryError (PicklableError: every error survives pickle and a Ray call with its fields)
    ├── DatabaseError             the database cannot be used as it is
    │   ├── InvalidDatabaseUrl    a URL SQLAlchemy cannot parse or has no driver for
    │   ├── DatabaseUnavailable   the database cannot be reached (down, wrong host, bad credentials)
    │   ├── RegistryNotInitialised  no registry schema yet: run `treelm registry init`
    │   ├── SchemaOutdated        an older schema: run `treelm registry upgrade`
    │   └── SchemaTooNew          a schema newer than this treelm knows: upgrade treelm
    ├── NotFound                  a record that does not exist (or is not visible to the tenant)
    │   ├── NodeNotFound
    │   ├── VersionNotFound
    │   ├── UpdateNotFound        an update id no update has
    │   ├── TenantNotFound
    │   ├── SigningKeyNotFound
    │   ├── ResponseNotFound      a response id the caller never got (or another tenant's)
    │   ├── FileNotFound          an uploaded file id the caller does not have
    │   └── JobNotFound           a fine-tuning job id the caller does not have
    ├── InvalidInput              a bad value; ``field`` names the input
    │   ├── InvalidMemorySize     "eight gigs", "-1GiB", ...
    │   ├── InvalidHardware       a device kind that does not exist, a bad bandwidth
    │   ├── InvalidTask           a task that is malformed
    │   └── UnknownTask           a well-formed task no node matches
    ├── InvalidToken              a missing, malformed, unknown or revoked API token
    ├── JobQuotaExceeded          a tenant at its limit of queued and running fine-tuning jobs
    ├── FileQuotaExceeded         a tenant at its limit of stored training files (count or bytes)
    └── Conflict                  the request contradicts stored records
        ├── ImportConflict        a tree dir that disagrees with what is registered
        ├── AliasError            an alias to a version that is revoked, rejected or not accepted
        ├── StatusTransitionError a version status change that is not allowed
        ├── FeedbackDeleted       feedback on a response whose records its tenant deleted
        ├── NodeExists            a job's new node id is taken (by a node, a retired one, or another job)
        ├── FileInUse             deleting a file a queued or running job reads
        └── JobFinished           cancelling a job that already ended

A private node of another tenant is reported as :class:`NodeNotFound` with the
same message as a node that does not exist, so its existence never leaks.
"""

from __future__ import annotations

from hierarchy.errors import PicklableError

__all__ = [
    "AliasError",
    "Conflict",
    "DatabaseError",
    "DatabaseUnavailable",
    "FeedbackDeleted",
    "FileInUse",
    "FileNotFound",
    "FileQuotaExceeded",
    "ImportConflict",
    "InvalidDatabaseUrl",
    "InvalidHardware",
    "InvalidInput",
    "InvalidMemorySize",
    "InvalidTask",
    "InvalidToken",
    "JobFinished",
    "JobNotFound",
    "JobQuotaExceeded",
    "NodeExists",
    "NodeNotFound",
    "NotFound",
    "RegistryError",
    "RegistryNotInitialised",
    "ResponseNotFound",
    "SchemaOutdated",
    "SchemaTooNew",
    "SigningKeyNotFound",
    "StatusTransitionError",
    "TenantNotFound",
    "UnknownTask",
    "UpdateNotFound",
    "VersionNotFound",
]


class RegistryError(PicklableError):
    """Base of every error raised by :mod:`registry`."""


class DatabaseError(RegistryError):
    """The database cannot be used as it is."""


class InvalidDatabaseUrl(DatabaseError, ValueError):
    """A database URL that cannot be parsed or has no installed driver."""


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached or refused the connection."""


class RegistryNotInitialised(DatabaseError):
    """The database has no registry schema yet."""


class SchemaOutdated(DatabaseError):
    """The database's schema is older than this code's; migrations must run first."""


class SchemaTooNew(DatabaseError):
    """The database's schema was migrated by a newer treelm than this one."""


class NotFound(RegistryError, LookupError):
    """A record that does not exist, or that the caller may not see."""


class NodeNotFound(NotFound):
    pass


class VersionNotFound(NotFound):
    pass


class TenantNotFound(NotFound):
    pass


class SigningKeyNotFound(NotFound):
    pass


class InvalidInput(RegistryError, ValueError):
    """A bad input value; ``field`` names the input (an option, argument or attribute)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidMemorySize(InvalidInput):
    pass


class InvalidHardware(InvalidInput):
    pass


class InvalidTask(InvalidInput):
    pass


class UnknownTask(InvalidInput):
    """A well-formed task that no visible node matches."""


class InvalidToken(RegistryError):
    """An API token that is missing, malformed, unknown or revoked (never says which)."""


class Conflict(RegistryError):
    """The request contradicts what is stored."""


class ImportConflict(Conflict):
    pass


class AliasError(Conflict):
    pass


class StatusTransitionError(Conflict):
    pass


class UpdateNotFound(NotFound):
    """No update record with this id (the same message whether it is absent or not the caller's)."""

    @classmethod
    def for_id(cls, update_id: str) -> UpdateNotFound:
        return cls(f"no update {update_id!r}: `treelm update status` lists them")


class ResponseNotFound(NotFound):
    """No response with this id for the caller (the same message whether it never existed or is another tenant's)."""

    @classmethod
    def for_id(cls, response_id: str) -> ResponseNotFound:
        return cls(f"no response {response_id[:80]!r}: feedback takes the id of a response you received")


class FeedbackDeleted(Conflict):
    """Feedback on a response whose records its tenant deleted: deletion is final."""

    @classmethod
    def for_id(cls, response_id: str) -> FeedbackDeleted:
        return cls(f"the records of response {response_id[:80]!r} were deleted; it takes no more feedback")


class FileNotFound(NotFound):
    """No uploaded file with this id for the caller (the same message whether absent or another tenant's)."""

    def __init__(self, message: str, *, field: str | None = "file_id"):
        super().__init__(message)
        self.field = field

    @classmethod
    def for_id(cls, file_id: str, field: str = "file_id") -> FileNotFound:
        return cls(f"no file {file_id[:80]!r}: upload it first (POST /v1/files, purpose 'fine-tune')", field=field)


class FileInUse(Conflict):
    """A file a queued or running job still reads cannot be deleted."""


class JobNotFound(NotFound):
    """No fine-tuning job with this id for the caller (the same message whether absent or another tenant's)."""

    @classmethod
    def for_id(cls, job_id: str) -> JobNotFound:
        return cls(f"no fine-tuning job {job_id[:80]!r}: list yours with GET /v1/fine_tuning/jobs")


class JobFinished(Conflict):
    """A job that already ended cannot be cancelled."""


class NodeExists(Conflict):
    """The node a job would create exists already (or another job is creating it): choose another suffix."""

    def __init__(self, message: str, *, field: str | None = "suffix"):
        super().__init__(message)
        self.field = field


class JobQuotaExceeded(RegistryError):
    """The tenant has as many queued and running jobs as it may: wait for one to end."""

    def __init__(self, message: str, *, retry_after_s: float = 30.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FileQuotaExceeded(RegistryError):
    """The tenant stores as many training files (or bytes of them) as it may: delete some first."""
