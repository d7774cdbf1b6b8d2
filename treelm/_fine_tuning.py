"""Fine-tuning jobs in the SDK: a tenant grows the tree with its own node while it serves.

Mixed into :class:`treelm.Client` and :class:`treelm.AsyncClient` (the same calls, blocking and
asyncio). Example::

    job = client.customize("demo/en/medical", "notes.jsonl", suffix="st-marys-oncology")
    job.wait(on_event=lambda e: print(e.message, e.step, e.loss))   # JobFailed if it made no node
    print(job.fine_tuned_model, job.result["perplexity"], job.result["parent_perplexity"])
    client.generate(job.fine_tuned_model, prompt="The patient")

``customize`` uploads the data first (a file, its bytes, or records: chat records as dicts
``{"messages": [...]}`` and documents as strings), then creates the job; ``upload_file`` and
``create_job`` are the two steps alone. Uploads and job creation are never retried (a retry could
store twice); reads are. ``watch``/``wait`` follow the job's events over one server stream,
reconnecting after the last event seen when the server was unreachable for a moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import grpc

from protos.treelm.v1 import admin_pb2, fine_tuning_pb2
from treelm._errors import JobCancelled, JobFailed, Unavailable, from_rpc_error
from treelm._jobtypes import (
    FileInfo,
    JobEvent,
    JobFailure,
    JobState,
    RetiredNodes,
    TrainingData,
    create_job_request,
    event_from_proto,
    file_from_proto,
    job_from_proto,
    retired_from_proto,
    training_bytes,
    upload_chunks,
)
from treelm._transport import UNSET, Deadline, RetryPolicy

__all__ = ["AsyncFineTuneJob", "AsyncFineTuningMixin", "FineTuneJob", "FineTuningMixin"]

EventCallback = Callable[[JobEvent], None]


def _hyper(
    n_epochs: int | None, learning_rate: float | None, lora_rank: int | None, batch_size: int | None
) -> dict[str, int | float | None]:
    return {"n_epochs": n_epochs, "learning_rate": learning_rate, "lora_rank": lora_rank, "batch_size": batch_size}


def _outcome(state: JobState) -> None:
    """Nothing for a job that made its node; JobFailed (JobCancelled) for one that did not."""
    if state.status == "succeeded":
        return
    if state.status == "cancelled":
        raise JobCancelled(f"job {state.id} was cancelled; no node was made", state, "cancelled")
    error = state.error or JobFailure("failed", "the job failed")
    raise JobFailed(f"job {state.id} failed ({error.code}): {error.message}", state, error.code)


class _JobView:
    """The latest reported state's fields, shared by both handles."""

    _state: JobState

    @property
    def state(self) -> JobState:
        return self._state

    @property
    def id(self) -> str:
        return self._state.id

    @property
    def status(self) -> str:
        return self._state.status

    @property
    def node(self) -> str:
        return self._state.node

    @property
    def fine_tuned_model(self) -> str | None:
        return self._state.fine_tuned_model

    @property
    def result(self) -> Mapping[str, Any]:
        return self._state.result

    @property
    def error(self) -> JobFailure | None:
        return self._state.error

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, node={self.node!r}, status={self.status!r})"


class FineTuneJob(_JobView):
    """A fine-tuning job (blocking): its state as last fetched, and calls to follow or stop it."""

    def __init__(self, client: FineTuningMixin, state: JobState):
        self._client = client
        self._state = state

    def refresh(self) -> FineTuneJob:
        self._state = self._client._job_state(self.id)
        return self

    def events(self, limit: int = 100) -> list[JobEvent]:
        """The latest ``limit`` events (at most 100), oldest first."""
        request = fine_tuning_pb2.ListEventsRequest(job_id=self.id, limit=limit)
        reply = self._client._unary(self._client._fine_tuning.ListEvents, request, UNSET)
        return [event_from_proto(e) for e in reversed(reply.events)]

    def watch(self, *, since: int = 0, timeout: float | None = None) -> Iterator[JobEvent]:
        """The job's events oldest first (after event ``since``), as they happen, until it ends."""
        deadline, last, attempt = Deadline(timeout), since, 0
        policy: RetryPolicy = self._client._policy
        while True:
            request = fine_tuning_pb2.WatchJobRequest(job_id=self.id, since=last)
            call = self._client._fine_tuning.WatchJob(
                request, timeout=deadline.remaining(), metadata=self._client._metadata
            )
            try:
                for message in call:
                    event = event_from_proto(message)
                    last, attempt = event.id, 0
                    yield event
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                pause = policy.backoff(attempt, error.retry_after)
                if not (
                    isinstance(error, Unavailable) and policy.should_retry(error, attempt, deadline.remaining(), pause)
                ):
                    raise error from exc
                time.sleep(pause)
                attempt += 1
            finally:
                call.cancel()

    def wait(self, timeout: float | None = None, on_event: EventCallback | None = None) -> FineTuneJob:
        """Follow the job until it ends (``on_event`` sees each event); this job once it made its
        node, else JobFailed (JobCancelled) with its final state. DeadlineExceeded after ``timeout``."""
        for event in self.watch(timeout=timeout):
            if on_event is not None:
                on_event(event)
        _outcome(self.refresh().state)
        return self

    def cancel(self) -> FineTuneJob:
        """A queued job ends at once; a running one at its next step (JobFinished if it ended)."""
        request = fine_tuning_pb2.JobRequest(job_id=self.id)
        reply = self._client._unary(self._client._fine_tuning.CancelJob, request, UNSET, idempotent=False)
        self._state = job_from_proto(reply)
        return self


class FineTuningMixin:
    """The fine-tuning calls of :class:`treelm.Client` (see the module docstring)."""

    # Provided by the client.
    _fine_tuning: Any
    _admin: Any
    _metadata: Any
    _policy: RetryPolicy
    _unary: Callable[..., Any]

    def upload_file(
        self,
        file: TrainingData,
        purpose: str = "fine-tune",
        *,
        filename: str | None = None,
        timeout: float | None = UNSET,
    ) -> FileInfo:
        """Upload a training file (a path, or its bytes): JSON Lines of chat records or plain text,
        at most 8 MiB. InvalidRequest (field ``file``, the line named) when the server refuses it."""
        name, content = training_bytes(file)
        chunks = upload_chunks(filename or name, purpose, content)
        return file_from_proto(self._unary(self._fine_tuning.UploadFile, chunks, timeout, idempotent=False))

    def files(self, *, timeout: float | None = UNSET) -> list[FileInfo]:
        """Your tenant's training files, newest first."""
        reply = self._unary(self._fine_tuning.ListFiles, fine_tuning_pb2.ListFilesRequest(), timeout)
        return [file_from_proto(f) for f in reply.files]

    def file(self, file_id: str, *, timeout: float | None = UNSET) -> FileInfo:
        return file_from_proto(
            self._unary(self._fine_tuning.GetFile, fine_tuning_pb2.FileRequest(file_id=file_id), timeout)
        )

    def delete_file(self, file_id: str, *, timeout: float | None = UNSET) -> bool:
        request = fine_tuning_pb2.FileRequest(file_id=file_id)
        return bool(self._unary(self._fine_tuning.DeleteFile, request, timeout, idempotent=False).deleted)

    def create_job(
        self,
        parent: str,
        training_file: str,
        *,
        suffix: str,
        validation_file: str | None = None,
        n_epochs: int | None = None,
        learning_rate: float | None = None,
        lora_rank: int | None = None,
        batch_size: int | None = None,
        public: bool = False,
        timeout: float | None = UNSET,
    ) -> FineTuneJob:
        """A job over files you uploaded: the node ``parent/suffix``, private unless ``public``
        (operator tokens only). Refusals: NodeNotFound, FileNotFound, NodeExists, JobQuotaExceeded,
        InvalidRequest naming the field, PermissionDenied, FineTuningOff."""
        request = create_job_request(
            parent,
            training_file,
            suffix=suffix,
            validation_file=validation_file,
            hyperparameters=_hyper(n_epochs, learning_rate, lora_rank, batch_size),
            public=public,
        )
        reply = self._unary(self._fine_tuning.CreateJob, request, timeout, idempotent=False)
        return FineTuneJob(self, job_from_proto(reply))

    def customize(
        self,
        parent: str,
        data: TrainingData,
        *,
        suffix: str,
        validation: TrainingData | None = None,
        n_epochs: int | None = None,
        learning_rate: float | None = None,
        lora_rank: int | None = None,
        batch_size: int | None = None,
        public: bool = False,
        timeout: float | None = UNSET,
    ) -> FineTuneJob:
        """Upload ``data`` (and ``validation``) and create a job for the node ``parent/suffix``;
        ``.wait()`` on the returned job follows it to its end."""
        training = self.upload_file(data, timeout=timeout).id
        held_out = self.upload_file(validation, timeout=timeout).id if validation is not None else None
        return self.create_job(
            parent,
            training,
            suffix=suffix,
            validation_file=held_out,
            n_epochs=n_epochs,
            learning_rate=learning_rate,
            lora_rank=lora_rank,
            batch_size=batch_size,
            public=public,
            timeout=timeout,
        )

    def fine_tuning_jobs(
        self, *, limit: int = 20, after: str | None = None, timeout: float | None = UNSET
    ) -> list[FineTuneJob]:
        """Your tenant's jobs, newest first (``after``: the next page, older than that job)."""
        request = fine_tuning_pb2.ListJobsRequest(limit=limit, after=after or "")
        reply = self._unary(self._fine_tuning.ListJobs, request, timeout)
        return [FineTuneJob(self, job_from_proto(j)) for j in reply.jobs]

    def fine_tuning_job(self, job_id: str, *, timeout: float | None = UNSET) -> FineTuneJob:
        return FineTuneJob(self, self._job_state(job_id, timeout))

    def _job_state(self, job_id: str, timeout: float | None = UNSET) -> JobState:
        return job_from_proto(self._unary(self._fine_tuning.GetJob, fine_tuning_pb2.JobRequest(job_id=job_id), timeout))

    def retire_node(self, node: str, force: bool = False, *, timeout: float | None = UNSET) -> RetiredNodes:
        """Stop serving ``node`` and keep its records (operator tokens only); a node with children
        is refused unless ``force`` (then they are retired too). Never retried."""
        request = admin_pb2.RetireNodeRequest(node=node, force=force)
        return retired_from_proto(self._unary(self._admin.RetireNode, request, timeout, idempotent=False))


class AsyncFineTuneJob(_JobView):
    """A fine-tuning job (asyncio); see :class:`FineTuneJob`."""

    def __init__(self, client: AsyncFineTuningMixin, state: JobState):
        self._client = client
        self._state = state

    async def refresh(self) -> AsyncFineTuneJob:
        self._state = await self._client._job_state(self.id)
        return self

    async def events(self, limit: int = 100) -> list[JobEvent]:
        request = fine_tuning_pb2.ListEventsRequest(job_id=self.id, limit=limit)
        reply = await self._client._unary(self._client._fine_tuning.ListEvents, request, UNSET)
        return [event_from_proto(e) for e in reversed(reply.events)]

    async def watch(self, *, since: int = 0, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        deadline, last, attempt = Deadline(timeout), since, 0
        policy: RetryPolicy = self._client._policy
        while True:
            request = fine_tuning_pb2.WatchJobRequest(job_id=self.id, since=last)
            call = self._client._fine_tuning.WatchJob(
                request, timeout=deadline.remaining(), metadata=self._client._metadata
            )
            try:
                async for message in call:
                    event = event_from_proto(message)
                    last, attempt = event.id, 0
                    yield event
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                pause = policy.backoff(attempt, error.retry_after)
                if not (
                    isinstance(error, Unavailable) and policy.should_retry(error, attempt, deadline.remaining(), pause)
                ):
                    raise error from exc
                await asyncio.sleep(pause)
                attempt += 1
            finally:
                call.cancel()

    async def wait(self, timeout: float | None = None, on_event: EventCallback | None = None) -> AsyncFineTuneJob:
        async for event in self.watch(timeout=timeout):
            if on_event is not None:
                on_event(event)
        _outcome((await self.refresh()).state)
        return self

    async def cancel(self) -> AsyncFineTuneJob:
        request = fine_tuning_pb2.JobRequest(job_id=self.id)
        reply = await self._client._unary(self._client._fine_tuning.CancelJob, request, UNSET, idempotent=False)
        self._state = job_from_proto(reply)
        return self


class AsyncFineTuningMixin:
    """The fine-tuning calls of :class:`treelm.AsyncClient`; see :class:`FineTuningMixin`."""

    _fine_tuning: Any
    _admin: Any
    _metadata: Any
    _policy: RetryPolicy
    _unary: Callable[..., Any]

    async def upload_file(
        self,
        file: TrainingData,
        purpose: str = "fine-tune",
        *,
        filename: str | None = None,
        timeout: float | None = UNSET,
    ) -> FileInfo:
        name, content = await asyncio.to_thread(training_bytes, file)
        chunks = upload_chunks(filename or name, purpose, content)
        reply = await self._unary(self._fine_tuning.UploadFile, chunks, timeout, idempotent=False)
        return file_from_proto(reply)

    async def files(self, *, timeout: float | None = UNSET) -> list[FileInfo]:
        reply = await self._unary(self._fine_tuning.ListFiles, fine_tuning_pb2.ListFilesRequest(), timeout)
        return [file_from_proto(f) for f in reply.files]

    async def file(self, file_id: str, *, timeout: float | None = UNSET) -> FileInfo:
        request = fine_tuning_pb2.FileRequest(file_id=file_id)
        return file_from_proto(await self._unary(self._fine_tuning.GetFile, request, timeout))

    async def delete_file(self, file_id: str, *, timeout: float | None = UNSET) -> bool:
        request = fine_tuning_pb2.FileRequest(file_id=file_id)
        return bool((await self._unary(self._fine_tuning.DeleteFile, request, timeout, idempotent=False)).deleted)

    async def create_job(
        self,
        parent: str,
        training_file: str,
        *,
        suffix: str,
        validation_file: str | None = None,
        n_epochs: int | None = None,
        learning_rate: float | None = None,
        lora_rank: int | None = None,
        batch_size: int | None = None,
        public: bool = False,
        timeout: float | None = UNSET,
    ) -> AsyncFineTuneJob:
        request = create_job_request(
            parent,
            training_file,
            suffix=suffix,
            validation_file=validation_file,
            hyperparameters=_hyper(n_epochs, learning_rate, lora_rank, batch_size),
            public=public,
        )
        reply = await self._unary(self._fine_tuning.CreateJob, request, timeout, idempotent=False)
        return AsyncFineTuneJob(self, job_from_proto(reply))

    async def customize(
        self,
        parent: str,
        data: TrainingData,
        *,
        suffix: str,
        validation: TrainingData | None = None,
        n_epochs: int | None = None,
        learning_rate: float | None = None,
        lora_rank: int | None = None,
        batch_size: int | None = None,
        public: bool = False,
        timeout: float | None = UNSET,
    ) -> AsyncFineTuneJob:
        training = (await self.upload_file(data, timeout=timeout)).id
        held_out = (await self.upload_file(validation, timeout=timeout)).id if validation is not None else None
        return await self.create_job(
            parent,
            training,
            suffix=suffix,
            validation_file=held_out,
            n_epochs=n_epochs,
            learning_rate=learning_rate,
            lora_rank=lora_rank,
            batch_size=batch_size,
            public=public,
            timeout=timeout,
        )

    async def fine_tuning_jobs(
        self, *, limit: int = 20, after: str | None = None, timeout: float | None = UNSET
    ) -> list[AsyncFineTuneJob]:
        request = fine_tuning_pb2.ListJobsRequest(limit=limit, after=after or "")
        reply = await self._unary(self._fine_tuning.ListJobs, request, timeout)
        return [AsyncFineTuneJob(self, job_from_proto(j)) for j in reply.jobs]

    async def fine_tuning_job(self, job_id: str, *, timeout: float | None = UNSET) -> AsyncFineTuneJob:
        return AsyncFineTuneJob(self, await self._job_state(job_id, timeout))

    async def _job_state(self, job_id: str, timeout: float | None = UNSET) -> JobState:
        request = fine_tuning_pb2.JobRequest(job_id=job_id)
        return job_from_proto(await self._unary(self._fine_tuning.GetJob, request, timeout))

    async def retire_node(self, node: str, force: bool = False, *, timeout: float | None = UNSET) -> RetiredNodes:
        request = admin_pb2.RetireNodeRequest(node=node, force=force)
        return retired_from_proto(await self._unary(self._admin.RetireNode, request, timeout, idempotent=False))
