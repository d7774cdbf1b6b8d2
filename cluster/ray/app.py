"""The Serve applications of a TreeLM cluster: one per trunk, one for the ingress (gRPC and HTTP).

    deploy(config, overrides)          # serve.start (proxies off, ports explicit) + every application
    wait_healthy(config, timeout_s)    # until every application is RUNNING (raises with Serve's message)
    scale(config, "demo", Scaling(replicas=2))
    teardown(config)

Each trunk is its own application (``treelm-trunk-<tree>``) so one can be
scaled or redeployed without touching the others or the ingress. Deployments
carry an explicit version derived from what a replica loads (tree content,
engine limits): redeploying with other replica counts changes them in place,
while a rebuilt tree rolls the replicas over.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ray import serve
from ray.serve import Application, Deployment
from ray.serve.config import ProxyLocation
from ray.serve.schema import ReplicaState

from cluster.errors import ClusterError, DeployError
from cluster.ray.config import ClusterConfig, TrunkConfig
from cluster.ray.ingress import TreeIngress
from cluster.ray.replica import replica_class
from cluster.ray.wire import IngressSpec, TrunkInfo, TrunkSpec, tree_content_digest
from nodes.store.tree import open_tree

__all__ = [
    "INGRESS_APP",
    "INGRESS_DEPLOYMENT",
    "TRUNK_DEPLOYMENT",
    "Scaling",
    "app_name",
    "deploy",
    "scale",
    "teardown",
    "trunk_info",
    "wait_healthy",
]

INGRESS_APP = "treelm-ingress"
INGRESS_DEPLOYMENT = "Ingress"
TRUNK_DEPLOYMENT = "Trunk"
try:
    _CODE = importlib.metadata.version("treelm")
except importlib.metadata.PackageNotFoundError:  # a source checkout that was never installed
    _CODE = "0+unknown"


@dataclass(frozen=True)
class Scaling:
    """Replica counts for one trunk: fixed (``replicas``) or autoscaled between ``min`` and ``max``."""

    min: int
    max: int
    initial: int | None = None

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ClusterError(f"--{name} must be an integer >= 0, got {value!r}")
        if self.max < 1:
            raise ClusterError(f"--max must be >= 1, got {self.max}")
        if self.max < self.min:
            raise ClusterError(f"--max ({self.max}) must be >= --min ({self.min})")

    @classmethod
    def fixed(cls, replicas: int) -> Scaling:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ClusterError(f"--replicas must be an integer >= 1, got {replicas!r}")
        return cls(replicas, replicas)

    @classmethod
    def of(cls, trunk: TrunkConfig, override: Mapping[str, int] | None = None) -> Scaling:
        if override:
            return cls(int(override["min"]), int(override["max"]), override.get("initial"))
        return cls(trunk.min_replicas, trunk.max_replicas, trunk.initial_replicas)

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "max": self.max, **({"initial": self.initial} if self.initial is not None else {})}


def app_name(tree: str) -> str:
    return f"treelm-trunk-{tree}"


def trunk_spec(config: ClusterConfig, trunk: TrunkConfig) -> TrunkSpec:
    return TrunkSpec(
        tree=trunk.tree,
        tree_dir=str(trunk.tree_dir),
        namespace=config.ray.namespace,
        max_batch=trunk.max_batch,
        max_queue=trunk.max_queue,
        tenant_step_rows=trunk.tenant_step_rows,
        tenant_contended_running=trunk.tenant_contended_running,
        prefill_chunk=trunk.prefill_chunk,
        max_adapters=trunk.max_adapters,
        host_cache=trunk.host_cache,
        prefix_cache=trunk.prefix_cache,
        precision=trunk.precision,
        preload=trunk.preload,
        content=tree_content_digest(trunk.tree_dir),
    )


def trunk_info(trunk: TrunkConfig) -> TrunkInfo:
    tree = open_tree(trunk.tree_dir)
    return TrunkInfo(
        tree=tree.name,
        app=app_name(tree.name),
        deployment=TRUNK_DEPLOYMENT,
        base_digest=tree.base_digest,
        nodes=(tree.name, *(str(n.node_id) for n in tree.nodes)),
        max_batch=trunk.max_batch,
        tree_dir=str(trunk.tree_dir),
    )


def _actor_options(trunk: TrunkConfig) -> dict:
    r = trunk.resources
    options: dict = {"num_cpus": r.cpus}
    if r.gpus:
        options["num_gpus"] = r.gpus
    if r.memory:
        options["memory"] = r.memory
    if r.custom:
        options["resources"] = dict(r.custom)
    return options


def trunk_application(config: ClusterConfig, trunk: TrunkConfig, scaling: Scaling) -> Application:
    spec = trunk_spec(config, trunk)
    options: dict = dict(
        name=TRUNK_DEPLOYMENT,
        max_ongoing_requests=trunk.max_ongoing_requests,
        ray_actor_options=_actor_options(trunk),
        health_check_period_s=trunk.health_check_period_s,
        health_check_timeout_s=max(10.0, 5 * trunk.health_check_period_s),
        graceful_shutdown_timeout_s=trunk.graceful_shutdown_s,
        graceful_shutdown_wait_loop_s=0.5,
        version=spec.version(_CODE),
        _internal=True,  # an explicit version is what makes `scale` an in-place change
    )
    if scaling.max > scaling.min:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min,
            "max_replicas": scaling.max,
            "initial_replicas": scaling.initial,
            "target_ongoing_requests": trunk.target_ongoing_requests,
            "upscale_delay_s": 3.0,
            "downscale_delay_s": 30.0,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
        }
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = scaling.min
    return _deployment(replica_class(trunk.max_adapters)).options(**options).bind(spec)


def ingress_application(config: ClusterConfig) -> Application:
    ing = config.ingress
    spec = IngressSpec(
        trunks=tuple(trunk_info(t) for t in config.trunks),
        registry_url=config.registry,
        namespace=config.ray.namespace,
        host=ing.host,
        port=ing.port,
        http_port=ing.http_port,
        auth=ing.auth,
        tls_cert=str(ing.tls_cert) if ing.tls_cert else None,
        tls_key=str(ing.tls_key) if ing.tls_key else None,
        tls_client_ca=str(ing.tls_client_ca) if ing.tls_client_ca else None,
        tls_client_tenants=str(ing.tls_client_tenants) if ing.tls_client_tenants else None,
        metrics_port=ing.metrics_port,
        metrics_host=ing.metrics_host,
        grace_s=ing.grace_s,
        updates=ing.updates,
        variant_key=str(ing.variant_key) if ing.variant_key else None,
        variant_key_password_file=str(ing.variant_key_password_file) if ing.variant_key_password_file else None,
        variant_delegations=tuple(str(p) for p in ing.variant_delegations),
        variant_cache_bytes=ing.variant_cache_bytes,
        upload_max_file_bytes=ing.upload_max_file_bytes,
        upload_spool_bytes=ing.upload_spool_bytes,
        upload_per_tenant=ing.upload_per_tenant,
        upload_idle_s=ing.upload_idle_s,
        quotas=ing.quotas,
        feedback=ing.feedback,
        refusals_per_s=ing.refusals_per_s,
    )
    actor: dict = {"num_cpus": ing.cpus}
    if ing.on_head:
        actor["resources"] = {"node:__internal_head__": 0.001}
    return (
        _deployment(TreeIngress)
        .options(
            name=INGRESS_DEPLOYMENT,
            num_replicas=ing.replicas,
            max_replicas_per_node=1,
            ray_actor_options=actor,
            max_ongoing_requests=1000,
            health_check_period_s=2.0,
            graceful_shutdown_timeout_s=ing.grace_s + 5,
            version=hashlib.sha256(repr((spec, _CODE)).encode()).hexdigest()[:16],
            _internal=True,
        )
        .bind(spec)
    )


def _deployment(cls: type) -> Deployment:
    # Ray annotates deployment() with its decorator form's result even when it is given the class itself.
    return serve.deployment(cls)  # type: ignore[return-value]


def start_serve(config: ClusterConfig) -> None:
    """Start Serve's controller; its HTTP/gRPC proxies stay off (TreeLM's ingress is its own deployment)."""
    ports = config.ray.ports
    serve.start(
        proxy_location=ProxyLocation.Disabled,
        http_options={"host": "127.0.0.1", "port": ports.serve_http},
        grpc_options={"port": ports.serve_grpc},
    )


def deploy(config: ClusterConfig, overrides: Mapping[str, Mapping[str, int]] | None = None) -> None:
    """Deploy (or update in place) every trunk, then the ingress; returns without waiting."""
    overrides = overrides or {}
    start_serve(config)
    targets = [
        serve.RunTarget(
            trunk_application(config, t, Scaling.of(t, overrides.get(t.tree))), name=app_name(t.tree), route_prefix=None
        )
        for t in config.trunks
    ]
    targets.append(serve.RunTarget(ingress_application(config), name=INGRESS_APP, route_prefix=None))
    serve.run_many(targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)


def scale(config: ClusterConfig, tree: str, scaling: Scaling) -> None:
    """Change one trunk's replica counts in place (the replicas it keeps keep serving)."""
    trunk = config.trunk(tree)
    target = serve.RunTarget(trunk_application(config, trunk, scaling), name=app_name(tree), route_prefix=None)
    serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)


def app_names(config: ClusterConfig) -> list[str]:
    return [*(app_name(t.tree) for t in config.trunks), INGRESS_APP]


def wait_healthy(
    config: ClusterConfig,
    timeout_s: float = 300.0,
    progress: Callable[[int, int, str], None] | None = None,
    replicas: Mapping[str, int] | None = None,
) -> None:
    """Until every application is RUNNING (and ``replicas[tree]`` replicas run); DeployError otherwise."""
    names = app_names(config)
    end = time.monotonic() + timeout_s
    last = ""
    while True:
        apps = serve.status().applications
        ready, waiting = 0, []
        for name in names:
            app = apps.get(name)
            status = app.status.value if app else "NOT_STARTED"
            if app is not None and status in ("DEPLOY_FAILED", "UNHEALTHY"):
                messages = [app.message] + [d.message for d in app.deployments.values() if d.message]
                raise DeployError(f"{name} is {status}: {' '.join(m for m in messages if m)[:2000]}")
            running = sum(d.replica_states.get(ReplicaState.RUNNING, 0) for d in app.deployments.values()) if app else 0
            tree = name.removeprefix("treelm-trunk-")
            want = (replicas or {}).get(tree)
            if status == "RUNNING" and (want is None or running == want):
                ready += 1
            else:
                waiting.append(f"{name} {status.lower()}" + (f" ({running}/{want} replicas)" if want else ""))
        last = ", ".join(waiting)
        if progress is not None:
            progress(ready, len(names), last)
        if not waiting:
            return
        if time.monotonic() > end:
            raise DeployError(f"not healthy after {timeout_s:g}s: {last} (`treelm cluster status` shows more)")
        time.sleep(0.5)


def teardown(config_apps: list[str]) -> None:
    """Delete TreeLM's applications (the replicas stop gracefully)."""
    existing = serve.status().applications
    for name in config_apps:
        if name in existing:
            serve.delete(name, _blocking=True)
