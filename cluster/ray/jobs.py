"""Fine-tuning jobs on a Ray cluster: each job is a Ray task with its own resource request.

The update desk (cluster/ray/desk.py) runs one :class:`~cluster.jobs.runner.JobRunner` per tree whose
update policy has ``customize.key``, with a :class:`RayLauncher`: a claimed job becomes a task asking
for ``ingress.job_cpus`` CPUs (cluster.yaml), so Ray places it on any machine with that much free:
operators add training capacity by adding Ray machines, and the trunk replicas keep the CPUs they
reserved (a job waits in Ray's queue rather than taking a replica's cores). The task trains into a
temp dir on its machine and returns the node's files with its figures; the desk writes them into the
job's staged dir beside the tree and registers the node (one writer per tree). The task reads the
tree dir (the base, the parent chain, the parent's text) where the desk has it: on one machine, or
on others through a shared mount, as the replicas do. Cancelling a job cancels its task (forced:
the worker process ends).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray

from cluster.errors import JobError
from cluster.jobs.runner import JobLaunch
from cluster.ray.priority import niceness, yield_to_serving
from cluster.ray.wire import remote_cause

__all__ = ["RayJobHandle", "RayLauncher"]


def _train(launch: JobLaunch, threads: int) -> tuple[Any, ...]:
    """The task: ("ok", result, {relative path: bytes}) or ("error", code, message, figures)."""
    from cluster.jobs.worker import run_job

    yield_to_serving()  # a replica on the same machine decodes first
    context = ray.get_runtime_context()
    # Where it ran, what Ray gave it and at what priority: recorded in the job's result (operators see the placement).
    ran_on = {
        "ray_node": context.get_node_id(),
        "resources": dict(context.get_assigned_resources()),
        "niceness": niceness(),
    }
    with tempfile.TemporaryDirectory(prefix=f"treelm-{launch.job_id}-") as tmp:
        try:
            result = run_job(launch.db_url, launch.tree_dir, launch.job_id, tmp, threads, launch.policy)
        except JobError as exc:
            return ("error", exc.code, str(exc), dict(getattr(exc, "figures", {}) or {}))
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
        return ("ok", dict(result) | {"ran_on": ran_on}, files)


class RayJobHandle:
    """A job's task (see :class:`RayLauncher`)."""

    def __init__(self, ref: ray.ObjectRef, out_dir: str):
        self._ref = ref
        self._out = Path(out_dir)

    def done(self) -> bool:
        ready, _ = ray.wait([self._ref], timeout=0)
        return bool(ready)

    def result(self) -> dict[str, Any]:
        try:
            message = ray.get(self._ref)
        except ray.exceptions.RayTaskError as exc:
            cause = remote_cause(exc)
            raise JobError("worker", f"the job's Ray task failed: {type(cause).__name__}: {cause}") from None
        except (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.TaskCancelledError,
        ) as exc:
            raise JobError("worker", f"the job's Ray task ended without a result ({type(exc).__name__})") from None
        if message[0] == "error":
            _, code, text, figures = message
            raise JobError(code, text, figures)
        _, result, files = message
        for name, data in files.items():
            target = self._out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return dict(result) | {"out_dir": str(self._out)}

    def cancel(self) -> None:
        ray.cancel(self._ref, force=True)


class RayLauncher:
    """Starts each job as a Ray task asking for ``cpus`` CPUs, trained with ``threads`` torch threads."""

    def __init__(self, cpus: float = 1.0, threads: int = 1):
        if cpus <= 0:
            raise ValueError(f"a job's task needs some CPU: job_cpus must be > 0, got {cpus!r}")
        self.cpus = cpus
        self.threads = threads
        # max_retries=0: a job whose worker died ends failed (the tenant sees why) rather than
        # training again behind the runner's back. max_calls=1: the worker lowered its priority
        # (cluster.ray.priority) and holds a base model; it exits rather than serve Ray again.
        self._task = ray.remote(num_cpus=cpus, max_retries=0, max_calls=1)(_train)

    def start(self, launch: JobLaunch) -> RayJobHandle:
        ref = self._task.options(name=f"treelm-job-{launch.job_id}").remote(launch, self.threads)
        return RayJobHandle(ref, launch.out_dir)
