"""`treelm serve TREE_DIR`: one process serving a built tree over gRPC (and, with --http-port,
the OpenAI-compatible HTTP API on the same engine and tokens).

    treelm registry init --db sqlite:///registry.db
    treelm serve build/demo --db sqlite:///registry.db --port 50051 --http-port 8080 --metrics-port 9100

The tree is imported into the registry first (idempotent). SIGTERM or Ctrl-C
drains: health turns NOT_SERVING, new calls are refused, in-flight calls get
``--grace`` seconds, then the engine stops.

With ``customize.key`` in the tree's update policy, tenants' fine-tuning jobs run here, one at a
time, each in its own process taking ``--job-threads`` CPU threads (default 1) beside the engine's
``--threads``: size them together to the machine's cores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from cluster.cli.passphrase import PasswordEnv, PasswordFile, passphrase
from nodes.runtime.requests import DEFAULT_CONTENDED_RUNNING

__all__ = ["serve_command"]


def serve_command(
    tree_dir: Annotated[Path, typer.Argument(help="a built tree directory (treelm tree build ... --out DIR)")],
    db: Annotated[
        str | None,
        typer.Option("--db", help="registry URL (default: $TREELM_REGISTRY_URL or ~/.treelm/registry.db)"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port (0 = any free port)")] = 50051,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate chain")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key")] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option("--tls-client-ca", help="PEM CA: require client certificates it signed (mutual TLS)"),
    ] = None,
    tls_client_tenants: Annotated[
        Path | None,
        typer.Option(
            "--tls-client-tenants",
            help="YAML: client certificate subject (CN, or full RFC 4514 subject) -> tenant; such a certificate "
            "authenticates without a token, and a token of another tenant is refused",
        ),
    ] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Prometheus /metrics port")] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="address /metrics listens on (it has no token: keep it local)")
    ] = "127.0.0.1",
    http_port: Annotated[
        int | None,
        typer.Option("--http-port", help="also serve the OpenAI-compatible HTTP API (/v1/...) on this port"),
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="accept calls without a token (local development only)")
    ] = False,
    grace: Annotated[float, typer.Option(help="seconds in-flight calls may finish at shutdown")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="rows decoded together")] = 32,
    max_queue: Annotated[int, typer.Option(help="waiting requests before RESOURCE_EXHAUSTED")] = 1024,
    threads: Annotated[int | None, typer.Option(help="torch threads for the engine (default: torch's)")] = None,
    job_threads: Annotated[
        int,
        typer.Option(
            "--job-threads",
            min=1,
            help="CPU threads of a fine-tuning job (one at a time, in its own process beside the engine; "
            "jobs run when the update policy sets customize.key)",
        ),
    ] = 1,
    tenant_max_running: Annotated[
        int, typer.Option("--tenant-max-running", help="a tenant's requests in the batch at once; more wait")
    ] = 16,
    tenant_max_queued: Annotated[
        int, typer.Option("--tenant-max-queued", help="a tenant's waiting requests before RESOURCE_EXHAUSTED / 429")
    ] = 64,
    tenant_step_rows: Annotated[
        int | None,
        typer.Option(
            "--tenant-step-rows",
            min=1,
            help="while several tenants have rows in the batch, a tenant's rows decoded per step (default: all)",
        ),
    ] = None,
    tenant_contended_running: Annotated[
        int,
        typer.Option(
            "--tenant-contended-running",
            min=0,
            help="while a light tenant (fewer requests in the batch than this) has requests, another tenant's "
            "requests admitted to the batch (0: off)",
        ),
    ] = DEFAULT_CONTENDED_RUNNING,
    refusals_per_s: Annotated[
        int,
        typer.Option(
            "--refusals-per-s",
            min=0,
            help="a caller's refused calls a second answered at once; later ones wait 0.5 s (0: no wait)",
        ),
    ] = 20,
    tenant_tokens_per_minute: Annotated[
        int | None, typer.Option("--tenant-tokens-per-minute", help="a tenant's generated tokens (default: no bound)")
    ] = None,
    tenant_limits: Annotated[
        Path | None,
        typer.Option("--tenant-limits", help="YAML of per-tenant overrides: tenants: {NAME: {tokens_per_minute: N}}"),
    ] = None,
    updates: Annotated[
        bool,
        typer.Option(
            "--updates/--no-updates",
            help="serve the Updates service (signed update protocol) over this tree dir and registry",
        ),
    ] = True,
    feedback: Annotated[
        bool,
        typer.Option(
            "--feedback/--no-feedback",
            help="record every response (tenant, id, node, version) so callers can rate it; texts only under retention",
        ),
    ] = True,
    update_policy: Annotated[
        Path | None,
        typer.Option("--update-policy", help="update policy YAML (default: TREE_DIR/update-policy.yaml)"),
    ] = None,
    variant_key: Annotated[
        Path | None,
        typer.Option("--variant-key", help="key dir or private PEM that signs variant manifests for devices"),
    ] = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
    variant_delegation: Annotated[
        Path | None,
        typer.Option("--variant-delegation", help="root's delegation of that key (`treelm keys delegate-variants`)"),
    ] = None,
    upload_max_file: Annotated[
        str, typer.Option("--upload-max-file", help="largest payload file an update upload may declare")
    ] = "256MiB",
    upload_spool: Annotated[
        str, typer.Option("--upload-spool", help="bytes all update uploads in progress may declare together")
    ] = "1GiB",
    upload_per_tenant: Annotated[
        int, typer.Option("--upload-per-tenant", help="concurrent update uploads per tenant (then RESOURCE_EXHAUSTED)")
    ] = 2,
    upload_idle: Annotated[
        float, typer.Option("--upload-idle", help="seconds an update upload may send nothing before it is aborted")
    ] = 30.0,
    variant_cache: Annotated[
        str,
        typer.Option(
            "--variant-cache",
            help="bound on the built variants kept in TREE_DIR/variants (least recently used are evicted)",
        ),
    ] = "20GiB",
    prefill_chunk: Annotated[
        int,
        typer.Option(
            "--prefill-chunk",
            min=0,
            help="tokens of a long prompt prefilled per step while other rows decode (0: whole prompts)",
        ),
    ] = 32,
    prefix_cache: Annotated[
        str,
        typer.Option(
            "--prefix-cache",
            help="memory for reusing prompt prefixes' keys/values per exact chain and version (0 turns it off)",
        ),
    ] = "256MiB",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="weights: fp32 (exact), bf16, int8 (weight-only, bf16 activations) or auto (bf16 on CPUs with bf16)",
        ),
    ] = "fp32",
) -> None:
    """Serve a built tree over gRPC (Inference, Registry, Updates, Admin, health, reflection) and,
    with --http-port, the OpenAI-compatible HTTP API."""
    from cluster.service.quota import QuotaPolicy, TenantQuota
    from cluster.service.server import ServerConfig
    from cluster.service.standalone import StandaloneOptions, serve_standalone
    from cluster.service.uploads import upload_limits

    console, err = Console(), Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quota = TenantQuota(tenant_max_running, tenant_max_queued, tenant_tokens_per_minute)
    quotas = QuotaPolicy.load(tenant_limits, quota) if tenant_limits is not None else QuotaPolicy(quota)
    options = StandaloneOptions(
        tree_dir=tree_dir,
        db=db,
        server=ServerConfig(
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            tls_client_tenants=tls_client_tenants,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            http_port=http_port,
            auth=not insecure_no_auth,
            grace_s=grace,
            uploads=upload_limits(upload_max_file, upload_spool, upload_per_tenant, upload_idle),
            quotas=quotas,
            feedback=feedback,
            refusals_per_s=refusals_per_s,
        ),
        max_batch=max_batch,
        max_queue=max_queue,
        tenant_step_rows=tenant_step_rows,
        tenant_contended_running=tenant_contended_running or None,
        prefill_chunk=prefill_chunk,
        threads=threads,
        job_threads=job_threads,
        updates=updates,
        update_policy=update_policy,
        variant_key=variant_key,
        variant_key_passphrase=passphrase(password_env, password_file) if variant_key is not None else None,
        variant_delegation=variant_delegation,
        variant_cache=variant_cache,
        prefix_cache=prefix_cache,
        precision=precision,
    )
    if insecure_no_auth:
        err.print(
            Panel(
                "[bold]authentication is OFF[/bold] (--insecure-no-auth): anyone who can reach this port may call it.\n"
                "Calls without a token see public nodes only. Never use this outside local development.",
                title="[bold red]WARNING[/bold red]",
                border_style="red",
            )
        )
    serve_standalone(options, lambda text: console.print(escape(text)))
