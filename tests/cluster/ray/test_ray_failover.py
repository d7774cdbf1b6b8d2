"""Kill a trunk replica under load: every request succeeds or fails clearly, none is lost or answered twice."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import grpc
import pytest

import treelm
from cluster.ray.board import board
from tests.cluster.ray.cluster_harness import expected, wait_until
from treelm._transport import CHANNEL_OPTIONS

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

HOT = "kb/de"  # the long streams and the long unary "sentinel" ask this node, so Serve puts them together
LONG = 1200
STREAMS = ("stream-0", "stream-1", "stream-2")


class Attempts(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Every attempt the SDK makes, by request id, with its status code (so retries can be counted)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[str]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        with self._lock:
            self.calls[request.request_id].append(outcome.code().name)
        return outcome

    def intercept_unary_stream(self, continuation, details, request):
        with self._lock:
            self.calls[request.request_id].append("STREAM")
        return continuation(details, request)


def test_a_replica_killed_under_load_loses_nothing_and_answers_nothing_twice(ray_world, kb_engine, capsys):
    import ray

    assert ray_world.cli("scale", "kb", "--replicas", "2") == 0
    attempts = Attempts()
    channel = grpc.intercept_channel(grpc.insecure_channel(ray_world.target, options=CHANNEL_OPTIONS), attempts)
    policy = treelm.RetryPolicy(retries=10, initial_backoff=0.2, max_backoff=2.0)
    client = treelm.Client(channel=channel, token=ray_world.world.tokens["acme"], retries=policy, timeout=180)
    the_board = board("treelm")
    streams: dict[str, list] = {rid: [] for rid in STREAMS}
    stream_errors: dict[str, treelm.TreeLMError] = {}
    unary: dict[str, tuple] = {}
    first_chunks = threading.Barrier(len(STREAMS) + 1)

    def stream(rid: str) -> None:
        try:
            for n, chunk in enumerate(client.stream(HOT, f"long {rid}", max_new_tokens=LONG, request_id=rid)):
                streams[rid].append(chunk)
                if n == 0:
                    first_chunks.wait()
        except treelm.TreeLMError as exc:
            stream_errors[rid] = exc

    def call(rid: str, node: str, prompt: str, tokens: int) -> None:
        try:
            unary[rid] = (node, prompt, tokens, client.generate(node, prompt, max_new_tokens=tokens, request_id=rid))
        except treelm.TreeLMError as exc:
            unary[rid] = (node, prompt, tokens, exc)

    def unary_loop(worker: int) -> None:
        for k in range(8):
            call(f"u{worker}-{k}", ("kb/de", "kb/it", "kb/es")[(worker + k) % 3], f"q{k % 4}", 24)

    threads = [threading.Thread(target=stream, args=(rid,)) for rid in STREAMS]
    threads.append(threading.Thread(target=call, args=("sentinel", HOT, "sentinel", LONG)))
    threads += [threading.Thread(target=unary_loop, args=(w,)) for w in range(3)]
    for t in threads[: len(STREAMS) + 1]:
        t.start()
    first_chunks.wait(timeout=60)  # every stream produces tokens
    since = time.time()
    for t in threads[len(STREAMS) + 1 :]:
        t.start()

    def victim():
        """The replica that, in a report made after the streams began, holds the sentinel; one that also
        holds a stream when there is one (Serve usually routes them together, but not always)."""
        holders = [
            r
            for r in ray.get(the_board.reports.remote(2.0))
            if r.trunk == "kb" and r.at > since and "sentinel" in r.in_flight
        ]
        return next((r for r in holders if set(STREAMS) & set(r.in_flight)), holders[0] if holders else None)

    dying = wait_until(victim, timeout=30, every=0.05, what="a replica holding the sentinel")
    os.kill(dying.pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=240)
    client.close()

    submitted = {*STREAMS, "sentinel", *(f"u{w}-{k}" for w in range(3) for k in range(8))}
    answered = {*unary, *streams}
    # Unary calls: each answered exactly once, with the right tokens; the ones on the dying replica were retried.
    twice = [rid for rid in unary if attempts.calls[rid].count("OK") != 1]
    assert all(not isinstance(v[3], Exception) for v in unary.values()), unary
    for rid, (node, prompt, tokens, result) in unary.items():
        assert result.request_id == rid and result.token_ids == expected(kb_engine, node, prompt, tokens), rid
    assert attempts.calls["sentinel"][0] == "UNAVAILABLE" and attempts.calls["sentinel"][-1] == "OK"
    retried = sorted(rid for rid, codes in attempts.calls.items() if codes[0] == "UNAVAILABLE")
    # Streams: those on the dying replica end with UNAVAILABLE saying they were cut, after an exact prefix;
    # the others complete. No chunk is repeated or skipped.
    on_victim = set(STREAMS) & set(dying.in_flight)
    for rid, chunks in streams.items():
        want = expected(kb_engine, HOT, f"long {rid}", LONG)
        got = tuple(t for c in chunks for t in c.token_ids)
        if len({c.index for c in chunks}) != len(chunks):
            twice.append(rid)
        assert [c.index for c in chunks] == list(range(len(chunks))) and {c.request_id for c in chunks} == {rid}
        if rid in on_victim:
            error = stream_errors[rid]
            assert isinstance(error, treelm.Unavailable) and "cut short" in error.details, error
            assert 0 < len(got) < LONG and got == want[: len(got)]
        else:
            assert rid not in stream_errors and got == want and chunks[-1].last
    lost = submitted - answered
    assert not lost and not twice, (lost, twice)
    with capsys.disabled():  # the counts belong in the test log (`pytest -s` shows them)
        print(
            f"\nfailover: {len(submitted)} requests; unary ok={len(unary)}/{len(unary)} (retried after "
            f"UNAVAILABLE: {len(retried)}); streams completed={len(STREAMS) - len(on_victim)}, cut with "
            f"UNAVAILABLE={len(on_victim)}; lost={len(lost)}; answered twice={len(twice)}"
        )

    # Serve replaced the replica; the hot node is served again.
    def restarted():
        kb = next(t for t in ray_world.status(capsys)["trunks"] if t["tree"] == "kb")
        pids = [r["pid"] for r in kb["replicas"] if r["state"] == "RUNNING"]
        return len(pids) == 2 and dying.pid not in pids

    wait_until(restarted, timeout=120, what="Serve to replace the dead replica")
    with treelm.Client(ray_world.target, token=ray_world.world.tokens["acme"]) as fresh:
        assert fresh.generate(HOT, "after", max_new_tokens=4).token_ids == expected(kb_engine, HOT, "after", 4)
