"""`cluster.yaml`: what a Ray cluster serves and how, validated into frozen dataclasses.

    config = load_cluster_config("examples/cluster/one-machine.yaml")
    config.trunks[0].tree, config.ingress.port, config.ray.ports.gcs

Every error is a :class:`ClusterConfigError` naming the file and the field
(``cluster.yaml: trunks[1].replicas.max: must be >= min (2), got 1``). Unknown
keys are errors too, so a typo never silently falls back to a default. Paths are
relative to the file. Every Ray port has an explicit default away from Ray's own
defaults (6379 is often Redis, 8265 a dashboard, 8000 another Serve).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cluster.errors import ClusterConfigError, ServeError
from cluster.service.client_certs import ClientTenants
from cluster.service.quota import QuotaPolicy, TenantQuota
from nodes.base.precision import PRECISIONS
from nodes.errors import NodesError
from nodes.runtime.requests import DEFAULT_CONTENDED_RUNNING
from nodes.store.tree import open_tree
from registry.errors import InvalidMemorySize
from registry.memory import parse_cache_size, parse_memory_size

__all__ = [
    "ClusterConfig",
    "IngressConfig",
    "RayConfig",
    "RayPorts",
    "ReplicaResources",
    "TrunkConfig",
    "load_cluster_config",
    "parse_cluster_config",
]

# A getter's default decides its result type: a value default gives that type, None gives it or None.
_Int = TypeVar("_Int", bound=int | None)
_Number = TypeVar("_Number", bound=float | None)
_Text = TypeVar("_Text", bound=str | None)
_Path = TypeVar("_Path", bound=Path | None)

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_RAY_DEFAULT_PORTS = {
    6379: "Ray's default GCS port (often a Redis)",
    8265: "Ray's default dashboard port",
    8000: "Serve's default HTTP port",
    10001: "Ray's default client port",
}


@dataclass(frozen=True)
class RayPorts:
    """Every port a Ray node opens, set explicitly (a second node on one machine needs its own set)."""

    gcs: int = 46379  # head only: the address workers join (`ray start --address HOST:gcs`)
    client_server: int = 46380  # head only: Ray Client
    dashboard: int = 46381  # head only: bound only with `dashboard: true`, set anyway
    node_manager: int = 46382
    object_manager: int = 46383
    dashboard_agent: int = 46384
    dashboard_agent_grpc: int = 46385
    runtime_env_agent: int = 46386
    metrics_export: int = 46387
    serve_http: int = 46388  # Serve's HTTP proxy (not started: TreeLM's ingress is gRPC)
    serve_grpc: int = 46389  # Serve's gRPC proxy (not started, see README "Run a cluster")
    workers: tuple[int, int] = (46400, 46499)  # worker processes' port range, inclusive

    def node_ports(self) -> dict[str, int]:
        """The ports every node (head or worker) binds."""
        names = (
            "node_manager",
            "object_manager",
            "dashboard_agent",
            "dashboard_agent_grpc",
            "runtime_env_agent",
            "metrics_export",
        )
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # HOST:PORT of a running cluster's GCS to join; None = start a head here
    num_cpus: float | None = None  # logical CPUs the head offers (None = Ray detects); replicas ask for fractions
    num_gpus: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)  # custom resources of the head node
    temp_dir: Path = Path("/tmp/treelm-ray")
    auth: str = "token"  # RAY_AUTH_MODE for head, workers and drivers: token | disabled
    dashboard: bool = False
    namespace: str = "treelm"
    ports: RayPorts = RayPorts()


@dataclass(frozen=True)
class IngressConfig:
    """The front door: the same gRPC servicers, OpenAI HTTP API, auth and health as `treelm serve`,
    in a Serve deployment."""

    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = 50080  # the OpenAI-compatible HTTP API (null: off); away from Serve's 8000
    replicas: int = 1  # at most one per Ray node (each binds host:port on its node)
    on_head: bool = True  # keep it beside a SQLite registry file; false with PostgreSQL
    cpus: float = 0.25
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # /metrics has no token: local scrapers only unless widened on purpose
    auth: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # clients must present a certificate this CA signed (mutual TLS)
    tls_client_tenants: Path | None = None  # YAML: certificate subject (CN or RFC 4514) -> tenant
    grace_s: float = 10.0
    updates: bool = True  # the Updates service (signed update protocol), run by a desk actor on the head
    update_threads: int = 1  # torch threads of the desk's gate and aggregation work (it shares the head's cores)
    # Fine-tuning jobs (a tree whose update policy has customize.key): each runs as a Ray task asking
    # for job_cpus CPUs (anywhere in the cluster: operators add training capacity by adding machines),
    # with job_threads torch threads; the desk runs one job at a time per tree, the rest queue. Each
    # child's rebase re-fit is such a task too (cluster/ray/rebase.py), a level's children at once.
    job_cpus: float = 1.0
    job_threads: int = 1
    variant_key: Path | None = None  # the key that signs variant manifests for devices (Distribution)
    # the passphrase of an encrypted variant_key (first line; else $TREELM_KEY_PASSPHRASE on the ingress)
    variant_key_password_file: Path | None = None
    variant_delegations: tuple[Path, ...] = ()  # root's delegations of that key, one file per tree
    variant_cache_bytes: int = 20 << 30  # bound on each tree dir's built variants (`variant_cache: 20GiB`)
    # update uploads (cluster/service/uploads.py): `upload_max_file: 256MiB`, `upload_spool: 1GiB`, ...
    upload_max_file_bytes: int = 256 << 20  # one payload file, as its signed manifest declares it
    upload_spool_bytes: int = 1 << 30  # what all uploads in progress on one ingress replica declare together
    upload_per_tenant: int = 2  # concurrent uploads of one tenant on one ingress replica
    upload_idle_s: float = 30.0  # a stream that sends nothing for this long is aborted
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)  # `tenant_limits:` (cluster/service/quota.py)
    feedback: bool = True  # record every response for feedback (cluster/service/responses.py)
    refusals_per_s: int = 20  # a caller's refusals a second answered at once (cluster/service/refusals.py; 0: off)


@dataclass(frozen=True)
class ReplicaResources:
    cpus: float = 0.5
    gpus: float = 0.0
    memory: int | None = None  # bytes Ray reserves per replica (`memory: 2GiB` in the file)
    custom: Mapping[str, float] = field(default_factory=dict)  # e.g. {zone-b: 1}: pin replicas to nodes


@dataclass(frozen=True)
class TrunkConfig:
    """One trunk: one built tree over one base, a Serve deployment whose replicas each hold an engine."""

    tree_dir: Path
    tree: str  # the tree's name, read from tree.json (the trunk's name in `treelm cluster scale`)
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # autoscaling aims at this many requests per replica
    max_ongoing_requests: int = (
        16 + 256
    )  # calls one replica takes at once: by default its batch and queue (max_batch + max_queue)
    resources: ReplicaResources = ReplicaResources()
    max_adapters: int = 64  # per replica: active adapters in the engine and node ids Serve routes by
    max_batch: int = 16
    max_queue: int = 256
    tenant_step_rows: int | None = None  # a tenant's rows per decode step while others have rows (None: all)
    tenant_contended_running: int | None = DEFAULT_CONTENDED_RUNNING  # nodes.runtime.fair (None: off)
    prefill_chunk: int = 32  # a longer prompt is prefilled this many tokens per step while rows decode (0: whole)
    host_cache: int = 1 << 30  # bytes of inactive adapters a replica keeps in memory
    prefix_cache: int = 256 << 20  # bytes of prompt-prefix keys/values a replica reuses (0: off)
    precision: str = "fp32"  # nodes.base.precision: fp32, bf16, int8 or auto (resolved on the replica's machine)
    preload: tuple[str, ...] = ()  # node ids loaded before a replica takes traffic
    health_check_period_s: float = 2.0
    graceful_shutdown_s: float = 10.0

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas


@dataclass(frozen=True)
class ClusterConfig:
    file: str
    name: str
    registry: str
    trunks: tuple[TrunkConfig, ...]
    ray: RayConfig = RayConfig()
    ingress: IngressConfig = IngressConfig()

    def trunk(self, tree: str) -> TrunkConfig:
        for trunk in self.trunks:
            if trunk.tree == tree:
                return trunk
        raise ClusterConfigError(
            self.file, "trunks", f"no trunk serves tree {tree!r} (trunks: {', '.join(t.tree for t in self.trunks)})"
        )


class _Reader:
    """Reads one mapping of the file, remembering where it is for error messages."""

    def __init__(self, file: str, base: Path, data: Any, where: str):
        if not isinstance(data, Mapping):
            raise ClusterConfigError(file, where, f"must be a mapping, got {type(data).__name__}")
        self.file, self.base, self.data, self.where = file, base, dict(data), where
        self._seen: set[str] = set()

    def path_of(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> ClusterConfigError:
        return ClusterConfigError(self.file, self.path_of(key), message)

    def raw(self, key: str, default: Any = None) -> Any:
        self._seen.add(key)
        value = self.data.get(key, default)
        return default if value is None else value

    def child(self, key: str) -> _Reader:
        return _Reader(self.file, self.base, self.raw(key, {}), self.path_of(key))

    def integer(self, key: str, default: _Int, low: int = 0, high: int | None = None) -> int | _Int:
        value = self.raw(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
            raise self.error(key, f"must be {bound}, got {value!r}")
        return value

    def number(self, key: str, default: _Number, low: float = 0.0, strict: bool = False) -> float | _Number:
        value = self.raw(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (strict and value == low):
            raise self.error(key, f"must be a number {'>' if strict else '>='} {low:g}, got {value!r}")
        return float(value)

    def port(self, key: str, default: _Int) -> int | _Int:
        low = 0 if key in ("port", "metrics_port", "http_port") else 1
        value = self.integer(key, default, low=low, high=65535)
        if value in _RAY_DEFAULT_PORTS:
            raise self.error(key, f"{value} is {_RAY_DEFAULT_PORTS[value]}; choose another port explicitly")
        return value

    def text(self, key: str, default: _Text, choices: tuple[str, ...] = ()) -> str | _Text:
        value = self.raw(key, default)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value.strip()

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def path(self, key: str, default: _Path) -> Path | _Path:
        value = self.text(key, None)
        if value is None:
            return default
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p).resolve()

    def resources(self, key: str) -> dict[str, float]:
        reader = self.child(key)
        out = {}
        for name in reader.data:
            if not isinstance(name, str) or not name:
                raise reader.error(str(name), "resource names must be non-empty strings")
            value = reader.number(name, None, strict=True)
            if value is None:  # `name:` with nothing after it
                raise reader.error(name, "must be a number > 0, got nothing")
            out[name] = value
        reader.done()
        return out

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self._seen)
        if unknown:
            raise self.error(unknown[0], f"unknown key (known here: {', '.join(sorted(self._seen))})")


def _ports(r: _Reader) -> RayPorts:
    d = RayPorts()
    values: dict[str, int] = {
        name: r.port(name, getattr(d, name))
        for name in ("gcs", "client_server", "dashboard", "serve_http", "serve_grpc", *d.node_ports())
    }
    workers = r.raw("workers", list(d.workers))
    if (
        not isinstance(workers, (list, tuple))
        or len(workers) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) and 1024 <= p <= 65535 for p in workers)
        or workers[1] - workers[0] < 9
    ):
        raise r.error("workers", f"must be [first, last] ports with at least 10 ports in 1024..65535, got {workers!r}")
    ports = RayPorts(workers=(workers[0], workers[1]), **values)
    singles = [(name, value) for name, value in values.items()]
    seen: dict[int, str] = {}
    for name, value in singles:
        if value in seen:
            raise r.error(name, f"port {value} is also {r.path_of(seen[value])}")
        if workers[0] <= value <= workers[1]:
            raise r.error(name, f"port {value} lies inside the workers range {workers[0]}..{workers[1]}")
        seen[value] = name
    r.done()
    return ports


def _ray(r: _Reader) -> RayConfig:
    address = r.text("address", None)
    if address is not None and not re.match(r"^[\w.\-]+:\d{1,5}$", address):
        raise r.error("address", f"must be HOST:PORT of the head's GCS, got {address!r}")
    namespace = r.text("namespace", "treelm")
    config = RayConfig(
        address=address,
        num_cpus=r.number("num_cpus", None, strict=True),
        num_gpus=r.integer("num_gpus", None),
        resources=r.resources("resources"),
        temp_dir=r.path("temp_dir", RayConfig.temp_dir),
        auth=r.text("auth", "token", choices=("token", "disabled")),
        dashboard=r.flag("dashboard", False),
        namespace=namespace,
        ports=_ports(r.child("ports")),
    )
    r.done()
    return config


def _paths(r: _Reader, key: str) -> tuple[Path, ...]:
    value = r.raw(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise r.error(key, f"must be a list of file paths, got {value!r}")
    return tuple(p if (p := Path(v).expanduser()).is_absolute() else (r.base / p).resolve() for v in value)


def _quotas(r: _Reader) -> QuotaPolicy:
    """``tenant_limits: {max_running, max_queued, tokens_per_minute, file}``: defaults and a YAML of overrides."""
    default = TenantQuota()
    try:
        quota = TenantQuota(
            max_running=r.integer("max_running", default.max_running, low=1),
            max_queued=r.integer("max_queued", default.max_queued, low=1),
            tokens_per_minute=r.integer("tokens_per_minute", None, low=1),
        )
        file = r.path("file", None)
        r.done()
        return QuotaPolicy.load(file, quota) if file is not None else QuotaPolicy(quota)
    except ServeError as exc:
        raise r.error("file", str(exc)) from None


def _ingress(r: _Reader) -> IngressConfig:
    http_port: int | None = IngressConfig.http_port
    if "http_port" in r.data and r.data["http_port"] is None:
        r.raw("http_port")  # an explicit null turns the HTTP API off
        http_port = None
    else:
        http_port = r.port("http_port", IngressConfig.http_port)
    config = IngressConfig(
        host=r.text("host", "127.0.0.1"),
        port=r.port("port", 50051),
        http_port=http_port,
        replicas=r.integer("replicas", 1, low=1),
        on_head=r.flag("on_head", True),
        cpus=r.number("cpus", 0.25),
        metrics_port=r.port("metrics_port", None),
        metrics_host=r.text("metrics_host", "127.0.0.1"),
        auth=r.flag("auth", True),
        tls_cert=r.path("tls_cert", None),
        tls_key=r.path("tls_key", None),
        tls_client_ca=r.path("tls_client_ca", None),
        tls_client_tenants=r.path("tls_client_tenants", None),
        grace_s=r.number("grace_s", 10.0),
        updates=r.flag("updates", True),
        update_threads=r.integer("update_threads", 1, low=1),
        job_cpus=r.number("job_cpus", IngressConfig.job_cpus, strict=True),
        job_threads=r.integer("job_threads", IngressConfig.job_threads, low=1),
        variant_key=r.path("variant_key", None),
        variant_key_password_file=r.path("variant_key_password_file", None),
        variant_delegations=_paths(r, "variant_delegations"),
        variant_cache_bytes=_memory(r, "variant_cache") or IngressConfig.variant_cache_bytes,
        upload_max_file_bytes=_memory(r, "upload_max_file") or IngressConfig.upload_max_file_bytes,
        upload_spool_bytes=_memory(r, "upload_spool") or IngressConfig.upload_spool_bytes,
        upload_per_tenant=r.integer("upload_per_tenant", IngressConfig.upload_per_tenant, low=1),
        upload_idle_s=r.number("upload_idle_s", IngressConfig.upload_idle_s, strict=True),
        quotas=_quotas(r.child("tenant_limits")),
        feedback=r.flag("feedback", True),
        refusals_per_s=r.integer("refusals_per_s", IngressConfig.refusals_per_s, low=0),
    )
    if (config.variant_key is None) != (not config.variant_delegations):
        raise r.error("variant_key", "serving variants needs variant_key and variant_delegations (one per tree)")
    if config.variant_key_password_file is not None and config.variant_key is None:
        raise r.error("variant_key_password_file", "a passphrase file needs variant_key")
    for path in (config.variant_key, *config.variant_delegations):
        if path is not None and not path.exists():
            raise r.error(
                "variant_key" if path == config.variant_key else "variant_delegations", f"{path} does not exist"
            )
    if config.variant_key_password_file is not None and not config.variant_key_password_file.is_file():
        raise r.error("variant_key_password_file", f"{config.variant_key_password_file} is not a file")
    listeners = [(n, getattr(config, n)) for n in ("port", "http_port", "metrics_port") if getattr(config, n)]
    for i, (name, value) in enumerate(listeners):
        for other, taken in listeners[:i]:
            if value == taken:
                raise r.error(name, f"port {value} is also ingress.{other}")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise r.error("tls_cert", "TLS needs both tls_cert and tls_key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise r.error("tls_client_ca", "client certificates need TLS: set tls_cert and tls_key too")
    if config.tls_client_tenants is not None and config.tls_client_ca is None:
        raise r.error("tls_client_tenants", "mapping client certificates to tenants needs tls_client_ca")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "tls_client_tenants"):
        value = getattr(config, name)
        if value is not None and not value.is_file():
            raise r.error(name, f"{value} is not a file")
    if config.tls_client_tenants is not None:
        try:
            ClientTenants.load(config.tls_client_tenants)  # the same checks the ingress makes at start
        except ServeError as exc:
            raise r.error("tls_client_tenants", str(exc)) from None
    r.done()
    return config


def _replicas(r: _Reader, key: str) -> tuple[int, int, int | None]:
    value = r.raw(key, 1)
    if isinstance(value, int) and not isinstance(value, bool):
        count = r.integer(key, 1, low=1)
        return count, count, None
    sub = r.child(key)
    low = sub.integer("min", 1, low=0)
    high = sub.integer("max", max(low, 1), low=1)
    initial = sub.integer("initial", None, low=0)
    if high < low:
        raise sub.error("max", f"must be >= min ({low}), got {high}")
    if initial is not None and not low <= initial <= high:
        raise sub.error("initial", f"must lie in min..max ({low}..{high}), got {initial}")
    sub.done()
    return low, high, initial


def _memory(r: _Reader, key: str) -> int | None:
    value = r.raw(key, None)
    if value is None:
        return None
    try:
        return parse_memory_size(str(value), field=key)
    except InvalidMemorySize as exc:
        raise r.error(key, str(exc)) from None


def _prefix_cache(r: _Reader) -> int:
    value = r.raw("prefix_cache", None)
    if value is None:
        return 256 << 20
    try:
        return parse_cache_size(str(value), field="prefix_cache")
    except InvalidMemorySize as exc:
        raise r.error("prefix_cache", str(exc)) from None


def _trunk(r: _Reader) -> TrunkConfig:
    tree_dir = r.path("tree", None)
    if tree_dir is None:
        raise r.error("tree", "is required: the directory of a built tree (treelm tree build ... --out DIR)")
    try:
        tree = open_tree(tree_dir)
    except NodesError as exc:
        raise r.error("tree", str(exc)) from None
    low, high, initial = _replicas(r, "replicas")
    res = r.child("resources")
    resources = ReplicaResources(
        cpus=res.number("cpus", 0.5),
        gpus=res.number("gpus", 0.0),
        memory=_memory(res, "memory"),
        custom=res.resources("custom"),
    )
    res.done()
    engine = r.child("engine")
    preload = r.raw("preload", [])
    if not isinstance(preload, list) or not all(isinstance(p, str) for p in preload):
        raise r.error("preload", "must be a list of node ids")
    for node in preload:
        if node != tree.name and not tree.has(node):
            raise r.error("preload", f"{node!r} is not a node of tree {tree.name!r}")
    max_batch = engine.integer("max_batch", 16, low=1)
    max_queue = engine.integer("max_queue", 256, low=1)
    config = TrunkConfig(
        tree_dir=tree_dir,
        tree=tree.name,
        min_replicas=low,
        max_replicas=high,
        initial_replicas=initial,
        target_ongoing_requests=r.number("target_ongoing_requests", 8.0, strict=True),
        # Every call a replica may hold reaches its engine's fair queue: beyond it, calls would wait
        # in Serve's first-come queue in front of it, where a flood holds up every other tenant.
        max_ongoing_requests=r.integer("max_ongoing_requests", max_batch + max_queue, low=1),
        resources=resources,
        max_adapters=r.integer("max_adapters", 64, low=1),
        max_batch=max_batch,
        max_queue=max_queue,
        tenant_step_rows=engine.integer("tenant_step_rows", None, low=1),
        tenant_contended_running=engine.integer("tenant_contended_running", DEFAULT_CONTENDED_RUNNING, low=0) or None,
        prefill_chunk=engine.integer("prefill_chunk", 32, low=0),
        host_cache=_memory(engine, "host_cache") or (1 << 30),
        prefix_cache=_prefix_cache(engine),
        precision=engine.text("precision", "fp32", choices=(*PRECISIONS, "auto")),
        preload=tuple(preload),
        health_check_period_s=r.number("health_check_period_s", 2.0, low=0.1),
        graceful_shutdown_s=r.number("graceful_shutdown_s", 10.0),
    )
    engine.done()
    depth = max((len(tree.chain(n.node_id)) for n in tree.nodes), default=0)
    if config.max_adapters < depth:
        raise r.error(
            "max_adapters", f"must be at least the deepest chain of {tree.name!r} ({depth}), got {config.max_adapters}"
        )
    r.done()
    return config


def parse_cluster_config(data: Any, file: str = "cluster.yaml", base: Path | None = None) -> ClusterConfig:
    """Validate an already-parsed document (``file`` and ``base`` give messages and relative paths)."""
    base = base or Path.cwd()
    r = _Reader(file, base, data if data is not None else {}, "")
    name = r.text("name", "treelm")
    if not _NAME.match(name):
        raise r.error("name", f"must be lowercase letters, digits and '-', at most 40, got {name!r}")
    registry = r.raw("registry", None)
    if isinstance(registry, Mapping):
        registry = r.child("registry")
        url = registry.text("url", None)
        registry.done()
    else:
        url = r.text("registry", None)
    if url is None:
        raise r.error(
            "registry",
            "is required: a SQLAlchemy URL (sqlite:///registry.db on one machine, "
            "postgresql+psycopg://... for several)",
        )
    missing = [name for name in re.findall(r"\$\{(\w+)\}", url) if name not in os.environ]
    if missing:  # secrets stay out of the file: postgresql+psycopg://treelm:${TREELM_DB_PASSWORD}@host/db
        raise r.error("registry", f"the environment variable {missing[0]} is not set")
    url = re.sub(r"\$\{(\w+)\}", lambda m: os.environ[m.group(1)], url)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{(base / url[len('sqlite:///') :]).resolve()}"  # relative to the file, like other paths
    items = r.raw("trunks", None)
    if not isinstance(items, list) or not items:
        raise r.error("trunks", "must list at least one trunk (- tree: DIR)")
    trunks = tuple(_trunk(_Reader(file, base, item, f"trunks[{i}]")) for i, item in enumerate(items))
    names = [t.tree for t in trunks]
    for i, tree in enumerate(names):
        if names.index(tree) != i:
            raise ClusterConfigError(
                file,
                f"trunks[{i}].tree",
                f"tree {tree!r} is already served by trunks[{names.index(tree)}]; one trunk per tree",
            )
    ray_config = _ray(r.child("ray"))
    ingress = _ingress(r.child("ingress"))
    p = ray_config.ports
    ray_ports = {
        *p.node_ports().values(),
        p.gcs,
        p.client_server,
        p.dashboard,
        p.serve_http,
        p.serve_grpc,
    }
    for name in ("port", "http_port", "metrics_port"):
        value = getattr(ingress, name)
        if value and (value in ray_ports or p.workers[0] <= value <= p.workers[1]):
            raise ClusterConfigError(file, f"ingress.{name}", f"port {value} is also a Ray port")
    if url.startswith("sqlite") and not ingress.on_head:
        raise ClusterConfigError(
            file,
            "ingress.on_head",
            "a SQLite registry is a file on the head: keep the ingress there (on_head: true) or use PostgreSQL",
        )
    r.done()
    return ClusterConfig(file=file, name=name, registry=url, trunks=trunks, ray=ray_config, ingress=ingress)


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster.yaml (see the module docstring)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ClusterConfigError(str(path), "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClusterConfigError(str(path), "", f"cannot read it: {exc}") from None
    except yaml.YAMLError as exc:
        raise ClusterConfigError(str(path), "", f"not valid YAML: {exc}") from None
    except RecursionError:  # PyYAML recurses once per nesting level
        raise ClusterConfigError(str(path), "", "not valid YAML: nested too deeply") from None
    return parse_cluster_config(data, file=str(path), base=path.resolve().parent)
