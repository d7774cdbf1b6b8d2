"""Serving before learning: who gets a core first when the update desk and a replica share a machine.

Ray starts its workers at niceness 15 (its ``worker_niceness``), so a replica decoding for
users and the update desk training a tenant's node or gating an update got the same share,
and both lost to anything else on the machine (the callers of a load test, a cron job).
:func:`cluster.ray.runtime.ray_env` starts workers at niceness 0 instead, and the desk and its
Ray tasks (fine-tuning jobs, re-fits) lower themselves to :data:`BACKGROUND_NICENESS` with
:func:`yield_to_serving`: the scheduler still runs them on idle cores, but a replica's decode
step goes first. Raising one's own niceness needs no privilege.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BACKGROUND_NICENESS", "WORKER_NICENESS", "niceness", "yield_to_serving"]

WORKER_NICENESS = 0  # replicas and the ingress, like a `treelm serve` process
BACKGROUND_NICENESS = 10  # the desk, fine-tuning jobs and re-fits


def _threads() -> list[int]:
    """This process's thread ids (Linux: /proc/self/task); elsewhere the process itself (0)."""
    tasks = Path("/proc/self/task")
    try:
        return [int(t.name) for t in tasks.iterdir()]
    except OSError:
        return [0]


def niceness() -> int:
    """The calling thread's niceness."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def yield_to_serving(level: int = BACKGROUND_NICENESS) -> None:
    """Lower every thread of this process to niceness ``level`` (never raise one).

    Linux keeps a niceness per thread and a new thread starts with its creator's, so the
    threads that exist now are set one by one (torch's and Ray's included) and the ones
    made later by them follow. Threads that ended meanwhile, or a platform that refuses, are
    skipped: this only changes who waits, never what is computed.
    """
    for tid in _threads():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < level:
                os.setpriority(os.PRIO_PROCESS, tid, level)
        except OSError:  # the thread ended, or no permission
            continue
