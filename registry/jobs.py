"""Fine-tuning jobs: uploaded training files, jobs, their progress events and their outcome.

A tenant uploads files (kept here, so every ingress and every training worker reads the same
bytes) and creates jobs; a worker claims a queued job, records its progress as events and ends it
``succeeded`` (the new node is served), ``failed`` (with a reason) or ``cancelled``. A tenant sees
only its own files and jobs: another tenant's id is answered exactly like an unknown one.

Every refusal (a taken node id, a file that is not the caller's, the tenant's job quota) happens
in the transaction that would have stored the job, so nothing is stored when it is refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from registry._rows import canonical_node_id, utc
from registry.db import Registry
from registry.errors import (
    FileInUse,
    FileNotFound,
    FileQuotaExceeded,
    InvalidInput,
    JobFinished,
    JobNotFound,
    JobQuotaExceeded,
    NodeExists,
    NodeNotFound,
)
from registry.models import FineTuningEvent, FineTuningJob, Node, TrainingFile, utcnow
from registry.vocab import JOB_FINISHED, VISIBILITIES

__all__ = [
    "ACTIVE_JOB_STATUSES",
    "FileRecord",
    "JobEvent",
    "JobRecord",
    "JobRequest",
    "add_event",
    "add_file",
    "cancel_requested",
    "claim_job",
    "create_job",
    "delete_file",
    "fail_interrupted",
    "file_content",
    "finish_job",
    "get_file",
    "get_job",
    "list_events",
    "list_files",
    "list_jobs",
    "request_cancel",
]

ACTIVE_JOB_STATUSES = ("queued", "running")
_MAX_LIST = 100


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class FileRecord:
    """An uploaded file without its bytes (``file_content`` reads them)."""

    file_id: str
    tenant: str
    filename: str
    purpose: str
    format: str  # jsonl | text
    records: int
    bytes: int
    sha256: str
    created_at: datetime


@dataclass(frozen=True)
class JobRequest:
    """What a tenant asks for: a new node ``node`` under ``parent``, trained on its files."""

    tenant: str
    parent: str  # a node id (the tree's name alone: the base)
    node: str  # the node the job creates: parent id + "/" + suffix
    training_file: str
    validation_file: str | None = None
    visibility: str = "private"
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.visibility not in VISIBILITIES:
            raise InvalidInput(f"visibility must be one of {', '.join(VISIBILITIES)}", field="visibility")


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    tenant: str
    tree: str
    parent: str
    node: str
    visibility: str
    status: str  # queued | running | succeeded | failed | cancelled
    hyperparameters: Mapping[str, Any]
    training_file: str
    validation_file: str | None
    result: Mapping[str, Any]  # perplexities, timings, version (as far as the job got)
    error: Mapping[str, Any] | None  # {"code": ..., "message": ...} of a failed job
    cancel_requested: bool
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in JOB_FINISHED

    @property
    def fine_tuned_model(self) -> str | None:
        return self.node if self.status == "succeeded" else None


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: str
    level: str
    message: str
    data: Mapping[str, Any]
    created_at: datetime


def _file_record(row: TrainingFile) -> FileRecord:
    return FileRecord(
        row.file_id, row.tenant, row.filename, row.purpose, row.format, row.records, row.bytes, row.sha256,
        utc(row.created_at),
    )  # fmt: skip


def _job_record(row: FineTuningJob) -> JobRecord:
    return JobRecord(
        job_id=row.job_id,
        tenant=row.tenant,
        tree=row.tree,
        parent=row.parent,
        node=row.node,
        visibility=row.visibility,
        status=row.status,
        hyperparameters=dict(row.hyperparameters or {}),
        training_file=row.training_file,
        validation_file=row.validation_file,
        result=dict(row.result or {}),
        error=dict(row.error) if row.error else None,
        cancel_requested=row.cancel_requested,
        worker=row.worker,
        created_at=utc(row.created_at),
        started_at=utc(row.started_at) if row.started_at else None,
        finished_at=utc(row.finished_at) if row.finished_at else None,
    )


# -- files -------------------------------------------------------------------------------------------


def add_file(
    reg: Registry,
    tenant: str,
    filename: str,
    purpose: str,
    content: bytes,
    *,
    fmt: str,
    records: int,
    sha256: str,
    max_files: int | None = None,
    max_bytes: int | None = None,
) -> FileRecord:
    """Store a checked upload (cluster/jobs/data.py checks it) and return its record; FileQuotaExceeded
    (nothing stored) when the tenant would then hold more than ``max_files`` files or ``max_bytes``."""
    with reg.write() as s:
        if max_files is not None or max_bytes is not None:
            count, total = s.execute(
                select(func.count(), func.coalesce(func.sum(TrainingFile.bytes), 0)).where(
                    TrainingFile.tenant == tenant
                )
            ).one()
            if max_files is not None and count + 1 > max_files:
                raise FileQuotaExceeded(
                    f"your tenant stores {count} training files, its limit is {max_files}: delete some "
                    "(DELETE /v1/files/{id}, or the SDK's client.delete_file) before uploading more"
                )
            if max_bytes is not None and total + len(content) > max_bytes:
                raise FileQuotaExceeded(
                    f"your tenant stores {total} bytes of training files; this one ({len(content)} bytes) would "
                    f"pass its limit of {max_bytes}: delete some files before uploading more"
                )
        row = TrainingFile(
            file_id=_new_id("file"),
            tenant=tenant,
            filename=filename[:256],
            purpose=purpose,
            format=fmt,
            records=records,
            bytes=len(content),
            sha256=sha256,
            content=content,
            created_at=utcnow(),
        )
        s.add(row)
        s.flush()
        return _file_record(row)


def _file_row(s: Any, tenant: str, file_id: str, field: str = "file_id") -> TrainingFile:
    row = s.scalar(select(TrainingFile).where(TrainingFile.file_id == file_id[:40], TrainingFile.tenant == tenant))
    if row is None:
        raise FileNotFound.for_id(file_id, field)
    return row


def get_file(reg: Registry, tenant: str, file_id: str) -> FileRecord:
    with reg.read() as s:
        return _file_record(_file_row(s, tenant, file_id))


def file_content(reg: Registry, tenant: str, file_id: str) -> bytes:
    with reg.read() as s:
        return bytes(_file_row(s, tenant, file_id).content)


def list_files(reg: Registry, tenant: str, limit: int = _MAX_LIST) -> tuple[FileRecord, ...]:
    """The tenant's files, newest first (without their bytes)."""
    columns = [c for c in TrainingFile.__table__.columns if c.name != "content"]
    with reg.read() as s:
        rows = s.execute(
            select(*columns)
            .where(TrainingFile.tenant == tenant)
            .order_by(TrainingFile.id.desc())
            .limit(max(1, min(limit, _MAX_LIST)))
        ).all()
    return tuple(_file_record(r) for r in rows)  # type: ignore[arg-type]


def delete_file(reg: Registry, tenant: str, file_id: str) -> FileRecord:
    """Delete the tenant's file; FileInUse while a queued or running job reads it."""
    with reg.write() as s:
        row = _file_row(s, tenant, file_id)
        users = s.scalar(
            select(func.count())
            .select_from(FineTuningJob)
            .where(
                FineTuningJob.status.in_(ACTIVE_JOB_STATUSES),
                (FineTuningJob.training_file == row.file_id) | (FineTuningJob.validation_file == row.file_id),
            )
        )
        if users:
            raise FileInUse(f"file {row.file_id} is read by a queued or running job; cancel it or wait for it")
        record = _file_record(row)
        s.delete(row)
        return record


# -- jobs --------------------------------------------------------------------------------------------


def create_job(reg: Registry, request: JobRequest, *, max_active: int | None) -> JobRecord:
    """Store a queued job, or refuse it with nothing stored: NodeNotFound (the parent, as the tenant
    sees it is checked by the caller), FileNotFound, NodeExists, JobQuotaExceeded."""
    node = canonical_node_id(request.node)
    parent = canonical_node_id(request.parent)
    with reg.write() as s:
        for name, file_id in (("training_file", request.training_file), ("validation_file", request.validation_file)):
            if file_id is not None:
                _file_row(s, request.tenant, file_id, name)
        parent_row = s.scalar(select(Node).where(Node.node_id == parent, Node.retired_at.is_(None)))
        if parent_row is None:
            raise NodeNotFound(f"unknown node {parent!r}: list nodes with `treelm registry ls`")
        taken = s.scalar(select(Node.id).where(Node.node_id == node))
        if taken is not None:
            raise NodeExists(f"node {node!r} exists already: choose another suffix")
        building = s.scalar(
            select(FineTuningJob.job_id).where(
                FineTuningJob.node == node, FineTuningJob.status.in_(ACTIVE_JOB_STATUSES)
            )
        )
        if building is not None:
            raise NodeExists(f"node {node!r} is being created by another job: choose another suffix")
        if max_active is not None:
            active = (
                s.scalar(
                    select(func.count())
                    .select_from(FineTuningJob)
                    .where(FineTuningJob.tenant == request.tenant, FineTuningJob.status.in_(ACTIVE_JOB_STATUSES))
                )
                or 0
            )
            if active >= max_active:
                raise JobQuotaExceeded(
                    f"tenant {request.tenant!r} has {active} queued or running fine-tuning jobs, its limit is "
                    f"{max_active}: wait for one to finish or cancel one"
                )
        row = FineTuningJob(
            job_id=_new_id("ftjob"),
            tenant=request.tenant,
            tree=parent.split("/")[0],
            parent=parent,
            node=node,
            visibility=request.visibility,
            status="queued",
            hyperparameters=dict(request.hyperparameters),
            training_file=request.training_file,
            validation_file=request.validation_file,
            result={},
            error=None,
            cancel_requested=False,
            created_at=utcnow(),
        )
        s.add(row)
        s.flush()
        s.add(FineTuningEvent(job_pk=row.id, level="info", message="job queued", data={}, created_at=utcnow()))
        return _job_record(row)


def _job_row(s: Any, job_id: str, tenant: str | None, *, for_update: bool = False) -> FineTuningJob:
    query = select(FineTuningJob).where(FineTuningJob.job_id == job_id[:40])
    if tenant is not None:
        query = query.where(FineTuningJob.tenant == tenant)
    if for_update:
        query = query.with_for_update()
    row = s.scalar(query)
    if row is None:
        raise JobNotFound.for_id(job_id)
    return row


def get_job(reg: Registry, job_id: str, tenant: str | None = None) -> JobRecord:
    """One job; ``tenant`` None: any tenant's (workers and operators)."""
    with reg.read() as s:
        return _job_record(_job_row(s, job_id, tenant))


def list_jobs(
    reg: Registry,
    tenant: str | None,
    *,
    limit: int = 20,
    after: str | None = None,
    statuses: tuple[str, ...] = (),
    tree: str | None = None,
) -> tuple[JobRecord, ...]:
    """Jobs newest first (OpenAI's order), after the job ``after`` when given; ``tenant`` None: all."""
    query = select(FineTuningJob).order_by(FineTuningJob.id.desc())
    with reg.read() as s:
        if tenant is not None:
            query = query.where(FineTuningJob.tenant == tenant)
        if statuses:
            query = query.where(FineTuningJob.status.in_(statuses))
        if tree is not None:
            query = query.where(FineTuningJob.tree == tree)
        if after:
            pk = _job_row(s, after, tenant).id
            query = query.where(FineTuningJob.id < pk)
        rows = s.scalars(query.limit(max(1, min(limit, _MAX_LIST)))).all()
        return tuple(_job_record(r) for r in rows)


def claim_job(reg: Registry, tree: str, worker: str) -> JobRecord | None:
    """The oldest queued job of ``tree``, now running on ``worker``; None when none waits.

    A conditional UPDATE: of two workers claiming at once, one gets the job, the other none."""
    with reg.write() as s:
        pk = s.scalar(
            select(FineTuningJob.id)
            .where(FineTuningJob.tree == tree, FineTuningJob.status == "queued")
            .order_by(FineTuningJob.id)
            .limit(1)
        )
        if pk is None:
            return None
        now = utcnow()
        done = s.execute(
            update(FineTuningJob)
            .where(FineTuningJob.id == pk, FineTuningJob.status == "queued")
            .values(status="running", worker=worker[:128], started_at=now)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return None
        s.add(FineTuningEvent(job_pk=pk, level="info", message=f"job started on {worker[:128]}", data={}))
        row = s.get_one(FineTuningJob, pk)
        s.refresh(row)
        return _job_record(row)


def add_event(
    reg: Registry, job_id: str, message: str, data: Mapping[str, Any] | None = None, level: str = "info"
) -> None:
    with reg.write() as s:
        row = _job_row(s, job_id, None)
        s.add(FineTuningEvent(job_pk=row.id, level=level, message=message, data=dict(data or {}), created_at=utcnow()))


def list_events(
    reg: Registry, job_id: str, tenant: str | None, *, after: int | None = None, limit: int = 20
) -> tuple[JobEvent, ...]:
    """A job's events, newest first as OpenAI lists them; ``after``: only events older than that id."""
    with reg.read() as s:
        row = _job_row(s, job_id, tenant)
        query = select(FineTuningEvent).where(FineTuningEvent.job_pk == row.id)
        if after is not None:
            query = query.where(FineTuningEvent.id < after)
        events = s.scalars(query.order_by(FineTuningEvent.id.desc()).limit(max(1, min(limit, _MAX_LIST)))).all()
        return tuple(
            JobEvent(e.id, row.job_id, e.level, e.message, dict(e.data or {}), utc(e.created_at)) for e in events
        )


def request_cancel(reg: Registry, job_id: str, tenant: str | None) -> JobRecord:
    """A queued job is cancelled at once; a running one is marked, and its runner stops it
    (``finish_job(..., "cancelled")``); JobFinished for a job that already ended."""
    with reg.write() as s:
        row = _job_row(s, job_id, tenant, for_update=True)
        if row.status in JOB_FINISHED:
            raise JobFinished(f"job {row.job_id} already ended ({row.status}); there is nothing to cancel")
        if row.status == "queued":
            row.status, row.finished_at = "cancelled", utcnow()
            s.add(FineTuningEvent(job_pk=row.id, level="info", message="job cancelled before it started", data={}))
        elif not row.cancel_requested:
            row.cancel_requested = True
            s.add(FineTuningEvent(job_pk=row.id, level="info", message="cancellation requested", data={}))
        s.flush()
        return _job_record(row)


def cancel_requested(reg: Registry, job_id: str) -> bool:
    with reg.read() as s:
        return bool(s.scalar(select(FineTuningJob.cancel_requested).where(FineTuningJob.job_id == job_id)))


def finish_job(
    reg: Registry,
    job_id: str,
    status: str,
    *,
    result: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
    message: str | None = None,
) -> JobRecord:
    """End a running (or queued) job; the result's figures are merged into what it had."""
    if status not in JOB_FINISHED:
        raise InvalidInput(f"a job ends succeeded, failed or cancelled, not {status!r}", field="status")
    with reg.write() as s:
        row = _job_row(s, job_id, None, for_update=True)
        if row.status in JOB_FINISHED:
            raise JobFinished(f"job {row.job_id} already ended ({row.status})")
        row.status, row.finished_at = status, utcnow()
        row.result = dict(row.result or {}) | dict(result or {})
        row.error = dict(error) if error else None
        level = "error" if status == "failed" else "info"
        text = message or {"succeeded": "job succeeded", "cancelled": "job cancelled", "failed": "job failed"}[status]
        s.add(FineTuningEvent(job_pk=row.id, level=level, message=text, data=dict(error or {}), created_at=utcnow()))
        s.flush()
        return _job_record(row)


def fail_interrupted(reg: Registry, tree: str, reason: str, *, worker_prefix: str = "") -> tuple[str, ...]:
    """Mark the tree's running jobs failed (a restart found them running: their worker is gone)."""
    with reg.write() as s:
        query = select(FineTuningJob).where(FineTuningJob.tree == tree, FineTuningJob.status == "running")
        rows = [r for r in s.scalars(query.with_for_update()).all() if (r.worker or "").startswith(worker_prefix)]
        now = utcnow()
        for row in rows:
            status = "cancelled" if row.cancel_requested else "failed"
            row.status, row.finished_at = status, now
            if status == "failed":
                row.error = {"code": "interrupted", "message": reason}
            s.add(FineTuningEvent(job_pk=row.id, level="error", message=reason, data={}, created_at=now))
        return tuple(r.job_id for r in rows)
