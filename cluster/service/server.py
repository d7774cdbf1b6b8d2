"""The single-process server: the engine(s) and the registry behind ``treelm.v1`` (gRPC) and,
with ``http_port``, the OpenAI-compatible HTTP API (:mod:`cluster.http`) on the same event loop.

    server = TreeServer([EngineTrunk(engine)], Catalog(registry), ServerConfig(port=0, http_port=0))
    await server.start()          # binds; server.port / server.http_port are the real ports
    ...
    await server.stop()           # stop accepting, finish in-flight calls up to the grace period

Besides the seven TreeLM services it registers the standard gRPC health service
(``grpc.health.v1.Health``: SERVING while up, NOT_SERVING once draining) and
server reflection, so stock tools (grpcurl, grpc_health_probe) work. Message
sizes are bounded explicitly on both directions (an HTTP body by the same bound as a gRPC
request). Both transports share one admission (tokens, private nodes, version pins), one
error table and one set of metrics.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.errors import ServeError
from cluster.http.api_server import HttpApi, HttpLimits, HttpServer
from cluster.http.common import ApiContext
from cluster.service.access import NodeAccess
from cluster.service.admission import Admission, TrunkRouter
from cluster.service.auth import Authenticator
from cluster.service.catalog import Catalog
from cluster.service.client_certs import ClientTenants
from cluster.service.distribution import DistributionCalls, DistributionServicer, Distributor
from cluster.service.feedback import FeedbackCalls, FeedbackServicer
from cluster.service.feedback_metrics import FeedbackCollector
from cluster.service.fine_tuning import FineTuningCalls
from cluster.service.fine_tuning_io import UploadSlots
from cluster.service.fine_tuning_servicer import FineTuningServicer
from cluster.service.health import DrainingHealth
from cluster.service.interceptors import AuthInterceptor, StatusInterceptor
from cluster.service.metrics import ServerMetrics
from cluster.service.quota import QuotaPolicy, Quotas
from cluster.service.refusals import RefusalPenalty
from cluster.service.responses import ResponseRecorder, RetentionCache
from cluster.service.servicers import AdminServicer, InferenceServicer, RegistryServicer
from cluster.service.trunk import Trunk
from cluster.service.update_servicer import UpdateBackend, UpdatesServicer
from cluster.service.uploads import UploadLimits, UploadSpool
from cluster.updates.coordinator import Coordinator
from hierarchy.secret_files import exposed_secret_file
from nodes.runtime.requests import MAX_PROMPT_BYTES, MAX_SCHEMA_BYTES
from protos.treelm.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    distribution_pb2,
    distribution_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    fine_tuning_pb2,
    fine_tuning_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    updates_pb2,
    updates_pb2_grpc,
)
from registry.forgetting import PerplexityPoint
from registry.forgetting import latest as latest_perplexities
from registry.limits import all_tenant_limits

__all__ = ["MAX_REQUEST_BODY_BYTES", "MAX_REQUEST_BYTES", "SERVICE_NAMES", "ServerConfig", "TreeServer"]

log = logging.getLogger("treelm.server")

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (inference_pb2, "Inference"),
        (registry_pb2, "Registry"),
        (updates_pb2, "Updates"),
        (admin_pb2, "Admin"),
        (distribution_pb2, "Distribution"),
        (feedback_pb2, "Feedback"),
        (fine_tuning_pb2, "FineTuning"),
    )
)
_MIB = 1 << 20
# The largest legitimate gRPC request, with room to spare: a prompt (or all messages' contents) of
# MAX_PROMPT_BYTES with a JSON schema of MAX_SCHEMA_BYTES and the rest of the request (sampling
# parameters, logit_bias, stop sequences, message roles), or one Updates.Submit chunk (the SDK sends
# 1 MiB pieces of a file, treelm._updates.CHUNK_BYTES; the first chunk is a small envelope).
MAX_REQUEST_BYTES = MAX_PROMPT_BYTES + MAX_SCHEMA_BYTES + 192 * 1024  # 1.25 MiB
# An HTTP body: the prompt's bytes twice over (JSON escapes) and the rest of a request. 2.06 MiB
MAX_REQUEST_BODY_BYTES = 2 * MAX_PROMPT_BYTES + MAX_SCHEMA_BYTES
try:
    SERVER_VERSION = importlib.metadata.version("treelm")
except importlib.metadata.PackageNotFoundError:  # a source checkout that was never installed
    SERVER_VERSION = "0+unknown"


@dataclass(frozen=True)
class ServerConfig:
    """How one server listens and what it allows. Checked in ``__post_init__``."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (see TreeServer.port)
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the server speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA: clients must present a certificate it signed (mutual TLS)
    tls_client_tenants: Path | None = None  # YAML: certificate subject (CN or RFC 4514) -> tenant (client_certs.py)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = any free port)
    metrics_host: str = "127.0.0.1"  # /metrics has no token: local scrapers only unless widened on purpose
    http_port: int | None = None  # the OpenAI-compatible HTTP API on this port (0 = any free port; None = off)
    auth: bool = True  # False only for local development (--insecure-no-auth)
    grace_s: float = 10.0  # how long in-flight calls may finish at shutdown
    # A gRPC request: gRPC's C core refuses a longer one (RESOURCE_EXHAUSTED) before Python decodes it.
    max_receive_message_bytes: int = MAX_REQUEST_BYTES
    # An HTTP JSON body (413 beyond): a 1 MiB prompt even if each of its characters takes a two-byte
    # JSON escape, and far below the megabytes an attacker would have the server read and parse.
    max_request_body_bytes: int = MAX_REQUEST_BODY_BYTES
    max_send_message_bytes: int = 16 * _MIB
    max_concurrent_rpcs: int | None = None  # beyond it grpc answers RESOURCE_EXHAUSTED
    token_cache_ttl_s: float = 30.0
    token_check_interval_s: float = 0.5  # how often the token cache asks the registry about revocations
    node_cache_ttl_s: float = 5.0
    # A caller refused more often than this in a second (a bad argument, a body over the limit, an
    # unknown node) gets its further refusals only after half a second (cluster/service/refusals.py).
    refusals_per_s: int = 20  # 0: answer every refusal at once
    uploads: UploadLimits = field(
        default_factory=UploadLimits
    )  # update uploads (Updates.Submit): sizes, per tenant, idle deadline
    spool_dir: Path | None = None  # where uploads are spooled (0700); None: a private temp dir, removed at stop
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)  # per-tenant limits (cluster/service/quota.py)
    feedback: bool = True  # record every response for feedback (cluster/service/responses.py); False: --no-feedback

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535):
                raise ServeError(f"{name} must be a port number 0..65535, got {value!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServeError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ServeError("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
        if self.tls_client_tenants is not None and self.tls_client_ca is None:
            raise ServeError("--tls-client-tenants maps client certificates: it needs --tls-client-ca")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tls_client_tenants"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ServeError(f"{name.replace('_', '-')} {path} is not a file")
        exposed = exposed_secret_file(self.tls_key, "TLS key") if self.tls_key is not None else None
        if exposed is not None:
            raise ServeError(exposed)
        for name in ("max_receive_message_bytes", "max_send_message_bytes", "max_request_body_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1024:
                raise ServeError(f"{name} must be an integer >= 1024")
        if isinstance(self.refusals_per_s, bool) or not isinstance(self.refusals_per_s, int) or self.refusals_per_s < 0:
            raise ServeError(f"refusals_per_s must be an integer >= 0, got {self.refusals_per_s!r}")
        if not self.grace_s >= 0:
            raise ServeError(f"grace must be >= 0 seconds, got {self.grace_s!r}")
        ports = [(n, getattr(self, n)) for n in ("port", "metrics_port", "http_port") if getattr(self, n)]
        for i, (name, value) in enumerate(ports):
            for other, taken in ports[:i]:
                if value == taken:
                    raise ServeError(f"{name} {value} is also the {other}; give each listener its own port")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _client_tenants(path: Path | None, catalog: Catalog) -> ClientTenants | None:
    """The certificate -> tenant mapping; every tenant it names must exist (a typo refuses to start)."""
    if path is None:
        return None
    tenants = ClientTenants.load(path)
    unknown = sorted(tenants.tenants - catalog.tenant_names())
    if unknown:
        raise ServeError(f"{path}: no such tenant in the registry: {', '.join(unknown)} (treelm registry tenant add)")
    return tenants


class TreeServer:
    """A grpc.aio server over trunks and a registry (see the module docstring)."""

    def __init__(
        self,
        trunks: Sequence[Trunk],
        catalog: Catalog,
        config: ServerConfig = ServerConfig(),
        *,
        close_trunks: bool = False,
        updates: Coordinator | UpdateBackend | None = None,
        distribution: Distributor | None = None,
        fine_tuning: FineTuningCalls | None = None,
    ):
        self.config = config
        self.router = TrunkRouter({t.tree: t for t in trunks})
        self.catalog = catalog
        self._close_trunks = close_trunks
        self.updates = updates  # the update coordinator; None: Updates answers UNIMPLEMENTED
        self.distribution = distribution  # variants for devices; None: Distribution answers UNIMPLEMENTED
        self.access = NodeAccess(catalog.node_visibility, ttl_s=config.node_cache_ttl_s)
        self.distribution_calls = DistributionCalls(distribution, self.access)  # gRPC and HTTP alike
        self.fine_tuning = fine_tuning  # files and jobs, gRPC and HTTP alike; None: they answer 501
        self.file_uploads = UploadSlots()  # training-file uploads in progress, both transports
        # The registry's per-tenant limits over the server's own (treelm registry tenant limits).
        self.quotas = Quotas(config.quotas, overrides=lambda: all_tenant_limits(catalog.registry))
        retention = RetentionCache(catalog.registry)
        self.recorder = ResponseRecorder(retention) if config.feedback else None
        self.feedback = FeedbackCalls(retention, self.access)  # answers even with recording off (old records)
        self.admission = Admission(
            self.router,
            self.access,
            lambda node, tenant: [v.version for v in catalog.versions(node, tenant)],
            quotas=self.quotas,
            recorder=self.recorder,
        )
        # Only public nodes served here become labels: a private node (even its owner's calls) and a
        # made-up id both count as "other", so /metrics tells nobody which private nodes exist.
        self.metrics = ServerMetrics(
            known_node=lambda node: self.router.serves(node) and self.access.known_public(node)
        )
        self.metrics.watch_trunks(lambda: [t.snapshot() for t in self.router.trunks.values()])
        self.metrics.registry.register(FeedbackCollector(catalog.registry, self._feedback_label))
        self.metrics.watch_forgetting(self._forgetting, self._public_served)
        self.refusal_penalty = RefusalPenalty(per_second=config.refusals_per_s)
        self.metrics.refusals_held.set_function(lambda: self.refusal_penalty.held)
        self.metrics.refusals_delayed.set_function(lambda: self.refusal_penalty.delayed_total)
        self.status_interceptor = StatusInterceptor(observe=self.metrics.observe_call, penalty=self.refusal_penalty)
        self.metrics.in_flight.set_function(self._in_flight)
        self.authenticator = Authenticator(
            catalog.grant,
            required=config.auth,
            cache_ttl_s=config.token_cache_ttl_s,
            generation=catalog.token_generation,
            check_interval_s=config.token_check_interval_s,
            client_tenants=_client_tenants(config.tls_client_tenants, catalog),
        )
        self.health = DrainingHealth()
        self.spool: UploadSpool | None = None  # made by start(): the directory Submit spools uploads to
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._stopping = False

    def _feedback_label(self, node: str) -> str:
        """The metrics' rule (a public node served here, else "other"), asking the registry: the
        feedback figures are read in the scraping thread, about nodes no call may have named lately."""
        if not self.router.serves(node):
            return "other"
        visibility = self.catalog.node_visibility(node)
        return node if visibility is not None and visibility.visibility == "public" else "other"

    def _forgetting(self) -> dict[str, list[PerplexityPoint]]:
        out: dict[str, list[PerplexityPoint]] = {}
        for tree in self.router.trunks:
            out |= latest_perplexities(self.catalog.registry, tree)
        return out

    def _public_served(self, node: str) -> bool:
        return self._feedback_label(node) == node  # the same rule, asked in the scraping thread

    def _in_flight(self) -> int:
        return self.status_interceptor.in_flight + (self._http.api.in_flight if self._http is not None else 0)

    def _http_server(self) -> HttpServer:
        c = self.config
        ctx = ApiContext(self.admission, SERVER_VERSION, observe=self.metrics.observe_generation)
        api = HttpApi(
            ctx,
            self.authenticator,
            self.catalog,
            self.distribution_calls,
            self.feedback,
            fine_tuning=self.fine_tuning,
            uploads=self.file_uploads,
            limits=HttpLimits(max_body_bytes=c.max_request_body_bytes),
            observe_call=self.metrics.observe_call,
            penalty=self.refusal_penalty,
        )
        cert, key = (
            (str(c.tls_cert), str(c.tls_key)) if c.tls_cert is not None and c.tls_key is not None else (None, None)
        )
        client_ca = str(c.tls_client_ca) if c.tls_client_ca is not None else None
        return HttpServer(api, c.host, c.http_port or 0, tls_cert=cert, tls_key=key, tls_client_ca=client_ca)

    def _build(self) -> grpc.aio.Server:
        c = self.config
        server = grpc.aio.server(
            interceptors=[self.status_interceptor, AuthInterceptor(self.authenticator)],
            options=[
                ("grpc.max_receive_message_length", c.max_receive_message_bytes),
                ("grpc.max_send_message_length", c.max_send_message_bytes),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a silent second listener
            ],
            maximum_concurrent_rpcs=c.max_concurrent_rpcs,
        )
        observe = self.metrics.observe_generation
        spool_dir = c.spool_dir if c.spool_dir is not None else Path(tempfile.mkdtemp(prefix="treelm-spool-"))
        self.spool = UploadSpool(spool_dir, c.uploads)
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.admission, observe), server)
        registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(self.catalog), server)
        updates_pb2_grpc.add_UpdatesServicer_to_server(
            UpdatesServicer(self.updates, self.access, self.spool, hidden_nodes=self.catalog.hidden_nodes), server
        )
        distribution_pb2_grpc.add_DistributionServicer_to_server(DistributionServicer(self.distribution_calls), server)
        feedback_pb2_grpc.add_FeedbackServicer_to_server(FeedbackServicer(self.feedback), server)
        fine_tuning = FineTuningServicer(
            self.fine_tuning, self.file_uploads, idle_s=c.uploads.idle_s, draining=lambda: self._stopping
        )
        fine_tuning_pb2_grpc.add_FineTuningServicer_to_server(fine_tuning, server)
        admin = AdminServicer(
            self.router,
            self.access,
            version=SERVER_VERSION,
            auth_enabled=c.auth,
            in_flight=lambda: self.status_interceptor.in_flight,
            updates=self.updates,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        return server

    def _bind(self, server: grpc.aio.Server) -> int:
        c = self.config
        address = f"{c.host}:{c.port}"
        try:
            if c.tls_key is not None and c.tls_cert is not None:  # both or neither (ServerConfig checks)
                client_ca = Path(c.tls_client_ca).read_bytes() if c.tls_client_ca is not None else None
                creds = grpc.ssl_server_credentials(
                    [(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())],
                    root_certificates=client_ca,
                    require_client_auth=client_ca is not None,
                )
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ServeError(f"cannot listen on {address}: {exc} (is the port in use? try --port)") from None
        if not port:
            raise ServeError(f"cannot listen on {address} (is the port in use? try --port)")
        return port

    async def start(self) -> None:
        if self._server is not None:
            raise ServeError("the server is already started")
        server = self._build()
        self.port = self._bind(server)
        await server.start()
        self._server = server
        if self.config.http_port is not None:
            http = self._http_server()
            try:
                await http.start()
            except ServeError:
                await self.stop(grace=0)
                raise
            self._http, self.http_port = http, http.port
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve_http(self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:
                await self.stop(grace=0)
                raise ServeError(f"cannot serve metrics on port {self.config.metrics_port}: {exc}") from None
        log.info(
            "serving %s on %s:%s (tls=%s, client certificates=%s, auth=%s, http=%s)",
            ", ".join(self.router.trunks),
            self.config.host,
            self.port,
            self.config.tls,
            "required" if self.config.tls_client_ca is not None else "no",
            self.config.auth,
            self.http_port,
        )

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_running(self) -> bool:
        """False when HTTP was asked for and its server is gone (a health check's question)."""
        return self.config.http_port is None or (self._http is not None and self._http.running)

    @property
    def http_url(self) -> str | None:
        """The OpenAI API's base URL (``base_url`` of the openai client), when HTTP is on."""
        if self.http_port is None:
            return None
        return f"{'https' if self.config.tls else 'http'}://{self.config.host}:{self.http_port}/v1"

    async def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, new calls are refused (UNAVAILABLE), in-flight calls get ``grace`` s."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        grace = self.config.grace_s if grace is None else grace
        await self.health.drain()
        if self._http is not None:
            self._http.api.draining = True  # HTTP answers 503 from now on, like gRPC's UNAVAILABLE
        await asyncio.gather(self._server.stop(grace), *([self._http.stop(grace)] if self._http is not None else []))
        if self.recorder is not None:
            await self.recorder.close()
        if self._close_trunks:
            for trunk in self.router.trunks.values():
                await trunk.close()
        self.metrics.close()
        if self.spool is not None and self.config.spool_dir is None:
            shutil.rmtree(self.spool.root, ignore_errors=True)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
