"""Step-level fairness: while several tenants have rows in the batch, each decodes at most
``step_rows`` of them per step; its other rows wait aside, KV cache and all.

A decode step costs more the wider the batch, so a tenant with 16 rows in the batch makes
every step of another tenant's single row several times slower than that row alone. Admission
(nodes.runtime.fair) already shares the batch's slots; this shares each step. Parked rows keep
their KV cache and their place (their tokens, adapters and budget stay booked), so a row's
tokens are the same whether or not it waited; they rejoin as soon as their tenant is below its
share or no other tenant has rows left. Composition changes copy the moved rows' KV, so this runs
only when rows join, leave or the set of tenants changes, not every step.
"""

from __future__ import annotations

import collections

from nodes.runtime.fair import tenant_of
from nodes.runtime.jobs import Row
from nodes.runtime.kv import BatchKV

__all__ = ["Parking"]


class Parking:
    """Rows set aside from the running batch, with their KV (rows[i] is row i of ``kv``)."""

    def __init__(self, step_rows: int | None):
        self.step_rows = step_rows  # None: no per-step share (every running row decodes every step)
        self.rows: list[Row] = []
        self.kv: BatchKV | None = None
        self.parked_total = 0  # rows ever set aside (a statistic)

    def __len__(self) -> int:
        return len(self.rows)

    def balance(self, running: list[Row], kv: BatchKV | None) -> tuple[list[Row], BatchKV | None, bool]:
        """The running rows and their KV after parking tenants' rows over their share and bringing
        back the rows that may run again; True when the running batch changed."""
        self._drop_finished()
        cap = self.step_rows
        if cap is None or (not self.rows and len(running) <= cap):
            return running, kv, False
        tenants = {tenant_of(r.job) for r in running} | {tenant_of(r.job) for r in self.rows}
        if len(tenants) < 2:  # one tenant left: its rows all run
            if not self.rows:
                return running, kv, False
            running, kv = self._unpark(list(range(len(self.rows))), running, kv)
            return running, kv, True
        seen: collections.Counter[str] = collections.Counter()
        over = []
        for i, row in enumerate(running):
            seen[tenant_of(row.job)] += 1
            if seen[tenant_of(row.job)] > cap:
                over.append(i)
        changed = False
        if over and kv is not None:
            moved = kv.split(over)
            self.rows += [running[i] for i in over]
            self.parked_total += len(over)
            if self.kv is None:
                self.kv = moved
            else:
                self.kv.merge(moved)
            leaving = set(over)
            running = [row for i, row in enumerate(running) if i not in leaving]
            changed = True
        room = {t: cap - min(n, cap) for t, n in seen.items()}
        back = []
        for j, row in enumerate(self.rows):
            tenant = tenant_of(row.job)
            if room.get(tenant, cap) > 0:
                room[tenant] = room.get(tenant, cap) - 1
                back.append(j)
        if back:
            running, kv = self._unpark(back, running, kv)
            changed = True
        return running, kv, changed

    def unpark_all(self, running: list[Row], kv: BatchKV | None) -> tuple[list[Row], BatchKV | None]:
        self._drop_finished()
        if not self.rows:
            return running, kv
        return self._unpark(list(range(len(self.rows))), running, kv)

    def _unpark(self, picks: list[int], running: list[Row], kv: BatchKV | None) -> tuple[list[Row], BatchKV | None]:
        if self.kv is None:
            return running, kv
        if len(picks) == len(self.rows):
            moved, rows = self.kv, self.rows
            self.rows, self.kv = [], None
        else:
            moved = self.kv.split(picks)
            rows = [self.rows[j] for j in picks]
            chosen = set(picks)
            self.rows = [row for j, row in enumerate(self.rows) if j not in chosen]
        if kv is None or not running:
            return rows, moved
        kv.merge(moved)
        return running + rows, kv

    def _drop_finished(self) -> None:
        """Rows that ended while parked (cancelled, past their deadline, their job failed)."""
        keep = [j for j, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[j] for j in keep]
        if not self.rows:
            self.kv = None
        elif self.kv is not None:
            self.kv.keep(keep)
