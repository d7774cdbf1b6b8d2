"""Values of the fine-tuning calls (``treelm.v1.FineTuning``): frozen dataclasses, converted from
protos at the edge, and the requests the calls send."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protos.treelm.v1 import admin_pb2, fine_tuning_pb2
from treelm._errors import InvalidRequest

__all__ = [
    "CHUNK_BYTES",
    "FileInfo",
    "JobEvent",
    "JobFailure",
    "JobState",
    "RetiredNodes",
    "TrainingData",
    "create_job_request",
    "event_from_proto",
    "file_from_proto",
    "job_from_proto",
    "retired_from_proto",
    "training_bytes",
    "upload_chunks",
]

CHUNK_BYTES = 1 << 20  # one UploadFile message (the server takes up to 1.25 MiB)
FINISHED = ("succeeded", "failed", "cancelled")

# What ``customize`` trains on: a file, its bytes, or records (chat records as dicts, or documents).
TrainingData = str | Path | bytes | Sequence[Mapping[str, Any] | str]


@dataclass(frozen=True)
class FileInfo:
    """An uploaded training file (checked by the server when it was uploaded)."""

    id: str  # "file-..."
    filename: str
    purpose: str
    format: str  # jsonl | text
    records: int  # chat records or documents
    bytes: int
    sha256: str
    created_at: datetime


@dataclass(frozen=True)
class JobFailure:
    """Why a job failed: ``code`` says where (data, training, gate, registration, interrupted)."""

    code: str
    message: str
    param: str | None = None


@dataclass(frozen=True)
class JobState:
    """A fine-tuning job as the server last reported it."""

    id: str  # "ftjob-..."
    parent: str  # the node it fine-tunes (OpenAI's "model")
    node: str  # the node it creates: parent/suffix
    fine_tuned_model: str | None  # = node once the job succeeded
    status: str  # queued | running | succeeded | failed | cancelled
    visibility: str  # private | public
    training_file: str
    validation_file: str | None
    hyperparameters: Mapping[str, Any]  # as resolved: n_epochs, learning_rate, lora_rank, batch_size
    result: Mapping[str, Any]  # held-out perplexities (the node's and its parent's), timings, version
    error: JobFailure | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class JobEvent:
    """One step of a job's life; progress events carry ``step``, ``total_steps`` and ``loss``."""

    id: int
    job_id: str
    level: str  # info | warn | error
    message: str
    data: Mapping[str, Any]
    created_at: datetime

    @property
    def step(self) -> int | None:
        value = self.data.get("step")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def total_steps(self) -> int | None:
        value = self.data.get("total_steps", self.data.get("steps"))
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def loss(self) -> float | None:
        value = self.data.get("loss")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class RetiredNodes:
    """What ``retire_node`` retired: the node, then its descendants (with ``force``)."""

    node: str
    retired: tuple[str, ...]


def _time(seconds: float) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


def _mapping(text: str) -> Mapping[str, Any]:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def file_from_proto(msg: fine_tuning_pb2.TrainingFile) -> FileInfo:
    return FileInfo(
        id=msg.id,
        filename=msg.filename,
        purpose=msg.purpose,
        format=msg.format,
        records=msg.records,
        bytes=msg.bytes,
        sha256=msg.sha256,
        created_at=datetime.fromtimestamp(msg.created_at, UTC),
    )


def job_from_proto(msg: fine_tuning_pb2.Job) -> JobState:
    error = None
    if msg.HasField("error"):
        error = JobFailure(msg.error.code, msg.error.message, msg.error.param or None)
    return JobState(
        id=msg.id,
        parent=msg.model,
        node=msg.node,
        fine_tuned_model=msg.fine_tuned_model or None,
        status=msg.status,
        visibility=msg.visibility,
        training_file=msg.training_file,
        validation_file=msg.validation_file or None,
        hyperparameters=_mapping(msg.hyperparameters_json),
        result=_mapping(msg.result_json),
        error=error,
        cancel_requested=msg.cancel_requested,
        created_at=datetime.fromtimestamp(msg.created_at, UTC),
        started_at=_time(msg.started_at),
        finished_at=_time(msg.finished_at),
    )


def event_from_proto(msg: fine_tuning_pb2.JobEvent) -> JobEvent:
    return JobEvent(
        id=msg.id,
        job_id=msg.job_id,
        level=msg.level,
        message=msg.message,
        data=_mapping(msg.data_json),
        created_at=datetime.fromtimestamp(msg.created_at, UTC),
    )


def retired_from_proto(msg: admin_pb2.RetireNodeResponse) -> RetiredNodes:
    return RetiredNodes(node=msg.node, retired=tuple(msg.retired))


def training_bytes(data: TrainingData) -> tuple[str, bytes]:
    """(file name, bytes) to upload: a file as it is; bytes (JSON Lines when they start with '{',
    else text); records as JSON Lines (a string is a document: ``{"text": ...}``)."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        return path.name, path.read_bytes()
    if isinstance(data, (bytes, bytearray, memoryview)):
        content = bytes(data)
        return ("data.jsonl" if content.lstrip().startswith(b"{") else "data.txt"), content
    lines = []
    for i, record in enumerate(data):
        if isinstance(record, str):
            lines.append(json.dumps({"text": record}, ensure_ascii=False))
        elif isinstance(record, Mapping):
            lines.append(json.dumps(dict(record), ensure_ascii=False))
        else:
            raise TypeError(f"data[{i}]: a record is a chat record (a dict with 'messages') or a document (a str)")
    return "data.jsonl", ("\n".join(lines) + "\n").encode("utf-8")


def upload_chunks(filename: str, purpose: str, content: bytes) -> Iterator[fine_tuning_pb2.UploadFileChunk]:
    """The first chunk names the file and its purpose; each carries at most CHUNK_BYTES."""
    yield fine_tuning_pb2.UploadFileChunk(filename=filename, purpose=purpose, data=content[:CHUNK_BYTES])
    for start in range(CHUNK_BYTES, len(content), CHUNK_BYTES):
        yield fine_tuning_pb2.UploadFileChunk(data=content[start : start + CHUNK_BYTES])


def create_job_request(
    parent: str,
    training_file: str,
    *,
    suffix: str,
    validation_file: str | None,
    hyperparameters: Mapping[str, int | float | None],
    public: bool,
) -> fine_tuning_pb2.CreateJobRequest:
    request = fine_tuning_pb2.CreateJobRequest(
        model=parent,
        training_file=training_file,
        validation_file=validation_file or "",
        suffix=suffix,
        visibility="public" if public else "private",
    )
    for name, value in hyperparameters.items():
        if value is None:
            continue
        try:
            setattr(request.hyperparameters, name, value)
        except (TypeError, ValueError) as exc:  # a negative count, a string, ...
            raise InvalidRequest(f"hyperparameters.{name}: {exc}", field=f"hyperparameters.{name}") from None
    return request
