"""Run one tree's fine-tuning jobs: claim, train in a worker, register, end the job.

    runner = JobRunner(registry, coordinator, policy.customize, ProcessLauncher(threads=1),
                       worker_name="serve@host")
    runner.start()       # fails the jobs a previous process left running; a thread claims queued jobs
    runner.wake()        # a job was queued or cancelled (FineTuningCalls' ``wake``): look now
    runner.stop()        # the job in progress is stopped and ends failed ("interrupted")

One runner per tree (it fails every job of its tree it finds running when it starts), one job
at a time. A job's worker (``Launcher.start``: a spawned process here, a Ray
task on a cluster) trains and gates the node into ``TREE_DIR/jobs/<job_id>/`` and returns its
figures; the runner then has the update desk register, sign and serve it
(``coordinator.add_node``) and ends the job ``succeeded`` with its result: the perplexities and
the timings ``queue_s`` (created -> started), ``worker_s`` (the worker, start to end), ``train_s``,
``gate_s`` and ``register_s``. A failure ends it ``failed`` with ``{code, message}`` (and the
gate's perplexities when it got that far); a cancellation stops the worker and ends it
``cancelled``. Either way nothing is served or stored as a version, and the staged dir is removed.

A job's worker takes ``threads`` CPU threads in its own process (``treelm serve --job-threads``),
beside the serving engine's.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from cluster.errors import ClusterError, JobError
from cluster.jobs.train import TrainedNode
from cluster.jobs.worker import policy_dict
from cluster.updates.grow import NewNode, NodeAdded
from cluster.updates.policy import CustomizePolicy
from hierarchy.errors import HierarchyError
from nodes.errors import NodesError
from registry.db import Registry
from registry.errors import JobFinished, RegistryError
from registry.jobs import JobRecord, cancel_requested, claim_job, fail_interrupted, finish_job, list_jobs

__all__ = [
    "JOBS_DIR",
    "JobHandle",
    "JobLaunch",
    "JobRunner",
    "Launcher",
    "NodeRegistrar",
    "ProcessLauncher",
]

log = logging.getLogger("treelm.jobs")
JOBS_DIR = "jobs"  # under the tree dir: one staged dir per running job


@dataclass(frozen=True)
class JobLaunch:
    """Everything a worker needs, as plain values (it crosses into another process or a Ray task)."""

    db_url: str  # the registry (with its password: the worker opens its own connection)
    tree_dir: str
    job_id: str
    out_dir: str  # the staged dir the worker writes the node into
    policy: Mapping[str, Any] = field(default_factory=dict)  # the tree's customize section, as a dict


class JobHandle(Protocol):
    """A started worker."""

    def done(self) -> bool:
        """True once ``result`` will not block."""
        ...

    def result(self) -> dict[str, Any]:
        """The worker's TrainedNode as a dict; JobError (with its code) when it failed."""
        ...

    def cancel(self) -> None:
        """Stop the worker now (idempotent); ``result`` is not asked afterwards."""
        ...


class Launcher(Protocol):
    """Starts workers: a process here (``ProcessLauncher``), a Ray task with its own resources on a cluster."""

    def start(self, launch: JobLaunch) -> JobHandle: ...


class NodeRegistrar(Protocol):
    """What the runner needs of the update desk (a Coordinator, or a proxy to the Ray desk actor)."""

    def add_node(self, new: NewNode) -> NodeAdded: ...


# -- a worker process -------------------------------------------------------------------------------
def _child(launch: JobLaunch, threads: int, conn: Connection) -> None:
    """The spawned process: run the job, send ("ok", result) or ("error", code, message, figures)."""
    from cluster.jobs.worker import run_job

    try:
        result = run_job(launch.db_url, launch.tree_dir, launch.job_id, launch.out_dir, threads, launch.policy)
        conn.send(("ok", result))
    except JobError as exc:
        conn.send(("error", exc.code, str(exc), dict(exc.figures)))
    except BaseException as exc:  # anything else is the worker's fault: said as such, never lost
        conn.send(("error", "worker", f"{type(exc).__name__}: {exc}", {}))
    finally:
        conn.close()


class ProcessHandle:
    """A job running in a spawned process (see :class:`ProcessLauncher`)."""

    def __init__(self, process: Any, conn: Connection):
        self._process = process
        self._conn = conn
        self._message: tuple | None = None

    def done(self) -> bool:
        return self._message is not None or self._conn.poll() or not self._process.is_alive()

    def result(self) -> dict[str, Any]:
        if self._message is None:
            try:
                self._message = self._conn.recv() if self._conn.poll(5.0) else None
            except (EOFError, OSError):
                self._message = None
        self._process.join(timeout=30)
        message = self._message
        if message is None:
            code = self._process.exitcode
            raise JobError("worker", f"the job's worker process ended without a result (exit code {code})")
        if message[0] == "ok":
            return dict(message[1])
        _, code, text, figures = message
        raise JobError(code, text, figures)

    def cancel(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=10)
        self._conn.close()


class ProcessLauncher:
    """Each job in a fresh ``spawn`` process with ``threads`` torch threads (no state shared with the
    server: the worker loads its own copy of the base, and ends with the job)."""

    def __init__(self, threads: int = 1):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.threads = threads
        self._context = multiprocessing.get_context("spawn")

    def start(self, launch: JobLaunch) -> ProcessHandle:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child, args=(launch, self.threads, send), name=f"treelm-job-{launch.job_id}", daemon=True
        )
        process.start()
        send.close()  # the child holds the sending end now: EOF once it exits
        return ProcessHandle(process, receive)


# -- the runner -------------------------------------------------------------------------------------
def _new_node(job: JobRecord, trained: TrainedNode) -> NewNode:
    return NewNode(
        node=job.node,
        staged_dir=Path(trained.out_dir),
        over=trained.over,
        visibility=job.visibility,
        owner=job.tenant or None,
        metrics=trained.metrics(),
        lora=trained.lora,
        training=trained.training,
        data=trained.data,
        description=f"made by fine-tuning job {job.job_id} over {job.parent}",
        job_id=job.job_id,
    )


def _error(exc: BaseException, code: str) -> dict[str, str]:
    return {"code": getattr(exc, "code", code), "message": str(exc)}


class JobRunner:
    """Claims and runs one tree's queued jobs in a thread (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        coordinator: NodeRegistrar,
        policy: CustomizePolicy,
        launcher: Launcher,
        *,
        worker_name: str,
        poll_s: float = 2.0,
        tree: str | None = None,
        tree_dir: str | Path | None = None,
    ):
        """``tree`` and ``tree_dir`` default to the coordinator's (give them with a desk proxy);
        ``worker_name`` is recorded on each job it claims; ``poll_s``: how often it looks for queued
        jobs and cancellations when nobody calls ``wake``."""
        self.registry = registry
        self.coordinator = coordinator
        self.policy = policy
        self.launcher = launcher
        self.worker_name = worker_name
        self.poll_s = poll_s
        desk: Any = coordinator
        self.tree: str = tree or desk.tree.name
        self.root = Path(tree_dir) if tree_dir is not None else Path(desk.store.root)
        self._db_url = registry.engine.url.render_as_string(hide_password=False)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: str | None = None  # the job running now

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Fail the jobs a previous process left running (their worker is gone), remove staged dirs
        no running job owns, then claim queued jobs in a thread."""
        if self._thread is not None:
            return
        for job_id in fail_interrupted(self.registry, self.tree, "interrupted by a server restart"):
            log.warning("job %s was running when the server stopped: marked failed", job_id)
        running = {j.job_id for j in list_jobs(self.registry, None, statuses=("running",), tree=self.tree, limit=100)}
        jobs = self.root / JOBS_DIR
        for staged in jobs.iterdir() if jobs.is_dir() else ():
            if staged.name not in running:
                shutil.rmtree(staged, ignore_errors=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"treelm-jobs-{self.tree}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was queued or cancelled: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop claiming; a job in progress is stopped and ends failed ("interrupted")."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = claim_job(self.registry, self.tree, self.worker_name)
            except RegistryError as exc:  # the database is away: try again later
                log.warning("cannot claim fine-tuning jobs of %s: %s", self.tree, exc)
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            try:
                self.run(job)
            except Exception:  # a bug (or the database gone) must not stop the queue
                log.exception("fine-tuning job %s failed in the runner", job.job_id)
                try:
                    self._finish(job.job_id, "failed", error={"code": "worker", "message": "internal error"})
                except RegistryError:  # still running in the registry: the next start fails it
                    pass

    # -- one job ------------------------------------------------------------------------------------
    def run(self, job: JobRecord) -> None:
        """Run a claimed (running) job to its end."""
        self.current = job.job_id
        staged = self.root / JOBS_DIR / job.job_id
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        timings: dict[str, float] = {}
        if job.started_at is not None:
            timings["queue_s"] = round((job.started_at - job.created_at).total_seconds(), 3)
        try:
            self._run(job, staged, timings)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
            self.current = None

    def _run(self, job: JobRecord, staged: Path, timings: dict[str, float]) -> None:
        launch = JobLaunch(self._db_url, str(self.root), job.job_id, str(staged), policy_dict(self.policy))
        started = time.perf_counter()
        try:
            handle = self.launcher.start(launch)
        except Exception as exc:
            self._finish(job.job_id, "failed", timings, error=_error(exc, "worker"))
            return
        while not handle.done():
            self._wake.wait(min(self.poll_s, 0.5))
            self._wake.clear()
            if self._stop.is_set():
                handle.cancel()
                self._finish(
                    job.job_id,
                    "failed",
                    timings,
                    error={"code": "interrupted", "message": "interrupted: the server stopped while the job ran"},
                )
                return
            if self._cancel_requested(job.job_id):
                handle.cancel()
                self._finish(job.job_id, "cancelled", timings)
                return
        try:
            raw = dict(handle.result())
            placement = raw.pop("ran_on", None)  # a launcher's note of where the worker ran (Ray: machine, CPUs)
            trained = TrainedNode.from_dict(raw)
        except JobError as exc:
            timings["worker_s"] = round(time.perf_counter() - started, 3)
            status = "cancelled" if exc.code == "cancelled" else "failed"
            self._finish(job.job_id, status, timings | dict(exc.figures), error=_error(exc, "worker"))
            return
        timings["worker_s"] = round(time.perf_counter() - started, 3)
        timings |= {"train_s": round(trained.train_seconds, 3), "gate_s": round(trained.gate_seconds, 3)}
        figures = {
            "held_out_ppl": trained.held_out_ppl,
            "parent_held_out_ppl": trained.parent_held_out_ppl,
            "forgetting": trained.forgetting,
            "steps": trained.steps,
            "trained_tokens": trained.tokens,
        }
        if placement is not None:
            figures["ran_on"] = placement
        if self._cancel_requested(job.job_id):  # asked while the worker finished: nothing is registered
            self._finish(job.job_id, "cancelled", timings | figures)
            return
        registering = time.perf_counter()
        try:
            added = self.coordinator.add_node(_new_node(job, trained))
        except (ClusterError, RegistryError, NodesError, HierarchyError, OSError) as exc:
            timings["register_s"] = round(time.perf_counter() - registering, 3)
            self._finish(job.job_id, "failed", timings | figures, error=_error(exc, "registration"))
            return
        timings["register_s"] = round(time.perf_counter() - registering, 3)
        result = timings | figures | {"version": added.version, "update_id": added.update_id, "pin": added.pin_status}
        self._finish(job.job_id, "succeeded", result, message=f"job succeeded: {job.node} is served")

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return cancel_requested(self.registry, job_id)
        except RegistryError:
            return False

    def _finish(
        self,
        job_id: str,
        status: str,
        result: Mapping[str, Any] | None = None,
        *,
        error: Mapping[str, Any] | None = None,
        message: str | None = None,
    ) -> None:
        try:
            finish_job(self.registry, job_id, status, result=result, error=error, message=message)
        except JobFinished:  # ended meanwhile (a restart's clean-up): its first end stands
            log.warning("job %s had already ended; its %s outcome is not recorded", job_id, status)
