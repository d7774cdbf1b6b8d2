"""Where an attack benchmark's processes run, and how much CPU the server spent.

On a network the attacker's client runs on its own machine; on one small box it shares the
server's cores, and a tenant's latency then measures the attacker's CPU as much as the server's
defences. ``--cpus split`` (the default with two or more cores) puts the server and the measured
tenant on the first half of the cores and the attacker on the rest, as across a network;
``--cpus shared`` leaves every process on every core, as before. Either way the benchmarks report
the server's own CPU time per phase, read from /proc, which no placement changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["Placement", "server_cpu_seconds"]


class Placement:
    """CPU sets for the server (and the measured tenant) and for the attacker."""

    def __init__(self, mode: str):
        if mode not in ("split", "shared"):
            raise ValueError(f"--cpus must be split or shared, got {mode!r}")
        cpus = sorted(os.sched_getaffinity(0))
        self.mode = mode if len(cpus) >= 2 else "shared"
        half = max(1, len(cpus) // 2)
        self.server = set(cpus[:half]) if self.mode == "split" else set(cpus)
        self.attacker = set(cpus[half:]) if self.mode == "split" else set(cpus)

    def preexec(self, cpus: set[int]) -> Callable[[], None]:
        return lambda: os.sched_setaffinity(0, cpus)

    def measured_here(self) -> None:
        """The measured tenant's client (this process) runs beside the server."""
        os.sched_setaffinity(0, self.server)

    def describe(self) -> dict:
        return {"mode": self.mode, "server_cpus": sorted(self.server), "attacker_cpus": sorted(self.attacker)}


def server_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds the process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
