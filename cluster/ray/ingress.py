"""The ingress of a Ray cluster: a Serve deployment that runs the single-process server's code.

Each ingress replica starts a :class:`cluster.service.server.TreeServer` on an event loop
of its own (a thread), with :class:`cluster.ray.backend.RayTrunk` trunks in place
of in-process engines. So the public contract is literally the same code: the
four ``treelm.v1`` services, the OpenAI-compatible HTTP API (``ingress.http_port``, uvicorn on
the same event loop: :mod:`cluster.http`), bearer-token auth and tenants, private nodes,
status codes, gRPC health and reflection, Prometheus metrics, and the Updates
service, whose calls go to the one update desk actor on the head
(cluster/ray/desk.py). The registry is
opened here, beside the ingress, and every request's tenant and node visibility
are resolved before it reaches a replica.

Why not Serve's own gRPC proxy: it routes by an ``application`` metadata key,
offers no server interceptors for our auth and status mapping, and answers
health and reflection its own way, so stock tools and the SDK would see a
different server. Why not Serve's HTTP proxy with its FastAPI integration for the OpenAI API:
it would be a second code path beside ``treelm serve``'s (another process hop, Serve's own
error pages and routing), where running :class:`~cluster.service.server.TreeServer` here gives
both transports the same admission, engine requests and error table by construction. Serve
keeps the ingress replica alive (health checks, restarts), and ``max_replicas_per_node=1``
lets several ingresses bind the same ports on different machines.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from ray import serve

from cluster.ray.backend import BoardView, RayTrunk
from cluster.ray.board import ensure_board
from cluster.ray.desk import RemoteCoordinator
from cluster.ray.wire import IngressSpec
from cluster.service.access import NodeAccess
from cluster.service.catalog import Catalog
from cluster.service.distribution import Distributor, VariantSigning
from cluster.service.fine_tuning import FineTuningCalls
from cluster.service.quota import Quotas
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.uploads import UploadLimits
from cluster.updates.keys import load_signing_key
from cluster.updates.policy import UpdatePolicy
from hierarchy.secret_files import read_passphrase
from hierarchy.updates.distribution import parse_delegation
from hierarchy.updates.envelope import Envelope
from registry.db import open_registry
from registry.limits import all_tenant_limits

__all__ = ["TreeIngress"]

log = logging.getLogger("treelm.ingress")
_REFRESH_S = 2.0  # how often Prometheus' view of the replicas is refreshed


class TreeIngress:
    """A Serve deployment class; its constructor argument is an :class:`IngressSpec`."""

    def __init__(self, spec: IngressSpec):
        self.spec = spec
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="treelm-ingress", daemon=True)
        self._thread.start()
        self._registry = open_registry(spec.registry_url)
        self._view = BoardView(ensure_board(spec.namespace))
        trunks = [
            RayTrunk(info, serve.get_deployment_handle(info.deployment, info.app), self._view) for info in spec.trunks
        ]
        config = ServerConfig(
            host=spec.host,
            port=spec.port,
            http_port=spec.http_port,
            auth=spec.auth,
            metrics_port=spec.metrics_port,
            metrics_host=spec.metrics_host,
            grace_s=spec.grace_s,
            tls_cert=Path(spec.tls_cert) if spec.tls_cert else None,
            tls_key=Path(spec.tls_key) if spec.tls_key else None,
            tls_client_ca=Path(spec.tls_client_ca) if spec.tls_client_ca else None,
            tls_client_tenants=Path(spec.tls_client_tenants) if spec.tls_client_tenants else None,
            uploads=UploadLimits(
                max_file_bytes=spec.upload_max_file_bytes,
                max_spool_bytes=spec.upload_spool_bytes,
                per_tenant=spec.upload_per_tenant,
                idle_s=spec.upload_idle_s,
            ),
            spool_dir=_spool_dir(spec),
            quotas=spec.quotas,
            feedback=spec.feedback,
            refusals_per_s=spec.refusals_per_s,
        )
        try:
            # Updates go to the one desk actor on the head (cluster/ray/desk.py), never run here.
            updates = RemoteCoordinator(spec.namespace) if spec.updates else None
            fine_tuning = self._fine_tuning(spec, config, updates)
            self.server: TreeServer = self._call(
                self._start(trunks, config, updates, self._distributor(spec), fine_tuning)
            )
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._registry.close()
            raise
        self._refresher = asyncio.run_coroutine_threadsafe(self._refresh_loop(), self._loop)
        log.info("TreeLM ingress serving %s on %s", ", ".join(t.tree for t in spec.trunks), self.endpoint())

    def _call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _distributor(self, spec: IngressSpec) -> Distributor | None:
        """Variants for devices, built and served here from the trunks' tree dirs (readable on this node)."""
        if spec.variant_key is None:
            return None
        delegations = {}
        for file in spec.variant_delegations:
            envelope = Envelope.from_bytes(Path(file).read_bytes())
            delegations[parse_delegation(envelope.payload).tree] = envelope
        password = read_passphrase(spec.variant_key_password_file) if spec.variant_key_password_file else None
        signing = VariantSigning(load_signing_key(spec.variant_key, password), delegations)
        trees = {info.tree: Path(info.tree_dir) for info in spec.trunks}
        return Distributor(trees, Catalog(self._registry), signing, cache_bytes=spec.variant_cache_bytes)

    def _fine_tuning(
        self, spec: IngressSpec, config: ServerConfig, updates: RemoteCoordinator | None
    ) -> FineTuningCalls | None:
        """Files and jobs for the trees whose policy has customize.key; the desk's runners train them."""
        if updates is None:  # no desk: nothing would register the nodes
            return None
        policies = {info.tree: UpdatePolicy.for_tree(info.tree_dir).customize for info in spec.trunks}
        return FineTuningCalls(
            self._registry,
            NodeAccess(Catalog(self._registry).node_visibility, ttl_s=config.node_cache_ttl_s),
            policies,
            Quotas(config.quotas, overrides=lambda: all_tenant_limits(self._registry)),
            wake=updates.wake_jobs,
        )

    async def _start(
        self,
        trunks: list[RayTrunk],
        config: ServerConfig,
        updates: RemoteCoordinator | None,
        distribution: Distributor | None = None,
        fine_tuning: FineTuningCalls | None = None,
    ) -> TreeServer:
        # grpc.aio objects live on this loop
        server = TreeServer(
            trunks,
            Catalog(self._registry),
            config,
            updates=updates,
            distribution=distribution,
            fine_tuning=fine_tuning,
        )
        await server.start()
        return server

    async def _refresh_loop(self) -> None:
        while True:
            await self._view.refresh()
            await asyncio.sleep(_REFRESH_S)

    def endpoint(self) -> str:
        return f"{self.spec.host}:{self.server.port}"

    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def http_port(self) -> int | None:
        return self.server.http_port

    def check_health(self) -> None:
        """Serve replaces this replica when its server thread or listener is gone."""
        if not self._thread.is_alive() or self.server.health.draining:
            raise RuntimeError("the ingress server is not running")
        if not self.server.http_running:
            raise RuntimeError("the ingress HTTP server (OpenAI API) is not running")

    def __del__(self) -> None:
        """Graceful stop (scale down, redeploy, `treelm cluster down`): drain, then close."""
        loop = getattr(self, "_loop", None)
        if loop is None or not loop.is_running():
            return
        try:
            self._refresher.cancel()
            self._call(self.server.stop(), timeout=self.spec.grace_s + 10)
        except Exception:
            log.warning("the ingress did not stop cleanly", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        self._registry.close()


def _spool_dir(spec: IngressSpec) -> Path | None:
    """Update uploads spool beside the first tree, as with `treelm serve`, where that tree dir is on
    this node; else (an ingress on another machine) in a private temp dir."""
    for info in spec.trunks:
        if info.tree_dir and Path(info.tree_dir).is_dir():
            return Path(info.tree_dir) / "spool"
    return None
