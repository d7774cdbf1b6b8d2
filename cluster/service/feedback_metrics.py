"""Feedback figures on /metrics, per node, summed over tenants, from the registry database.

    treelm_feedback_ratings{node,rating="positive|negative"}   ratings held now (deleted ones go)
    treelm_feedback_negative_rate{node}                        negative share of the ratings no update used yet
    treelm_feedback_corrections_waiting{node}                  trainable corrections no update used yet
    treelm_feedback_updates_made_total{node}                   the update policy's "make" decisions
    treelm_feedback_last_update_age_seconds{node}              since the newest of them

The database is read at most every ``interval_s`` seconds, in the scraping thread (never on the
event loop); a scrape in between answers from the last reading. Node labels follow the server's
other metrics: only public nodes this server serves are named, everything else is summed into
``node="other"``, so the unauthenticated endpoint names no private node. These figures come from
the shared database, so every replica of a Ray ingress exports the same values: aggregate them
with ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.db import Registry
from registry.feedback import decision_summary, feedback_stats

__all__ = ["FEEDBACK_METRICS", "FeedbackCollector"]

log = logging.getLogger("treelm.metrics")

FEEDBACK_METRICS = (
    "treelm_feedback_ratings",
    "treelm_feedback_negative_rate",
    "treelm_feedback_corrections_waiting",
    "treelm_feedback_updates_made_total",
    "treelm_feedback_last_update_age_seconds",
)


@dataclass
class _NodeFigures:
    positive: int = 0
    negative: int = 0
    positive_waiting: int = 0
    negative_waiting: int = 0
    corrections_waiting: int = 0
    updates_made: int = 0
    last_update: datetime | None = None


@dataclass
class _Reading:
    at: float = float("-inf")
    nodes: dict[str, _NodeFigures] = field(default_factory=dict)


class FeedbackCollector(Collector):
    """``label(node)``: the node's label (blocking is fine: it runs in the scraping thread)."""

    def __init__(
        self,
        registry: Registry,
        label: Callable[[str], str],
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._registry = registry
        self._label = label
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()  # two scrapes at once read the database once
        self._reading = _Reading()

    def _read(self) -> _Reading:
        nodes: dict[str, _NodeFigures] = {}
        labels: dict[str, str] = {}

        def figures(node: str) -> _NodeFigures:
            if node not in labels:
                labels[node] = self._label(node)
            return nodes.setdefault(labels[node], _NodeFigures())

        for s in feedback_stats(self._registry):
            f = figures(s.node)
            f.positive += s.positive_waiting + s.positive_used
            f.negative += s.negative_waiting + s.negative_used
            f.positive_waiting += s.positive_waiting
            f.negative_waiting += s.negative_waiting
            f.corrections_waiting += s.corrections_waiting
        for d in decision_summary(self._registry, "make"):
            f = figures(d.node)
            f.updates_made += d.count
            f.last_update = d.last_at if f.last_update is None else max(f.last_update, d.last_at)
        return _Reading(self._clock(), nodes)

    def reading(self) -> _Reading:
        with self._lock:
            if self._clock() - self._reading.at >= self._interval:
                try:
                    self._reading = self._read()
                except Exception:  # a database hiccup costs these figures one scrape, not /metrics
                    log.warning("could not read feedback figures", exc_info=True)
            return self._reading

    def collect(self) -> Iterator[Metric]:
        ratings = GaugeMetricFamily("treelm_feedback_ratings", "Ratings held, by sign", labels=["node", "rating"])
        rate = GaugeMetricFamily(
            "treelm_feedback_negative_rate", "Negative share of the ratings no update used yet", labels=["node"]
        )
        waiting = GaugeMetricFamily(
            "treelm_feedback_corrections_waiting", "Trainable corrections no update used yet", labels=["node"]
        )
        made = CounterMetricFamily("treelm_feedback_updates_made", "Updates the policy made", labels=["node"])
        age = GaugeMetricFamily(
            "treelm_feedback_last_update_age_seconds", "Seconds since the policy last made an update", labels=["node"]
        )
        now = datetime.now(UTC)
        for node, f in sorted(self.reading().nodes.items()):
            ratings.add_metric([node, "positive"], f.positive)
            ratings.add_metric([node, "negative"], f.negative)
            pending = f.positive_waiting + f.negative_waiting
            rate.add_metric([node], f.negative_waiting / pending if pending else 0.0)
            waiting.add_metric([node], f.corrections_waiting)
            made.add_metric([node], f.updates_made)
            if f.last_update is not None:
                age.add_metric([node], max(0.0, (now - f.last_update).total_seconds()))
        yield from (ratings, rate, waiting, made, age)
