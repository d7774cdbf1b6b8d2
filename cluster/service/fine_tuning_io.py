"""What both transports of the fine-tuning calls (cluster/service/fine_tuning.py) share besides
the calls themselves: pages that say whether more follow (OpenAI's ``has_more``), a job's events
as they happen until it ends (gRPC's ``WatchJob``), the bounds on uploads in progress, and the
answer of a server that runs no fine-tuning jobs.

Uploads are held in memory until checked and stored (at most ``MAX_FILE_BYTES`` each), so the
uploads in progress are bounded per tenant and per server: one more is refused
RESOURCE_EXHAUSTED / 429 (``upload-refused``) before any of its bytes are read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from cluster.errors import BadArgument, FineTuningOff, ShuttingDown, UploadRefused
from cluster.jobs.data import MAX_FILE_BYTES
from cluster.service.auth import Caller
from cluster.service.fine_tuning import FineTuningCalls
from registry.jobs import JobEvent, JobRecord

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "WATCH_POLL_S",
    "FileBuffer",
    "Page",
    "UploadSlots",
    "check_limit",
    "events_page",
    "jobs_page",
    "served",
    "watch_events",
]

DEFAULT_PAGE = 20  # OpenAI's default page of jobs and events
MAX_PAGE = 100
WATCH_POLL_S = 0.5  # how often a watched job's events are read (a job reports per optimizer step)

T = TypeVar("T")


def served(calls: FineTuningCalls | None) -> FineTuningCalls:
    """The calls, or FineTuningOff (501) on a server started without fine-tuning."""
    if calls is None:
        raise FineTuningOff(
            "this server runs no fine-tuning jobs: its trees' update policies need customize.key "
            "(the key that signs the nodes jobs make)"
        )
    return calls


@dataclass(frozen=True)
class Page(Generic[T]):
    items: tuple[T, ...]  # newest first
    has_more: bool  # older items follow (ask again with ``after`` = the last item's id)


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise BadArgument("limit", f"must be an integer from 1 to {MAX_PAGE}, got {limit!r}")
    return limit


async def jobs_page(calls: FineTuningCalls, caller: Caller, limit: int, after: str | None) -> Page[JobRecord]:
    check_limit(limit)
    rows = await calls.list_jobs(caller, min(limit + 1, MAX_PAGE), after)
    if len(rows) > limit:
        return Page(rows[:limit], True)
    more = len(rows) == MAX_PAGE and bool(await calls.list_jobs(caller, 1, rows[-1].job_id))
    return Page(rows, more)


async def events_page(
    calls: FineTuningCalls, caller: Caller, job_id: str, limit: int, after: int | None
) -> Page[JobEvent]:
    check_limit(limit)
    rows = await calls.events(caller, job_id, min(limit + 1, MAX_PAGE), after)
    if len(rows) > limit:
        return Page(rows[:limit], True)
    more = len(rows) == MAX_PAGE and bool(await calls.events(caller, job_id, 1, rows[-1].id))
    return Page(rows, more)


async def _events_after(calls: FineTuningCalls, caller: Caller, job_id: str, last: int) -> list[JobEvent]:
    """The job's events with ids above ``last``, oldest first (pages of newest-first events, back to ``last``)."""
    fresh: list[JobEvent] = []
    before: int | None = None
    while True:
        page = await calls.events(caller, job_id, MAX_PAGE, before)
        newer = [e for e in page if e.id > last]
        fresh.extend(newer)
        if len(newer) < len(page) or len(page) < MAX_PAGE:
            return fresh[::-1]
        before = page[-1].id


async def watch_events(
    calls: FineTuningCalls,
    caller: Caller,
    job_id: str,
    since: int = 0,
    poll_s: float = WATCH_POLL_S,
    draining: Callable[[], bool] = lambda: False,
) -> AsyncIterator[JobEvent]:
    """The job's events after ``since``, oldest first, as they are written, until the job has ended.

    The status is read before the events of each round: a job ends in the transaction that writes
    its last event, so the round that sees it ended also sees that event. A server that starts to
    drain ends its watches with ShuttingDown (UNAVAILABLE) rather than holding its stop for the
    whole grace period: the SDK watches again, after the last event it got, on another replica."""
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise BadArgument("since", f"must be an event id (>= 0), got {since!r}")
    last = since
    while True:
        job = await calls.get_job(caller, job_id)  # every round: a job another tenant's id never was
        for event in await _events_after(calls, caller, job_id, last):
            last = event.id
            yield event
        if job.finished:
            return
        if draining():
            raise ShuttingDown(f"the server is shutting down; watch job {job.job_id} again after event {last}")
        await asyncio.sleep(poll_s)


class UploadSlots:
    """Uploads in progress, per tenant and in all (one event loop: no lock)."""

    def __init__(self, per_tenant: int = 2, total: int = 16):
        self.per_tenant = per_tenant
        self.total = total
        self._open: dict[str, int] = {}

    @contextmanager
    def hold(self, caller: Caller) -> Iterator[None]:
        tenant = caller.tenant or ""
        if self._open.get(tenant, 0) >= self.per_tenant:
            raise UploadRefused(
                f"your tenant has {self.per_tenant} file uploads in progress, its limit: wait for one to finish"
            )
        if sum(self._open.values()) >= self.total:
            raise UploadRefused(f"the server has {self.total} file uploads in progress: retry in a few seconds")
        self._open[tenant] = self._open.get(tenant, 0) + 1
        try:
            yield
        finally:
            self._open[tenant] -= 1
            if not self._open[tenant]:
                del self._open[tenant]


class FileBuffer:
    """An upload's bytes as they arrive, refused (BadArgument naming ``file``) past ``MAX_FILE_BYTES``."""

    def __init__(self, limit: int = MAX_FILE_BYTES):
        self.limit = limit
        self._data = bytearray()

    def add(self, piece: bytes) -> None:
        if len(self._data) + len(piece) > self.limit:
            raise BadArgument("file", f"the file has more than {self.limit} bytes, the limit ({self.limit >> 20} MiB)")
        self._data += piece

    def bytes(self) -> bytes:
        return bytes(self._data)
