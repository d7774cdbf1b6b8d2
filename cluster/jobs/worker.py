"""One job in its own process (or Ray task): read the job and its files from the registry, train,
gate, write the adapter into the staged dir, return the result as a plain dict.

    run_job("sqlite:///registry.db", "build/demo", "ftjob-...", "build/demo/jobs/ftjob-...", threads=1)

Everything it takes and returns is plain (strings, numbers, dicts), so the same function runs in a
``multiprocessing`` spawn process (cluster/jobs/runner.py, ``ProcessLauncher``) or as a Ray task.
It opens its own registry connection, writes progress events there (throttled: at most one a
second or every 10 steps), and stops between steps once the job's cancellation is requested. A
failure is a :class:`~cluster.errors.JobError` whose ``code`` says where (data, parent, training,
gate, cancelled); nothing is written outside ``out_dir``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cluster.errors import JobError
from cluster.updates.policy import CustomizePolicy, UpdatePolicy
from nodes.errors import NodesError
from registry.db import open_registry
from registry.errors import RegistryError
from registry.jobs import add_event, cancel_requested, file_content, get_file, get_job

__all__ = ["policy_dict", "run_job"]

log = logging.getLogger("treelm.jobs")
_CANCEL_CHECK_S = 1.0


def _policy(tree_dir: str, policy: CustomizePolicy | Mapping[str, Any] | None) -> CustomizePolicy:
    if isinstance(policy, CustomizePolicy):
        return policy
    if policy is not None:
        return CustomizePolicy(**dict(policy))
    return UpdatePolicy.for_tree(tree_dir).customize


def run_job(
    db_url: str,
    tree_dir: str,
    job_id: str,
    out_dir: str,
    threads: int = 1,
    policy: CustomizePolicy | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train job ``job_id``'s node into ``out_dir`` with ``threads`` torch threads; the
    :class:`~cluster.jobs.train.TrainedNode` as a dict. ``policy``: the tree's ``customize``
    section (None: read from TREE_DIR/update-policy.yaml)."""
    import torch

    from cluster.jobs.train import train_job

    torch.set_num_threads(max(1, int(threads)))
    registry = open_registry(db_url)
    try:
        job = get_job(registry, job_id)
        train_record = get_file(registry, job.tenant, job.training_file)
        training = file_content(registry, job.tenant, job.training_file)
        validation, validation_name = None, ""
        if job.validation_file is not None:
            validation_name = get_file(registry, job.tenant, job.validation_file).filename
            validation = file_content(registry, job.tenant, job.validation_file)

        def on_event(message: str, data: Mapping[str, Any]) -> None:
            try:
                add_event(registry, job_id, message, data)
            except RegistryError as exc:  # progress is best effort; the job's outcome is what counts
                log.warning("job %s: could not record an event: %s", job_id, exc)

        checked = [0.0]

        def should_stop() -> bool:
            now = time.monotonic()
            if now - checked[0] < _CANCEL_CHECK_S:
                return False
            checked[0] = now
            try:
                return cancel_requested(registry, job_id)
            except RegistryError:
                return False

        trained = train_job(
            tree_dir,
            job,
            training,
            validation,
            _policy(tree_dir, policy),
            Path(out_dir),
            training_name=train_record.filename,
            validation_name=validation_name,
            on_event=on_event,
            should_stop=should_stop,
        )
        return trained.to_dict()
    except (JobError, RegistryError):
        raise
    except NodesError as exc:
        raise JobError("training", str(exc)) from None
    finally:
        registry.close()


def policy_dict(policy: CustomizePolicy) -> dict[str, Any]:
    """``policy`` as the plain dict :func:`run_job` takes (a Ray task's argument)."""
    return asdict(policy)
