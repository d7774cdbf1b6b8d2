"""The engine's waiting room: one queue per tenant, served by deficit round robin.

A flood from one tenant must not delay or refuse another's requests, so waiting jobs are kept
per tenant (``GenerationRequest.tenant``; anonymous callers share one queue) and the scheduler
takes the next job from :meth:`FairQueue.peek` instead of a single FIFO:

- **Deficit round robin** over the tenants that have waiting jobs. A job costs its token budget
  (prompt + max new tokens, times n). A tenant's turn credits it ``QUANTUM_TOKENS``; it is
  served job after job while its credit covers its head job, then the turn passes to the next
  tenant. Every tenant earns the same tokens per round, whatever the size or number of its
  requests. A tenant's credit is dropped when its queue empties (no banking while idle).
- **Per-tenant limits** (``GenerationRequest.limits``, else the engine's defaults): a tenant with
  ``max_running`` jobs in the batch is skipped (it earns no credit) until one finishes; a tenant
  with ``max_queued`` jobs waiting is refused :class:`~nodes.errors.TenantOverLimit`.
- **Shares under contention** (``contended_running``; the engine's default is
  ``DEFAULT_CONTENDED_RUNNING``): while a *light* tenant (fewer jobs in the batch than the share)
  has jobs waiting or running, or had within the last ``CONTENDED_LINGER_S``, every other tenant
  admits jobs only while it has fewer than the share in the batch. On a CPU a decode step costs
  more with every row (the output head's matmul above all), so a flood's 16 rows make each step of
  another tenant's single row slower; this keeps the batch narrow while a light tenant shares
  it, without moving any running row (the flood's rows already in the batch finish; it just
  admits fewer). The linger keeps it on between the requests of a tenant that sends one after
  another. Heavy tenants (the share or more each) do not hold each other to it, so a tenant
  alone, or two heavy ones, keep the whole batch.
- **Prefills out of a light tenant's way** (with the contended share): a newcomer is prefilled
  in a forward of its own, between decode steps, and on a CPU that forward costs about a decode
  step, so a flood's newcomers, one after another, each stall every running row once. While a
  *light* tenant (fewer jobs in the batch than the share, and no more than this tenant) has
  jobs running, a tenant with jobs of its own in the batch waits ``CONTENDED_DEFER_S`` after
  its last admission before admitting again, then admits all it may in one round (one
  prefill forward for them all). A tenant sending one request after another thus decodes
  without the flood's prefills, which land between its requests; the flood is never held
  longer than that, and two heavy tenants never wait for each other.
- **The global bound** (``max_queue``) is shared fairly: when it is reached, the newest job of
  the tenant with the longest queue is refused (TenantOverLimit) to make room, unless that
  tenant is the newcomer's own or holds no more than it: a tenant is refused before any tenant
  with a shorter queue is.

Not thread-safe: the scheduler calls it under its lock.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator

from nodes.errors import QueueFull, TenantOverLimit
from nodes.runtime.jobs import Job
from nodes.runtime.requests import DEFAULT_CONTENDED_RUNNING, TenantLimits

__all__ = [
    "ANONYMOUS_TENANT",
    "CONTENDED_DEFER_S",
    "CONTENDED_LINGER_S",
    "DEFAULT_CONTENDED_RUNNING",
    "QUANTUM_TOKENS",
    "FairQueue",
]

ANONYMOUS_TENANT = ""  # the queue of requests without a tenant
# Credit per turn, in token-budget units. The shares do not depend on it; a small one keeps turns
# short (a turn serves about one typical request, so another tenant waits at most that between
# its turns), a large request just takes its tenant a few turns of credit.
QUANTUM_TOKENS = 64
# A refusal's retry hint: how long the refused tenant's queue takes to drain to the request's
# place, from the pace its jobs were admitted at lately, within these bounds (a flat 1 s had a
# 200-stream flood come back ~200 times a second, and answering that took the server's CPU from
# the tenants it serves: benchmarks/fairness_bench.py).
_RETRY_AFTER_MIN_S = 1.0
_RETRY_AFTER_MAX_S = 30.0
_PACE_WEIGHT = 0.2  # of the newest interval between a tenant's admissions in its moving average
CONTENDED_LINGER_S = 0.5  # a tenant counts as present this long after its last job left
# How long a tenant with jobs running waits between admission rounds while a light tenant decodes:
# longer than a short request takes (so the flood's prefills fall between a light tenant's
# requests), short next to a long one's decoding (so the flood's rows are refilled in time).
CONTENDED_DEFER_S = 0.25


def tenant_of(job: Job) -> str:
    return job.request.tenant or ANONYMOUS_TENANT


class FairQueue:
    """Waiting jobs by tenant (see the module docstring)."""

    def __init__(
        self,
        max_queue: int,
        defaults: TenantLimits | None = None,
        contended_running: int | None = None,
        linger_s: float = CONTENDED_LINGER_S,
        defer_s: float = CONTENDED_DEFER_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_queue = max_queue
        self.defaults = defaults or TenantLimits()
        self.contended_running = contended_running  # None: no share under contention
        self.linger_s = linger_s
        self.defer_s = defer_s
        self._clock = clock
        self._round = 0.0  # the current admission round (begin_round); 0: rounds not kept, nothing deferred
        self._admitted_in: dict[str, float] = {}  # tenant -> the round of its latest admission
        # tenant -> (its last admission, the moving mean of the intervals; None until there is one)
        self._pace: dict[str, tuple[float, float | None]] = {}
        self._left: dict[str, float] = {}  # tenant -> when its last job left (waiting or running)
        self._queues: dict[str, collections.deque[Job]] = {}  # insertion order = round order
        self._credit: dict[str, int] = {}
        self._turn: str | None = None  # the tenant whose turn it is (credited for it already)
        self._running: collections.Counter[str] = collections.Counter()  # jobs admitted, not yet finished
        self._limits: dict[str, TenantLimits] = {}  # each tenant's limits as its latest request carried them
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Job]:
        for queue in list(self._queues.values()):
            yield from list(queue)

    def queued(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return len(queue) if queue is not None else 0

    def running(self, tenant: str) -> int:
        return self._running[tenant]

    def check(self, tenant: str | None, limits: TenantLimits | None) -> None:
        """TenantOverLimit when the tenant is at its own queue bound: refused before any work on the request."""
        key = tenant or ANONYMOUS_TENANT
        bound = (limits or self.defaults).max_queued
        if bound is not None and self.queued(key) >= bound:
            raise TenantOverLimit(
                f"your tenant has {self.queued(key)} requests waiting (its bound is {bound}); retry later",
                self.retry_after(key),
            )

    def push(self, job: Job) -> Job | None:
        """Queue ``job``; returns a job of a heavier tenant pushed out to make room (the caller fails it).

        Raises TenantOverLimit when the job's tenant is at its own bound or holds the longest queue
        of a full engine, QueueFull when the engine is full of this tenant's equals."""
        tenant = tenant_of(job)
        self.check(tenant, job.request.limits)
        self._limits[tenant] = job.request.limits or self.defaults
        mine = self.queued(tenant)
        evicted = None
        if self._size >= self.max_queue:
            heaviest = max(self._queues, key=lambda t: len(self._queues[t]))
            if heaviest == tenant or len(self._queues[heaviest]) <= mine + 1:
                error = TenantOverLimit if heaviest == tenant else QueueFull
                raise error(
                    f"{self._size} requests are waiting (the bound is {self.max_queue}); retry later",
                    self.retry_after(tenant),
                )
            evicted = self._queues[heaviest].pop()  # its newest: the oldest keep their place
            self._size -= 1
            self._dropped(heaviest)
        self._queues.setdefault(tenant, collections.deque()).append(job)
        self._credit.setdefault(tenant, 0)
        self._size += 1
        return evicted

    def retry_after(self, tenant: str) -> float:
        """Seconds until ``tenant``'s queue has room again, about: its waiting jobs at its recent pace."""
        _, mean = self._pace.get(tenant, (0.0, None))
        if mean is None:
            return _RETRY_AFTER_MIN_S
        return min(_RETRY_AFTER_MAX_S, max(_RETRY_AFTER_MIN_S, (self.queued(tenant) + 1) * mean))

    def begin_round(self) -> None:
        """The scheduler starts admitting (between two decode steps): admissions of one round are
        prefilled together, and a deferred tenant's wait counts from its last round."""
        self._round = self._clock()

    def peek(self) -> Job | None:
        """The job deficit round robin serves next; None when no tenant may run one now."""
        while True:
            tenant = next((t for t in self._queues if not self._at_running_limit(t)), None)
            if tenant is None:
                return None
            if tenant != self._turn:  # a new turn: one quantum of credit
                self._turn = tenant
                self._credit[tenant] += QUANTUM_TOKENS
            head = self._queues[tenant][0]
            if self._credit[tenant] >= head.budget:
                return head
            self._end_turn(tenant)  # its credit does not cover its head: the next tenant's turn

    def pop(self, job: Job, *, admitted: bool) -> None:
        """Take ``job`` (the one peek returned, or any waiting job) out of the queue.

        ``admitted``: it joins the batch (it spends its credit and counts against max_running)."""
        tenant = tenant_of(job)
        queue = self._queues[tenant]
        queue.remove(job)
        self._size -= 1
        if admitted:
            self._credit[tenant] -= job.budget
            self._running[tenant] += 1
            if self._round:
                self._admitted_in[tenant] = self._round
            now = self._clock()
            if tenant in self._pace:
                last, mean = self._pace[tenant]
                interval = now - last
                mean = interval if mean is None else (1 - _PACE_WEIGHT) * mean + _PACE_WEIGHT * interval
                self._pace[tenant] = (now, mean)
            else:
                self._pace[tenant] = (now, None)
        if not queue:
            self._dropped(tenant)

    def finished(self, job: Job) -> None:
        """An admitted job left the batch."""
        tenant = tenant_of(job)
        self._running[tenant] -= 1
        if self._running[tenant] <= 0:
            del self._running[tenant]
            if tenant not in self._queues:
                self._forget(tenant)

    def drain(self) -> list[Job]:
        jobs = list(self)
        self._queues.clear()
        self._credit.clear()
        self._turn = None
        self._size = 0
        return jobs

    def _end_turn(self, tenant: str) -> None:
        self._queues[tenant] = self._queues.pop(tenant)  # to the back of the round
        self._turn = None

    def _dropped(self, tenant: str) -> None:
        queue = self._queues.get(tenant)
        if queue is not None and not queue:
            del self._queues[tenant]
            del self._credit[tenant]  # an idle tenant banks no credit
            if self._turn == tenant:
                self._turn = None
            if not self._running[tenant]:
                self._forget(tenant)

    def _at_running_limit(self, tenant: str) -> bool:
        limit = self._limits.get(tenant, self.defaults).max_running
        if limit is not None and self._running[tenant] >= limit:
            return True
        share = self.contended_running
        if share is None or not self._contended(tenant):
            return False
        return self._running[tenant] >= share or self._deferred(tenant, share)

    def _deferred(self, tenant: str, share: int) -> bool:
        """``tenant`` has jobs running and a light tenant decodes: it admits once per ``defer_s``."""
        mine = self._running[tenant]
        last = self._admitted_in.get(tenant)
        if not mine or not self._round or last is None or last == self._round:
            return False  # nothing of its own runs yet, or it admits in this round already
        if self._round - last >= self.defer_s:
            return False
        return any(0 < n <= mine and n < share for t, n in self._running.items() if t != tenant)

    def _contended(self, tenant: str) -> bool:
        """A light tenant (fewer jobs in the batch than the share) has jobs here, or had within the linger.

        Heavy tenants (the share or more each) do not hold each other to it: the batch stays full."""
        share = self.contended_running or 0
        if any(t != tenant and self._running[t] < share for t in self._queues):
            return True
        if any(t != tenant and n < share for t, n in self._running.items()):
            return True
        now = self._clock()
        for other, left in list(self._left.items()):
            if now - left >= self.linger_s:
                del self._left[other]  # gone for good: forgotten (the dict stays as small as the tenants present)
            elif other != tenant:
                return True
        return False

    def _forget(self, tenant: str) -> None:
        """``tenant`` has nothing waiting or running: what was kept about it goes."""
        self._limits.pop(tenant, None)
        self._admitted_in.pop(tenant, None)
        self._pace.pop(tenant, None)
        self._gone(tenant)

    def _gone(self, tenant: str) -> None:
        """``tenant`` has no job waiting or running any more."""
        if self.contended_running is not None:
            self._left[tenant] = self._clock()
