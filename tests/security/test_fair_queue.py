"""The engine's waiting room (nodes.runtime.fair): deficit round robin order and per-tenant bounds."""

from __future__ import annotations

import pickle

import pytest

from nodes.errors import QueueFull, TenantOverLimit
from nodes.runtime.fair import QUANTUM_TOKENS, FairQueue
from nodes.runtime.jobs import Job
from nodes.runtime.requests import GenerationRequest, SamplingParams, TenantLimits


class _Sink:
    def put(self, item: object) -> bool:
        return True


def _job(tenant: str | None, name: str, budget: int = 100, limits: TenantLimits | None = None) -> Job:
    request = GenerationRequest(
        node="demo",
        prompt="x",
        params=SamplingParams(max_new_tokens=budget - 1),
        request_id=name,
        tenant=tenant,
        limits=limits,
    )
    return Job(request, [1], (), 0, budget - 1, _Sink(), False, tokenizer=None)


def _serve(queue: FairQueue, count: int) -> list[str]:
    """Admit ``count`` jobs in the queue's order (each finishes at once)."""
    order = []
    for _ in range(count):
        job = queue.peek()
        assert job is not None
        queue.pop(job, admitted=True)
        queue.finished(job)
        order.append(job.request.request_id)
    return order


def test_a_flood_does_not_delay_another_tenant() -> None:
    queue = FairQueue(max_queue=1000)
    for i in range(200):
        queue.push(_job("a", f"a{i}"))
    queue.push(_job("b", "b0"))
    queue.push(_job("b", "b1"))
    order = _serve(queue, 6)
    # 200 of A's requests arrived first; B's two are served turn about with A's, then A goes on.
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3"]


def test_shares_follow_token_budgets_not_request_counts() -> None:
    queue = FairQueue(max_queue=1000)
    for i in range(20):
        queue.push(_job("big", f"big{i}", budget=QUANTUM_TOKENS))  # one quantum each
        queue.push(_job("small", f"small{i}", budget=QUANTUM_TOKENS // 4))
    order = _serve(queue, 20)
    small = sum(1 for name in order if name.startswith("small"))
    big = len(order) - small
    assert small == 4 * big  # equal tokens per round: four small requests per big one


def test_a_tenant_at_its_running_limit_waits_and_others_go_on() -> None:
    queue = FairQueue(max_queue=100)
    limits = TenantLimits(max_running=2)
    for i in range(5):
        queue.push(_job("a", f"a{i}", limits=limits))
    admitted = []
    for _ in range(2):
        job = queue.peek()
        assert job is not None
        queue.pop(job, admitted=True)
        admitted.append(job)
    assert queue.peek() is None  # A holds its two slots; nobody else waits
    queue.push(_job("b", "b0"))
    head = queue.peek()
    assert head is not None and head.request.request_id == "b0"
    queue.pop(head, admitted=True)
    queue.finished(admitted[0])  # one of A's leaves the batch: A may run one more
    head = queue.peek()
    assert head is not None and head.request.request_id == "a2"


def test_own_queue_bound_refuses_only_that_tenant() -> None:
    queue = FairQueue(max_queue=100)
    limits = TenantLimits(max_queued=3)
    for i in range(3):
        queue.push(_job("a", f"a{i}", limits=limits))
    with pytest.raises(TenantOverLimit) as refused:
        queue.push(_job("a", "a3", limits=limits))
    assert refused.value.retry_after_s > 0
    assert len(queue) == 3 and queue.queued("a") == 3  # nothing changed
    queue.push(_job("b", "b0", limits=limits))  # another tenant is unaffected
    # The error keeps its retry hint across pickling (Ray replicas raise it to the ingress).
    again = pickle.loads(pickle.dumps(refused.value))
    assert isinstance(again, TenantOverLimit) and again.retry_after_s == refused.value.retry_after_s


def test_a_full_engine_refuses_the_heaviest_tenant_first() -> None:
    queue = FairQueue(max_queue=4)
    for i in range(4):
        queue.push(_job("a", f"a{i}"))
    with pytest.raises(TenantOverLimit):
        queue.push(_job("a", "a4"))  # A itself holds the whole queue
    evicted = queue.push(_job("b", "b0"))  # B gets in: A's newest request makes room
    assert evicted is not None and evicted.request.request_id == "a3"
    assert len(queue) == 4 and queue.queued("a") == 3 and queue.queued("b") == 1
    queue.push(_job("b", "b1"))
    with pytest.raises(QueueFull) as full:
        queue.push(_job("b", "b2"))  # now equal shares (2 and 2): B is refused as A would be
    assert not isinstance(full.value, TenantOverLimit)
    assert queue.queued("a") == 2 and queue.queued("b") == 2


def test_cancelled_jobs_leave_and_idle_tenants_bank_no_credit() -> None:
    queue = FairQueue(max_queue=100)
    job = _job("a", "a0")
    queue.push(job)
    assert queue.peek() is job  # credits A
    queue.pop(job, admitted=False)  # cancelled while queued
    assert len(queue) == 0 and queue.peek() is None
    queue.push(_job("b", "b0"))
    queue.push(_job("a", "a1"))
    head = queue.peek()
    assert head is not None and head.request.request_id == "b0"  # A's old credit is gone: B is first in order


def _admit_all(queue: FairQueue) -> list[Job]:
    """Admit jobs while the queue offers one (none finishes)."""
    admitted = []
    while (job := queue.peek()) is not None:
        queue.pop(job, admitted=True)
        admitted.append(job)
    return admitted


def test_a_tenant_alone_fills_its_max_running_whatever_the_contended_share() -> None:
    queue = FairQueue(max_queue=100, defaults=TenantLimits(max_running=6), contended_running=2)
    for i in range(10):
        queue.push(_job("a", f"a{i}"))
    assert len(_admit_all(queue)) == 6  # no other tenant: its own limit


def test_while_another_tenant_is_present_a_tenant_admits_only_its_contended_share() -> None:
    queue = FairQueue(max_queue=100, defaults=TenantLimits(max_running=6), contended_running=2, linger_s=2.0)
    for i in range(10):
        queue.push(_job("a", f"a{i}"))
    queue.push(_job("b", "b0"))
    admitted = _admit_all(queue)
    assert sorted(j.request.request_id for j in admitted) == ["a0", "a1", "b0"]
    # B's request ends: A stays at its share for the linger (B sends one request after another)...
    queue.finished(next(j for j in admitted if j.request.tenant == "b"))
    assert queue.peek() is None
    # ...and fills its own limit once B has been gone that long.
    queue.linger_s = 0.0  # (as if the linger had passed)
    assert [j.request.request_id for j in _admit_all(queue)] == ["a2", "a3", "a4", "a5"]


def test_rows_already_running_are_never_taken_back_when_another_tenant_arrives() -> None:
    queue = FairQueue(max_queue=100, defaults=TenantLimits(max_running=6), contended_running=2)
    for i in range(10):
        queue.push(_job("a", f"a{i}"))
    running = _admit_all(queue)
    assert len(running) == 6
    queue.push(_job("b", "b0"))
    head = queue.peek()
    assert head is not None and head.request.request_id == "b0"  # B is admitted at once
    queue.pop(head, admitted=True)
    for job in running[:4]:  # A's rows finish one by one: no new A row until it is under its share
        queue.finished(job)
        assert queue.peek() is None
    queue.finished(running[4])
    head = queue.peek()
    assert head is not None and head.request.request_id == "a6"


def _round(queue: FairQueue) -> list[str]:
    """One admission round, as the scheduler runs it between decode steps."""
    queue.begin_round()
    return [job.request.request_id for job in _admit_all(queue)]


def test_a_heavy_tenant_admits_in_rounds_while_a_light_one_decodes() -> None:
    queue = FairQueue(100, TenantLimits(max_running=4), contended_running=4, linger_s=5.0, defer_s=60.0)
    for i in range(10):
        queue.push(_job("a", f"a{i}"))
    assert _round(queue) == ["a0", "a1", "a2", "a3"]  # its whole share in one round
    queue.push(_job("b", "b0"))
    first = queue.peek()
    assert first is not None and first.request.request_id == "b0"
    queue.pop(first, admitted=True)  # B's row decodes beside A's four
    # Two of A's rows end while B decodes: A waits (its prefills would stall B's steps)...
    for _ in range(2):
        queue.finished(_job("a", "done"))
    assert _round(queue) == []
    # ...until B's row ends: then both of A's free slots are filled in one round.
    queue.finished(first)
    assert _round(queue) == ["a4", "a5"]


def test_a_deferred_tenant_waits_at_most_defer_s_and_peers_of_equal_weight_do_not_wait() -> None:
    queue = FairQueue(100, TenantLimits(max_running=4), contended_running=4, linger_s=5.0, defer_s=0.0)
    for i in range(10):
        queue.push(_job("a", f"a{i}"))
    assert _round(queue) == ["a0", "a1", "a2", "a3"]
    queue.push(_job("b", "b0"))
    assert _round(queue) == ["b0"]
    queue.finished(_job("a", "done"))
    assert _round(queue) == ["a4"]  # defer_s 0: never held
    # Two heavy tenants (each at or above the share) never defer for each other.
    heavy = FairQueue(100, TenantLimits(max_running=2), contended_running=2, linger_s=5.0, defer_s=60.0)
    for i in range(6):
        heavy.push(_job("a", f"a{i}"))
        heavy.push(_job("b", f"b{i}"))
    assert sorted(_round(heavy)) == ["a0", "a1", "b0", "b1"]
    heavy.finished(_job("a", "done"))
    assert _round(heavy) == ["a2"]


def test_the_retry_hint_follows_the_tenants_pace() -> None:
    clock = [100.0]
    queue = FairQueue(max_queue=100, defaults=TenantLimits(max_queued=4), clock=lambda: clock[0])
    assert queue.retry_after("a") == 1.0  # nothing known yet: the floor
    for i in range(6):
        queue.push(_job("a", f"a{i}"))
        job = queue.peek()
        assert job is not None
        queue.pop(job, admitted=True)  # one admission every 2 s
        clock[0] += 2.0
    for i in range(4):
        queue.push(_job("a", f"q{i}"))
    with pytest.raises(TenantOverLimit) as refused:
        queue.push(_job("a", "late"))
    # Four waiting at one admission per 2 s: a request made now would wait about 10 s.
    assert refused.value.retry_after_s == pytest.approx(10.0)
    assert queue.retry_after("b") == 1.0  # another tenant's pace is its own
    backlog = FairQueue(max_queue=100, clock=lambda: clock[0])
    for i in range(40):
        backlog.push(_job("c", f"c{i}"))
    for _ in range(2):  # admitted 2 s apart, 38 left waiting: 78 s, capped
        job = backlog.peek()
        assert job is not None
        backlog.pop(job, admitted=True)
        clock[0] += 2.0
    assert backlog.retry_after("c") == 30.0


def test_a_burst_of_admissions_at_one_instant_counts_in_the_pace() -> None:
    clock = [100.0]
    queue = FairQueue(max_queue=100, clock=lambda: clock[0])
    for i in range(6):
        queue.push(_job("a", f"a{i}"))
    for step in (0.0, 0.0, 10.0):  # two in one round, then one 10 s later
        clock[0] += step
        job = queue.peek()
        assert job is not None
        queue.pop(job, admitted=True)
    # Intervals 0 then 10 s: a mean of 2 s (not restarted by the burst), three waiting: 8 s.
    assert queue.retry_after("a") == pytest.approx(8.0)
