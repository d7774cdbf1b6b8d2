"""Fine-tuning calls, shared by HTTP (``/v1/files``, ``/v1/fine_tuning/jobs``) and gRPC
(``treelm.v1.FineTuning``): a tenant uploads training files and asks for a new node under a parent
it can see; a job runner (cluster/jobs/runner.py) trains, gates, registers and serves it.

Every refusal comes before anything is stored: a bad file (BadArgument naming ``file`` and the
line), an unknown or another tenant's private parent (NodeNotVisible: the unknown node's 404), a
parent this server does not serve or whose tree has no ``customize.key`` (FineTuningOff, 501),
a bad suffix or hyperparameter (BadArgument naming it), a taken node id (NodeExists, 409), the
tenant's job quota (JobQuotaExceeded, 429), a public node asked for by a tenant that is not an
operator (PermissionDenied; with auth off every node is public, there is no tenant to own it). Every call acts on the caller's own files and jobs (tenant ``""``
when auth is off): another tenant's id is answered exactly like an unknown one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import BadArgument, FineTuningOff, PermissionDenied
from cluster.jobs.data import FILE_PURPOSES, parse_training_file
from cluster.jobs.spec import new_node_id, parse_hyperparameters
from cluster.service.access import NodeAccess
from cluster.service.admission import NodeRef
from cluster.service.auth import Caller
from cluster.service.quota import Quotas
from cluster.updates.policy import CustomizePolicy
from hierarchy.clip import clip
from registry.db import Registry
from registry.jobs import (
    FileRecord,
    JobEvent,
    JobRecord,
    JobRequest,
    add_file,
    create_job,
    delete_file,
    get_file,
    get_job,
    list_events,
    list_files,
    list_jobs,
    request_cancel,
)

__all__ = ["CreateJob", "FineTuningCalls"]

MAX_FILENAME_CHARS = 256


@dataclass(frozen=True)
class CreateJob:
    """A job as the wire asks for it (OpenAI's fields)."""

    model: str  # the parent node
    training_file: str
    suffix: str
    validation_file: str | None = None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    visibility: str = "private"  # public: operators only


class FineTuningCalls:
    """What both transports call (see the module docstring).

    ``policies``: tree name -> its update policy's ``customize`` section, for the trees whose jobs
    this server runs; ``wake``: tells the runner a job was queued or cancelled (None: it polls).
    """

    def __init__(
        self,
        registry: Registry,
        access: NodeAccess,
        policies: Mapping[str, CustomizePolicy],
        quotas: Quotas | None = None,
        wake: Callable[[], None] | None = None,
    ):
        self.registry = registry
        self._access = access
        self._policies = {tree: p for tree, p in policies.items() if p.enabled}
        self._quotas = quotas or Quotas()
        self._wake = wake

    @staticmethod
    def tenant(caller: Caller) -> str:
        return caller.tenant or ""

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake()

    # -- files ----------------------------------------------------------------------------------
    async def upload_file(self, caller: Caller, filename: str, purpose: str, content: bytes) -> FileRecord:
        if purpose not in FILE_PURPOSES:
            raise BadArgument("purpose", f"must be {' or '.join(map(repr, FILE_PURPOSES))}, got {clip(purpose)}")
        if not isinstance(filename, str) or len(filename) > MAX_FILENAME_CHARS:
            raise BadArgument("file", f"the file name must be at most {MAX_FILENAME_CHARS} characters")
        parsed = await asyncio.to_thread(parse_training_file, content, filename)
        quota = self._quotas.for_tenant(caller.tenant)
        return await asyncio.to_thread(
            add_file,
            self.registry,
            self.tenant(caller),
            filename or "upload",
            purpose,
            content,
            fmt=parsed.format,
            records=len(parsed.records),
            sha256=parsed.sha256,
            max_files=quota.stored_files,
            max_bytes=quota.stored_file_bytes,
        )

    async def list_files(self, caller: Caller) -> tuple[FileRecord, ...]:
        return await asyncio.to_thread(list_files, self.registry, self.tenant(caller))

    async def get_file(self, caller: Caller, file_id: str) -> FileRecord:
        return await asyncio.to_thread(get_file, self.registry, self.tenant(caller), file_id)

    async def delete_file(self, caller: Caller, file_id: str) -> FileRecord:
        return await asyncio.to_thread(delete_file, self.registry, self.tenant(caller), file_id)

    # -- jobs -----------------------------------------------------------------------------------
    async def create_job(self, caller: Caller, request: CreateJob) -> JobRecord:
        ref = NodeRef.parse(request.model, "model")
        if ref.version is not None:
            raise BadArgument("model", "a new node is made over the parent's served version: leave out '@version'")
        await self._access.check(ref.node, caller)  # another tenant's private parent: the unknown node's 404
        tree = ref.node.split("/")[0]
        policy = self._policies.get(tree)
        if policy is None:
            raise FineTuningOff(
                f"this server runs no fine-tuning jobs for tree {tree!r}: its update policy needs customize.key "
                "(the key that signs the nodes jobs make)"
            )
        node, _ = new_node_id(ref.node, request.suffix)
        hyper = parse_hyperparameters(request.hyperparameters, policy)
        if request.visibility not in ("private", "public"):
            raise BadArgument("visibility", f"must be 'private' or 'public', got {clip(str(request.visibility))}")
        visibility = "public" if caller.anonymous else request.visibility  # auth off: no tenant to own it
        if visibility == "public" and not (caller.operator or caller.anonymous):
            raise PermissionDenied("only an operator token may create a public node; tenants' nodes are private")
        for name in ("training_file", "validation_file"):
            value = getattr(request, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > 64):
                raise BadArgument(name, "must be the id of a file you uploaded (file-...)")
        job = JobRequest(
            tenant=self.tenant(caller),
            parent=ref.node,
            node=node,
            training_file=request.training_file,
            validation_file=request.validation_file,
            visibility=visibility,
            hyperparameters=hyper.to_dict(),
        )
        limit = self._quotas.for_tenant(caller.tenant).fine_tuning_jobs
        record = await asyncio.to_thread(create_job, self.registry, job, max_active=limit)
        self._notify()
        return record

    async def list_jobs(self, caller: Caller, limit: int = 20, after: str | None = None) -> tuple[JobRecord, ...]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise BadArgument("limit", f"must be an integer from 1 to 100, got {limit!r}")
        return await asyncio.to_thread(list_jobs, self.registry, self.tenant(caller), limit=limit, after=after or None)

    async def get_job(self, caller: Caller, job_id: str) -> JobRecord:
        return await asyncio.to_thread(get_job, self.registry, job_id, self.tenant(caller))

    async def events(
        self, caller: Caller, job_id: str, limit: int = 20, after: int | None = None
    ) -> tuple[JobEvent, ...]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise BadArgument("limit", f"must be an integer from 1 to 100, got {limit!r}")
        return await asyncio.to_thread(
            list_events, self.registry, job_id, self.tenant(caller), after=after, limit=limit
        )

    async def cancel(self, caller: Caller, job_id: str) -> JobRecord:
        record = await asyncio.to_thread(request_cancel, self.registry, job_id, self.tenant(caller))
        self._notify()
        return record
