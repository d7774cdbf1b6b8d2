"""The FineTuning gRPC service (``treelm.v1.FineTuning``): wire messages <-> the fine-tuning calls
(cluster/service/fine_tuning.py), nothing more. The HTTP API serves the same calls as OpenAI's
files and fine-tuning routes (cluster/http/serving/fine_tuning.py).

UploadFile takes a client stream: the first chunk names the file and its purpose; the bytes are
held in memory up to the file limit (INVALID_ARGUMENT naming ``file`` beyond it), with a deadline
for a stream that sends nothing (DEADLINE_EXCEEDED), and only within the uploads-in-progress
bounds (cluster/service/fine_tuning_io.py). Without fine-tuning calls every method answers
UNIMPLEMENTED (kind ``fine-tuning-off``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from cluster.errors import BadArgument, UploadIdle
from cluster.service.auth import current_caller
from cluster.service.fine_tuning import CreateJob, FineTuningCalls
from cluster.service.fine_tuning_io import (
    DEFAULT_PAGE,
    WATCH_POLL_S,
    FileBuffer,
    UploadSlots,
    events_page,
    jobs_page,
    served,
    watch_events,
)
from protos.treelm.v1 import fine_tuning_pb2, fine_tuning_pb2_grpc
from registry.jobs import FileRecord, JobEvent, JobRecord

__all__ = ["FineTuningServicer", "event_to_proto", "file_to_proto", "job_to_proto"]

_HYPER = ("n_epochs", "learning_rate_multiplier", "learning_rate", "lora_rank", "batch_size")


def _json(value: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(value or {}), sort_keys=True, default=str)


def file_to_proto(f: FileRecord) -> fine_tuning_pb2.TrainingFile:
    return fine_tuning_pb2.TrainingFile(
        id=f.file_id,
        filename=f.filename,
        purpose=f.purpose,
        format=f.format,
        records=f.records,
        bytes=f.bytes,
        sha256=f.sha256,
        created_at=f.created_at.timestamp(),
    )


def job_to_proto(j: JobRecord) -> fine_tuning_pb2.Job:
    msg = fine_tuning_pb2.Job(
        id=j.job_id,
        model=j.parent,
        node=j.node,
        fine_tuned_model=j.fine_tuned_model or "",
        status=j.status,
        visibility=j.visibility,
        training_file=j.training_file,
        validation_file=j.validation_file or "",
        hyperparameters_json=_json(j.hyperparameters),
        result_json=_json(j.result),
        cancel_requested=j.cancel_requested,
        created_at=j.created_at.timestamp(),
        started_at=j.started_at.timestamp() if j.started_at else 0.0,
        finished_at=j.finished_at.timestamp() if j.finished_at else 0.0,
    )
    if j.error:
        msg.error.CopyFrom(
            fine_tuning_pb2.JobError(
                code=str(j.error.get("code") or ""),
                message=str(j.error.get("message") or ""),
                param=str(j.error.get("param") or ""),
            )
        )
    return msg


def event_to_proto(e: JobEvent) -> fine_tuning_pb2.JobEvent:
    return fine_tuning_pb2.JobEvent(
        id=e.id,
        job_id=e.job_id,
        level=e.level,
        message=e.message,
        data_json=_json(e.data),
        created_at=e.created_at.timestamp(),
    )


def _hyperparameters(msg: fine_tuning_pb2.CreateJobRequest) -> dict[str, Any]:
    if not msg.HasField("hyperparameters"):
        return {}
    h = msg.hyperparameters
    return {name: getattr(h, name) for name in _HYPER if h.HasField(name)}


async def _next_chunk(chunks: AsyncIterator[Any], idle_s: float) -> Any:
    try:
        return await asyncio.wait_for(anext(chunks), idle_s)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise UploadIdle(idle_s) from None


class FineTuningServicer(fine_tuning_pb2_grpc.FineTuningServicer):
    def __init__(
        self,
        calls: FineTuningCalls | None,
        uploads: UploadSlots,
        *,
        idle_s: float = 30.0,
        poll_s: float = WATCH_POLL_S,
        draining: Callable[[], bool] = lambda: False,
    ):
        self._calls = calls
        self._uploads = uploads
        self._idle_s = idle_s  # an upload stream that sends nothing this long is aborted
        self._poll_s = poll_s
        self._draining = draining  # true once the server stops: watches end (UNAVAILABLE)

    @property
    def calls(self) -> FineTuningCalls:
        return served(self._calls)

    async def UploadFile(self, request_iterator, context):
        calls, caller = self.calls, current_caller()
        with self._uploads.hold(caller):
            chunks = aiter(request_iterator)
            first = await _next_chunk(chunks, self._idle_s)
            if first is None:
                raise BadArgument("file", "the stream was empty: send the file name and purpose, then the bytes")
            buffer = FileBuffer()
            chunk = first
            while chunk is not None:
                if chunk is not first and (chunk.filename or chunk.purpose):
                    raise BadArgument("filename", "only the first chunk names the file and its purpose")
                buffer.add(chunk.data)
                chunk = await _next_chunk(chunks, self._idle_s)
            record = await calls.upload_file(caller, first.filename, first.purpose, buffer.bytes())
        return file_to_proto(record)

    async def ListFiles(self, request, context):
        files = await self.calls.list_files(current_caller())
        return fine_tuning_pb2.ListFilesResponse(files=[file_to_proto(f) for f in files])

    async def GetFile(self, request, context):
        return file_to_proto(await self.calls.get_file(current_caller(), request.file_id))

    async def DeleteFile(self, request, context):
        record = await self.calls.delete_file(current_caller(), request.file_id)
        return fine_tuning_pb2.DeleteFileResponse(id=record.file_id, deleted=True)

    async def CreateJob(self, request, context):
        job = CreateJob(
            model=request.model,
            training_file=request.training_file,
            suffix=request.suffix,
            validation_file=request.validation_file or None,
            hyperparameters=_hyperparameters(request),
            visibility=request.visibility or "private",
        )
        return job_to_proto(await self.calls.create_job(current_caller(), job))

    async def GetJob(self, request, context):
        return job_to_proto(await self.calls.get_job(current_caller(), request.job_id))

    async def ListJobs(self, request, context):
        page = await jobs_page(self.calls, current_caller(), request.limit or DEFAULT_PAGE, request.after or None)
        return fine_tuning_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in page.items], has_more=page.has_more)

    async def ListEvents(self, request, context):
        after = request.after or None
        page = await events_page(self.calls, current_caller(), request.job_id, request.limit or DEFAULT_PAGE, after)
        return fine_tuning_pb2.ListEventsResponse(
            events=[event_to_proto(e) for e in page.items], has_more=page.has_more
        )

    async def WatchJob(self, request, context) -> AsyncIterator[fine_tuning_pb2.JobEvent]:
        caller, since = current_caller(), int(request.since)
        events = watch_events(self.calls, caller, request.job_id, since, self._poll_s, self._draining)
        async for event in events:
            yield event_to_proto(event)

    async def CancelJob(self, request, context):
        return job_to_proto(await self.calls.cancel(current_caller(), request.job_id))
