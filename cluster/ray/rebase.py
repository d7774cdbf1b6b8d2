"""Rebases on a Ray cluster: each child's re-fit is a Ray task with its own resource request.

When a parent's version becomes stable, the update desk (cluster/ray/desk.py) hands all of one
level's children to :class:`RayRefitter` at once: each re-fit becomes a task asking for
``ingress.job_cpus`` CPUs (as fine-tuning jobs do, cluster/ray/jobs.py), so Ray runs as many in
parallel as the cluster has free CPUs and queues the rest; operators add capacity by adding
machines. A task loads the base from the tree's directory (checked against its digest, where the
desk has it: one machine, or a shared mount, as the replicas read it), re-fits the child
(cluster.updates.rebase.refit) and returns the adapter's tensors with where it ran. Gating,
signing and recording stay on the desk, one child at a time, under the tree's lock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import ray

from cluster.errors import CoordinatorError
from cluster.ray.priority import niceness, yield_to_serving
from cluster.ray.wire import remote_cause
from cluster.updates.rebase import RefitRequest, refit
from nodes.store.adapters import AdapterWeights

__all__ = ["RayRefitter"]


def _refit_task(request: RefitRequest, threads: int) -> tuple[AdapterWeights, dict[str, Any]]:
    import torch

    from nodes.base.model import load_base

    torch.set_num_threads(threads)
    yield_to_serving()  # a replica on the same machine decodes first
    started = time.perf_counter()
    base = load_base(request.base_dir, digest=request.base_digest)
    adapter = refit(base.model, request)
    context = ray.get_runtime_context()
    return adapter, {
        "on": "ray",
        "ray_node": context.get_node_id(),
        "task": context.get_task_id(),
        "resources": dict(context.get_assigned_resources()),
        "niceness": niceness(),
        "seconds": round(time.perf_counter() - started, 3),
    }


class RayRefitter:
    """Runs a level's re-fits as parallel Ray tasks of ``cpus`` CPUs and ``threads`` torch threads."""

    def __init__(self, cpus: float = 1.0, threads: int = 1):
        self.cpus = cpus
        self.threads = threads

    def fit(self, requests: Sequence[RefitRequest]) -> list[tuple[AdapterWeights, dict[str, Any]]]:
        # max_calls=1: the worker lowered its priority (cluster.ray.priority); it exits after the fit.
        task = ray.remote(num_cpus=self.cpus, max_retries=1, max_calls=1)(_refit_task)
        refs = [task.remote(r, self.threads) for r in requests]  # all at once: Ray places them
        out = []
        for request, ref in zip(requests, refs, strict=True):
            try:
                adapter, where = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                for other in refs:
                    ray.cancel(other, force=True)
                cause = remote_cause(exc)
                raise CoordinatorError(
                    f"re-fitting {request.child} failed on Ray: {type(cause).__name__}: {cause}"
                ) from None
            out.append((adapter, where | {"batch": len(requests)}))
        return out
