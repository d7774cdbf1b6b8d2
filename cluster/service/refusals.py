"""What a server does about callers it keeps refusing: fewer log lines, slower answers.

A hostile client can send a request the server refuses (a body over the limit, a bad argument,
an unknown node) as fast as its own CPU allows. Each refusal costs the server little, but a
thousand a second take its CPU from every other tenant, and used to write a thousand log lines.

- ``RefusalLog`` lets ``per_second`` lines through each second and counts the rest; the next line
  that passes says how many were dropped, so nothing goes unseen, only unrepeated.
- ``RefusalPenalty`` answers a caller's refusals beyond ``per_second`` in a second only after
  ``delay_s``. A client that waits for each answer (as every SDK and the flood of issue 21 do) is
  slowed to about one refusal per ``delay_s``; waiting costs the server a timer, not CPU time; a
  well-behaved caller never comes near the budget. At most ``max_held`` answers wait at once, so
  many connections cannot turn waiting into memory; past that, refusals are answered at once (a
  caller sending hundreds of refused calls in parallel is bounded by its connections, not by
  this). Callers are their tenant, or their peer address (without the port) before a token is
  known.

One event loop owns each: no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time

__all__ = ["PENALIZED_HTTP_STATUSES", "REFUSAL_LINES_PER_S", "RefusalLog", "RefusalPenalty"]

REFUSAL_LINES_PER_S = 20
# The caller's own mistakes. 429 and 503 are not: they tell a caller to come back later, and
# already carry Retry-After; nor is 409, which also answers races between honest writers, a
# version not served during a rollout and a database behind its schema.
PENALIZED_HTTP_STATUSES = frozenset({400, 401, 403, 404, 413})
_MAX_CALLERS = 4096  # callers tracked at once; past it, the ones idle for a second are forgotten


class RefusalLog:
    """``info`` lines at most ``per_second`` a second; the others counted and reported later."""

    def __init__(self, logger: logging.Logger, per_second: int = REFUSAL_LINES_PER_S):
        if per_second < 1:
            raise ValueError(f"per_second must be >= 1, got {per_second!r}")
        self._logger = logger
        self._per_second = per_second
        self._window = float("-inf")
        self._sent = 0
        self.dropped = 0  # lines not written since the last one that was

    def info(self, message: str, *args: object) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._sent = now, 0
        if self._sent >= self._per_second:
            self.dropped += 1
            return
        self._sent += 1
        if self.dropped:
            message, args = message + " (and %d more refusals not logged)", (*args, self.dropped)
            self.dropped = 0
        self._logger.info(message, *args)


class RefusalPenalty:
    """Delays the answers to a caller refused more than ``per_second`` times within a second.

    ``per_second`` 0 turns it off."""

    def __init__(self, per_second: int = 20, delay_s: float = 0.5, max_held: int = 256, window_s: float = 1.0):
        if per_second < 0 or not delay_s >= 0 or max_held < 0 or not window_s > 0:
            raise ValueError("per_second, delay_s and max_held must be >= 0, window_s > 0")
        self.per_second = per_second
        self.window_s = window_s  # the budget is per_second refusals per window
        self.delay_s = delay_s
        self.max_held = max_held
        self._callers: dict[str, tuple[float, int]] = {}  # caller -> (its window's start, refusals in it)
        self.held = 0  # answers waiting now
        self.delayed_total = 0  # answers ever delayed (a statistic)

    def delay(self, caller: str) -> float:
        """Counts one refusal of ``caller``: how long its answer should wait (0: none)."""
        if not self.per_second:
            return 0.0
        now = time.monotonic()
        start, count = self._callers.get(caller, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        if caller not in self._callers and len(self._callers) >= _MAX_CALLERS:
            self._forget(now)
        self._callers[caller] = (start, count + 1)
        if count + 1 <= self.per_second or self.held >= self.max_held:
            return 0.0
        return self.delay_s

    async def hold(self, caller: str) -> None:
        """Waits the delay ``caller``'s refusal has earned (usually none)."""
        wait = self.delay(caller)
        if not wait:
            return
        self.held += 1
        self.delayed_total += 1
        try:
            await asyncio.sleep(wait)
        finally:
            self.held -= 1

    def _forget(self, now: float) -> None:
        self._callers = {k: v for k, v in self._callers.items() if now - v[0] < self.window_s}
        if len(self._callers) >= _MAX_CALLERS:  # thousands of callers refused within a second
            self._callers.clear()
