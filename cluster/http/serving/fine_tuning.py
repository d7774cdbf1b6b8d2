"""OpenAI's fine-tuning jobs endpoints, over the calls gRPC uses (cluster/service/fine_tuning.py).

    POST /v1/fine_tuning/jobs                {model: parent node, training_file, validation_file?, suffix,
                                              hyperparameters? (or method.supervised.hyperparameters),
                                              visibility?} -> the queued job
    GET  /v1/fine_tuning/jobs?limit=&after=  the caller's jobs, newest first, with has_more
    GET  /v1/fine_tuning/jobs/{id}           one job; fine_tuned_model is the new node once it succeeded
    GET  /v1/fine_tuning/jobs/{id}/events?limit=&after=   its events, newest first
    POST /v1/fine_tuning/jobs/{id}/cancel    a queued job ends at once, a running one at its next step

Objects have OpenAI's fields and values (``created_at`` in Unix seconds, ``status`` one of queued,
running, succeeded, failed, cancelled, ``error`` {code, message, param}) plus TreeLM's ``node``,
``visibility``, ``started_at``, ``cancel_requested`` and ``result`` (the new node's and its
parent's held-out perplexities, timings, the version registered). Refusals take the error table's
status and OpenAI's error shape: 400 naming the parameter (``suffix``, ``hyperparameters.n_epochs``,
``training_file``, ...), 404 ``model_not_found`` for an unknown parent and another tenant's private
one alike, 404 ``file_not_found`` / ``job_not_found``, 409 ``node_exists`` and ``job_finished``,
429 ``job_quota`` with Retry-After, 403 for a public node without an operator token, 501
``fine_tuning_off``.
"""

from __future__ import annotations

from typing import Any

from cluster.errors import BadArgument
from cluster.http.protocol import (
    FineTuningJob,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    FineTuningJobRequest,
    JobErrorObject,
    JobHyperparameters,
)
from cluster.service.auth import Caller
from cluster.service.fine_tuning import CreateJob, FineTuningCalls
from cluster.service.fine_tuning_io import DEFAULT_PAGE, events_page, jobs_page, served
from registry.jobs import JobEvent, JobRecord

__all__ = ["EVENT_ID_PREFIX", "FineTuningServing", "event_object", "job_object"]

EVENT_ID_PREFIX = "ftevent-"
_METRICS = ("step", "loss", "perplexity", "parent_perplexity")


def _seconds(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def job_object(j: JobRecord) -> FineTuningJob:
    h = dict(j.hyperparameters)
    hyper = JobHyperparameters(
        n_epochs=_int(h.get("n_epochs")),
        batch_size=_int(h.get("batch_size")),
        learning_rate=float(h["learning_rate"]) if isinstance(h.get("learning_rate"), (int, float)) else None,
        lora_rank=_int(h.get("lora_rank")),
    )
    error = None
    if j.error:
        error = JobErrorObject(
            code=str(j.error.get("code") or "failed"),
            message=str(j.error.get("message") or ""),
            param=str(j.error["param"]) if j.error.get("param") else None,
        )
    return FineTuningJob(
        id=j.job_id,
        model=j.parent,
        created_at=int(j.created_at.timestamp()),
        finished_at=_seconds(j.finished_at),
        fine_tuned_model=j.fine_tuned_model,
        organization_id=j.tenant,
        result_files=[],
        status=j.status,  # type: ignore[arg-type]  # the registry's vocabulary is OpenAI's
        training_file=j.training_file,
        validation_file=j.validation_file,
        hyperparameters=hyper,
        trained_tokens=_int(j.result.get("trained_tokens")),
        error=error,
        seed=_int(j.result.get("seed")) or 0,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper.model_dump(exclude_none=True)}},
        user_provided_suffix=j.node.rsplit("/", 1)[-1],
        node=j.node,
        visibility=j.visibility,
        started_at=_seconds(j.started_at),
        cancel_requested=j.cancel_requested,
        result=dict(j.result),
    )


def event_object(e: JobEvent) -> FineTuningJobEvent:
    data = dict(e.data)
    return FineTuningJobEvent(
        id=f"{EVENT_ID_PREFIX}{e.id}",
        created_at=int(e.created_at.timestamp()),
        level="warn" if e.level == "warning" else e.level,
        message=e.message,
        data=data,
        type="metrics" if any(k in data for k in _METRICS) else "message",
    )


def _limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_PAGE
    if not text.isdigit() or len(text) > 6:
        raise BadArgument("limit", f"must be a whole number, got {text[:20]!r}")
    return int(text)


def _event_id(text: str | None) -> int | None:
    if not text:
        return None
    digits = text.removeprefix(EVENT_ID_PREFIX)
    if not digits.isdigit() or len(digits) > 18:
        raise BadArgument("after", f"must be an event id ({EVENT_ID_PREFIX}<n>), got {text[:40]!r}")
    return int(digits)


def create_job(body: FineTuningJobRequest) -> CreateJob:
    hyper = body.hyperparameters
    supervised = body.method.supervised if body.method is not None else None
    if supervised is not None and supervised.hyperparameters is not None:
        if hyper is not None:
            raise BadArgument("method", "give hyperparameters or method.supervised.hyperparameters, not both")
        hyper = supervised.hyperparameters
    if body.suffix is None:
        raise BadArgument("suffix", "is required: the new node's name, e.g. 'st-marys-oncology'")
    return CreateJob(
        model=body.model,
        training_file=body.training_file,
        suffix=body.suffix,
        validation_file=body.validation_file,
        hyperparameters=dict(hyper or {}),
        visibility=body.visibility or "private",
    )


class FineTuningServing:
    """Translation between the jobs endpoints and the shared fine-tuning calls."""

    def __init__(self, calls: FineTuningCalls | None):
        self._calls = calls

    async def create(self, body: FineTuningJobRequest, caller: Caller) -> FineTuningJob:
        return job_object(await served(self._calls).create_job(caller, create_job(body)))

    async def list_jobs(self, caller: Caller, limit: str | None, after: str | None) -> FineTuningJobList:
        page = await jobs_page(served(self._calls), caller, _limit(limit), after or None)
        return FineTuningJobList(data=[job_object(j) for j in page.items], has_more=page.has_more)

    async def retrieve(self, caller: Caller, job_id: str) -> FineTuningJob:
        return job_object(await served(self._calls).get_job(caller, job_id))

    async def events(self, caller: Caller, job_id: str, limit: str | None, after: str | None) -> FineTuningJobEventList:
        page = await events_page(served(self._calls), caller, job_id, _limit(limit), _event_id(after))
        return FineTuningJobEventList(data=[event_object(e) for e in page.items], has_more=page.has_more)

    async def cancel(self, caller: Caller, job_id: str) -> FineTuningJob:
        return job_object(await served(self._calls).cancel(caller, job_id))
