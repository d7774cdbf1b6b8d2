"""Prometheus metrics of one server, exposed over HTTP on ``--metrics-port``.

    treelm_requests_total{method,node,code}         RPCs by outcome
    treelm_request_latency_seconds{method}          call latency (streams: until the last chunk)
    treelm_time_to_first_token_seconds{method}      first streamed token / engine TTFT
    treelm_tokens_total{node,kind}                  prompt and completion tokens
    treelm_in_flight_requests                       calls being served now
    treelm_queue_depth{tree} / treelm_running_requests{tree}
    treelm_adapter_cache_{hits,misses,loads,evictions}_total{tree}, treelm_adapters_resident{tree,tier}
    treelm_feedback_*{node}                          ratings, negative rate, corrections waiting, updates
                                                    made, last update age (cluster/service/feedback_metrics.py)
    treelm_version_perplexity{node,version,role,text}  the forgetting history's latest version per node
                                                    (registry.forgetting): own / parent / sibling / stale

Each server owns its CollectorRegistry (several servers can live in one test
process). Node labels are limited to public nodes the server serves: private nodes
and ids a caller makes up all count as ``node="other"``, so they cannot blow up the label
space and the unauthenticated endpoint names no private node (nor tells whether one exists).
The endpoint listens on 127.0.0.1 unless ``--metrics-host`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cluster.service.trunk import TrunkSnapshot

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _TrunkCollector(Collector):
    """Reads the engines' counters at scrape time (no polling thread)."""

    def __init__(self, snapshots: Callable[[], Iterable[TrunkSnapshot]]):
        self._snapshots = snapshots

    def collect(self):
        queue = GaugeMetricFamily("treelm_queue_depth", "Requests waiting for a batch slot", labels=["tree"])
        running = GaugeMetricFamily("treelm_running_requests", "Requests in the running batch", labels=["tree"])
        resident = GaugeMetricFamily("treelm_adapters_resident", "Adapters held, by tier", labels=["tree", "tier"])
        counters = {
            name: CounterMetricFamily(f"treelm_adapter_cache_{name}", f"Adapter cache {name}", labels=["tree"])
            for name in ("hits", "misses", "loads", "evictions")
        }
        for snap in self._snapshots():
            queue.add_metric([snap.tree], snap.queue_depth)
            running.add_metric([snap.tree], snap.running)
            resident.add_metric([snap.tree, "active"], snap.cache.active)
            resident.add_metric([snap.tree, "host"], snap.cache.host)
            for name, family in counters.items():
                family.add_metric([snap.tree], getattr(snap.cache, name))
        yield queue
        yield running
        yield resident
        yield from counters.values()


class _ForgettingCollector(Collector):
    """The newest recorded perplexities per node, read from the registry at scrape time; only points
    whose node and text are both public (``public``) become series."""

    def __init__(self, points: Callable[[], Mapping[str, Sequence[Any]]], public: Callable[[str], bool]):
        self._points = points
        self._public = public

    def collect(self):
        family = GaugeMetricFamily(
            "treelm_version_perplexity",
            "Perplexity of a node's newest protocol-made version on its own, parent's and siblings' texts",
            labels=["node", "version", "role", "text"],
        )
        for node, points in sorted(self._points().items()):
            if not self._public(node):
                continue
            for p in points:
                if self._public(p.text_node):
                    family.add_metric([node, str(p.version), p.role, p.text_node], p.perplexity)
        yield family


class ServerMetrics:
    """The metrics of one gRPC server; ``observe_call`` is the StatusInterceptor's hook."""

    def __init__(self, known_node: Callable[[str], bool] = lambda node: True):
        self.registry = CollectorRegistry()
        self._known_node = known_node
        r = self.registry
        self.requests = Counter(
            "treelm_requests", "RPCs by method, node and status", ["method", "node", "code"], registry=r
        )
        self.latency = Histogram(
            "treelm_request_latency_seconds", "Call latency", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "treelm_time_to_first_token_seconds",
            "Time to first token",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("treelm_tokens", "Tokens processed", ["node", "kind"], registry=r)
        self.in_flight = Gauge("treelm_in_flight_requests", "Calls being served", registry=r)
        # cluster/service/refusals.py: answers to refused calls held back now, and ever held back.
        self.refusals_held = Gauge("treelm_refusals_held", "Refused calls whose answer waits now", registry=r)
        self.refusals_delayed = Gauge(
            "treelm_refusals_delayed", "Refused calls answered late since the server started", registry=r
        )
        self._http: WSGIServer | None = None

    def node_label(self, node: str) -> str:
        if not node:
            return ""
        return node if self._known_node(node) else "other"

    def observe_call(self, method: str, node: str, code: str, seconds: float) -> None:
        short = method.rsplit(".", 1)[-1]  # "/treelm.v1.Inference/Generate" -> "Inference/Generate"
        self.requests.labels(short, self.node_label(node), code).inc()
        self.latency.labels(short).observe(seconds)

    def observe_generation(
        self, method: str, node: str, prompt_tokens: int, completion_tokens: int, ttft_s: float
    ) -> None:
        label = self.node_label(node)
        self.tokens.labels(label, "prompt").inc(prompt_tokens)
        self.tokens.labels(label, "completion").inc(completion_tokens)
        self.ttft.labels(method).observe(ttft_s)

    def watch_trunks(self, snapshots: Callable[[], Iterable[TrunkSnapshot]]) -> None:
        self.registry.register(_TrunkCollector(snapshots))

    def watch_forgetting(
        self, points: Callable[[], Mapping[str, Sequence[Any]]], public: Callable[[str], bool]
    ) -> None:
        """Export ``points()`` (node id -> its newest version's PerplexityPoints) for public nodes."""
        self.registry.register(_ForgettingCollector(points, public))

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
