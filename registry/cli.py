"""`treelm registry ...`: create and migrate the database, list and inspect nodes, move aliases,
match a task and a device to a node, and manage tenants and their tokens.

The database is ``--db URL`` (before or after the sub-command), else
``$TREELM_REGISTRY_URL``, else ``~/.treelm/registry.db``. Errors are
:class:`registry.errors.RegistryError`; the console script prints them and exits 2.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from registry.memory import DEFAULT_CONTEXT, format_bytes, parse_bandwidth, parse_compute, parse_memory_size

if TYPE_CHECKING:
    from registry.matching import MatchResult
    from registry.records import NodeRecord

__all__ = ["DbOption", "db_url", "parse_duration", "registry_app"]

registry_app = typer.Typer(
    help="The model registry: nodes, versions, aliases, matching a task and a device to a node.",
    no_args_is_help=True,
)
tenant_app = typer.Typer(help="Tenants (the owners of private nodes).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens of tenants (stored hashed).", no_args_is_help=True)
registry_app.add_typer(tenant_app, name="tenant")
registry_app.add_typer(token_app, name="token")

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="database URL (default: $TREELM_REGISTRY_URL, else ~/.treelm/registry.db)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
# The registry CLI talks to the database directly, so its user is an operator and sees every node;
# --tenant shows what that tenant sees (public nodes and its own private ones). `match` is the
# exception: without --tenant it answers as an anonymous user (public nodes only).
TenantOption = Annotated[str | None, typer.Option("--tenant", help="act as this tenant (its private nodes)")]
_LEVEL_STYLE = {"base": "bold magenta", "language": "bold cyan", "domain": "green", "subdomain": "yellow"}
_FIT_STYLE = {"perfect": "green", "good": "cyan", "marginal": "yellow"}


@registry_app.callback()
def _group(ctx: typer.Context, db: DbOption = None) -> None:
    ctx.obj = {"db": db}


def db_url(ctx: typer.Context, db: str | None) -> str | None:
    """The command's --db, else the group's --db, else None (then the environment or the default)."""
    if db:
        return db
    root = ctx.find_root()
    for c in (ctx, ctx.parent, root):
        if c is not None and isinstance(c.obj, dict) and c.obj.get("db"):
            return c.obj["db"]
    return None


def _known_tenant(reg, tenant: str | None) -> None:
    from registry.access import get_tenant

    if tenant is not None:
        get_tenant(reg, tenant)  # a typo must not silently show the public view


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@registry_app.command("init")
def init(ctx: typer.Context, db: DbOption = None) -> None:
    """Create the registry schema (through its migrations)."""
    from registry.db import init_registry

    status, created = init_registry(db_url(ctx, db))
    verb = "initialised" if created else "already initialised:"
    Console().print(f"[green]{verb}[/green] registry at {escape(status.url)} (schema {status.current})")


@registry_app.command("upgrade")
def upgrade(ctx: typer.Context, db: DbOption = None) -> None:
    """Migrate the registry schema to this treelm's version."""
    from registry.db import upgrade_registry

    before, after = upgrade_registry(db_url(ctx, db))
    console = Console()
    if before.current == after.current:
        console.print(f"[green]up to date[/green]: {escape(after.url)} is at schema {after.current}")
    else:
        console.print(f"[green]upgraded[/green] {escape(after.url)} from schema {before.current} to {after.current}")


def _label(node: NodeRecord, *, full: bool = False) -> str:
    name = node.node_id if full else (node.tree if not node.path else node.path.rsplit("/", 1)[-1])
    attrs = [node.level]
    for key in ("language", "domain", "subdomain"):
        if getattr(node, key):
            attrs.append(f"{key}={getattr(node, key)}")
    if node.stable_version is not None:
        attrs.append(f"stable=v{node.stable_version}")
    if node.candidate_version is not None:
        attrs.append(f"candidate=v{node.candidate_version}")
    if node.tags:
        attrs.append("tags=" + ",".join(node.tags))
    if node.visibility == "private":
        attrs.append(f"[red]private[/red] owner={escape(node.owner or '')}")
    return f"[{_LEVEL_STYLE.get(node.level, '')}]{escape(name)}[/] [dim]{' '.join(attrs)}[/dim]"


@registry_app.command("ls")
def ls(
    ctx: typer.Context,
    db: DbOption = None,
    tenant: TenantOption = None,
    tree: Annotated[str | None, typer.Option("--tree", help="only this tree")] = None,
    as_json: JsonOption = False,
) -> None:
    """List nodes as a tree per tree (all of them; with --tenant only what that tenant sees)."""
    from registry.db import open_registry
    from registry.trees import list_nodes

    with open_registry(db_url(ctx, db)) as reg:
        _known_tenant(reg, tenant)
        nodes = list_nodes(reg, tenant=tenant, include_private=tenant is None, tree=tree)
    if as_json:
        _echo_json({"nodes": [n.to_json() for n in nodes]})
        return
    console = Console()
    if not nodes:
        console.print("no nodes registered: import a built tree with `treelm registry import TREE_DIR`")
        return
    branches: dict[str, Tree] = {}
    roots: list[Tree] = []
    for node in nodes:  # ordered by tree, then path: parents come first
        if node.parent is None:
            branches[node.node_id] = Tree(_label(node))
            roots.append(branches[node.node_id])
        else:
            parent = branches.get(node.parent)
            if parent is None:  # a private parent the caller cannot see: hang it under the tree
                parent = branches.setdefault(node.tree, Tree(escape(node.tree)))
            branches[node.node_id] = parent.add(_label(node))
    for root in roots:
        console.print(root)


@registry_app.command("show")
def show(
    ctx: typer.Context,
    node_id: Annotated[str, typer.Argument(help="node id, e.g. demo/en/medical")],
    db: DbOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one node: attributes, base, versions, variants of its stable version, deployments."""
    from registry.db import open_registry
    from registry.trees import get_node

    with open_registry(db_url(ctx, db)) as reg:
        _known_tenant(reg, tenant)
        detail = get_node(reg, node_id, tenant=tenant, include_private=tenant is None)
    if as_json:
        _echo_json(detail.to_json())
        return
    console, node, base = Console(), detail.node, detail.base
    console.print(_label(node, full=True))
    if node.description:
        console.print(f"  {escape(node.description)}")
    console.print(
        f"  base [bold]{escape(base.model)}[/bold] {base.architecture} {base.parameter_count / 1e6:.1f}M parameters "
        f"({base.weight_dtype}), {base.layers} layers, {base.kv_heads} KV heads x {base.head_dim}, max context "
        f"{base.max_context}, digest {base.digest[:12]}"
    )
    _versions_table(console, detail.versions)
    if detail.variants:
        table = Table(title=f"variants of v{node.stable_version}")
        for col in ("kind", "size", "bytes are", "adapter params", "tokens/s"):
            table.add_column(col)
        for v in detail.variants:
            speed = f"{v.tokens_per_second:.1f} ({v.measured_device})" if v.tokens_per_second else "-"
            table.add_row(
                v.kind,
                format_bytes(v.bytes),
                "estimated" if v.bytes_estimated else "measured",
                f"{v.adapter_parameters:,}",
                speed,
            )
        console.print(table)
    for d in detail.deployments:
        console.print(f"  deployed: trunk {escape(d.trunk)} at {escape(d.endpoint)} ({d.status})")


def _versions_table(console: Console, versions) -> None:
    table = Table(title="versions")
    for col in ("version", "status", "aliases", "parent version", "manifest", "created", "eval"):
        table.add_column(col)
    for v in versions:
        ppl = v.metrics.get("eval_ppl", v.metrics.get("perplexity"))
        score = v.metrics.get("eval_score")
        evaluation = (
            f"score {score:.2f}"
            if isinstance(score, (int, float))
            else (f"ppl {ppl:.2f}" if isinstance(ppl, (int, float)) else "-")
        )
        table.add_row(
            str(v.version),
            v.status,
            ",".join(v.aliases) or "-",
            "-" if v.parent_version is None else str(v.parent_version),
            v.manifest_digest[:12],
            v.created_at.strftime("%Y-%m-%d %H:%M"),
            evaluation,
        )
    console.print(table)


@registry_app.command("versions")
def versions(
    ctx: typer.Context,
    node_id: Annotated[str, typer.Argument(help="node id, e.g. demo/en/medical")],
    db: DbOption = None,
    tenant: TenantOption = None,
    as_json: JsonOption = False,
) -> None:
    """List a node's versions with their status and aliases."""
    from registry.db import open_registry
    from registry.versions import list_versions

    with open_registry(db_url(ctx, db)) as reg:
        _known_tenant(reg, tenant)
        found = list_versions(reg, node_id, tenant=tenant, include_private=tenant is None)
    if as_json:
        _echo_json({"versions": [v.to_json() for v in found]})
        return
    _versions_table(Console(), found)


@registry_app.command("history")
def history(
    ctx: typer.Context,
    node_id: Annotated[str, typer.Argument(help="node id, e.g. demo/en/medical")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A node's forgetting curve: each version's perplexity on its own, its parent's and siblings' texts."""
    from registry.db import open_registry
    from registry.forgetting import history as read_history
    from registry.history_view import history_json, history_table

    with open_registry(db_url(ctx, db)) as reg:
        points = read_history(reg, node_id)
    if as_json:
        _echo_json(history_json(node_id, points))
    elif not points:
        Console().print(f"no perplexities recorded for {escape(node_id)} yet (the update protocol records them)")
    else:
        Console().print(history_table(node_id, points))


@registry_app.command("alias")
def alias(
    ctx: typer.Context,
    node_id: Annotated[str, typer.Argument(help="node id")],
    name: Annotated[str, typer.Argument(help="stable or candidate")],
    version: Annotated[int, typer.Argument(help="version number to point the alias at")],
    db: DbOption = None,
) -> None:
    """Point a node's alias (stable/candidate) at a version, atomically."""
    from registry.db import open_registry
    from registry.versions import set_alias

    with open_registry(db_url(ctx, db)) as reg:
        moved = set_alias(reg, node_id, name, version)
    before = "nowhere" if moved.previous_version is None else f"v{moved.previous_version}"
    Console().print(f"[green]{moved.name}[/green] of {escape(moved.node_id)}: {before} -> v{moved.version}")


@registry_app.command("match")
def match(
    ctx: typer.Context,
    task: Annotated[
        str | None,
        typer.Option("--task", help="node path (en/medical/radiology) or attributes (language=en,domain=medical)"),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or mps")] = "cpu",
    memory: Annotated[str, typer.Option("--memory", help="device memory, e.g. 8GiB, 512MiB, 16GB")] = "8GiB",
    context: Annotated[
        int | None,
        typer.Option(
            "--context",
            help=f"context length in tokens; only an explicit one rules a model out (default: {DEFAULT_CONTEXT}, "
            "or the model's limit when smaller)",
        ),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", help="concurrent sequences")] = 1,
    bandwidth: Annotated[str | None, typer.Option("--bandwidth", help="memory bandwidth, e.g. 50GB/s")] = None,
    compute: Annotated[str | None, typer.Option("--compute", help="compute, e.g. 10TFLOPS")] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="serving dtype (default: float32 on cpu, float16 on cuda/mps)")
    ] = None,
    language: Annotated[str | None, typer.Option("--language", help="task language")] = None,
    domain: Annotated[str | None, typer.Option("--domain", help="task domain")] = None,
    subdomain: Annotated[str | None, typer.Option("--subdomain", help="task sub-domain")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="task tag (repeatable)")] = None,
    tree: Annotated[str | None, typer.Option("--tree", help="only this tree")] = None,
    tenant: TenantOption = None,
    top: Annotated[int, typer.Option("--top", help="how many candidates to show")] = 5,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find the node and variant that best fit a task and a device, with the reasons."""
    from registry.candidates import match as run_match
    from registry.db import open_registry
    from registry.matchtypes import Hardware, MatchRequest, TaskQuery

    tags = tuple(tag or ())
    if task is not None:
        query = TaskQuery.parse(task, tags=tags, tree=tree)
    else:
        query = TaskQuery(language=language, domain=domain, subdomain=subdomain, tags=tags, tree=tree)
    hardware = Hardware(
        device=device.strip().lower(),
        memory=parse_memory_size(memory),
        bandwidth=parse_bandwidth(bandwidth) if bandwidth else None,
        compute=parse_compute(compute) if compute else None,
        dtype=dtype,
    )
    request = MatchRequest(query, hardware, context=context, batch=batch, tenant=tenant, top=top)
    with open_registry(db_url(ctx, db)) as reg:
        result = run_match(reg, request)
    if as_json:
        _echo_json(result.to_json())
        return
    _print_match(Console(), result)


def _print_match(console: Console, result: MatchResult) -> None:
    req = result.request
    console.print(
        f"task [bold]{escape(req.task.describe())}[/bold] on {req.hardware.device} with "
        f"{format_bytes(req.hardware.memory)}, context {req.context or f'up to {DEFAULT_CONTEXT}'}, batch {req.batch}"
    )
    if result.candidates:
        table = Table()
        for col in ("#", "node", "version", "variant", "fit", "memory", "used", "tokens/s", "score"):
            table.add_column(col, justify="right" if col in ("#", "memory", "used", "tokens/s", "score") else "left")
        for i, c in enumerate(result.candidates, 1):
            style = _FIT_STYLE[c.fit]
            speed = f"{c.tokens_per_second:.1f}" if c.tokens_per_second else "-"
            table.add_row(
                str(i),
                escape(c.node_id),
                f"v{c.version}",
                c.variant,
                f"[{style}]{c.fit}[/{style}]",
                format_bytes(c.memory_bytes),
                f"{c.utilisation:.0%}",
                speed,
                f"{c.score:.3f}",
            )
        console.print(table)
        best = result.candidates[0]
        console.print(f"[bold]best: {escape(best.node_id)} v{best.version} {best.variant}[/bold], because:")
        for reason in best.reasons:
            console.print(f"  - {escape(reason)}", highlight=False)
    else:
        console.print("[bold red]nothing fits this device locally[/bold red]")
        for note in result.notes:
            console.print(f"  - {escape(note)}", highlight=False)
    if result.suggestions:
        console.print("[bold]what would work:[/bold]")
        for s in result.suggestions:
            console.print(f"  - {escape(s.message)}", highlight=False)


@tenant_app.command("add")
def tenant_add(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="tenant name, e.g. st-marys")], db: DbOption = None
) -> None:
    """Add a tenant."""
    from registry.access import create_tenant
    from registry.db import open_registry

    with open_registry(db_url(ctx, db)) as reg:
        created = create_tenant(reg, name)
    Console().print(f"[green]added[/green] tenant {escape(created.name)}")


@tenant_app.command("ls")
def tenant_ls(ctx: typer.Context, db: DbOption = None, as_json: JsonOption = False) -> None:
    """List tenants."""
    from registry.access import list_tenants
    from registry.db import open_registry

    with open_registry(db_url(ctx, db)) as reg:
        tenants = list_tenants(reg)
    if as_json:
        _echo_json({"tenants": [{"name": t.name, "created_at": t.created_at.isoformat()} for t in tenants]})
        return
    for t in tenants:
        Console().print(escape(t.name))


@tenant_app.command("limits")
def tenant_limits(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="tenant name")],
    max_running: Annotated[int | None, typer.Option(min=1, help="requests in an engine's batch at once")] = None,
    max_queued: Annotated[int | None, typer.Option(min=1, help="requests waiting in an engine's queue")] = None,
    tokens_per_minute: Annotated[int | None, typer.Option(min=1, help="generated tokens per minute")] = None,
    fine_tuning_jobs: Annotated[int | None, typer.Option(min=1, help="queued and running fine-tuning jobs")] = None,
    stored_files: Annotated[int | None, typer.Option(min=1, help="training files kept")] = None,
    stored_file_bytes: Annotated[str | None, typer.Option(help="bytes of training files kept (e.g. 512MiB)")] = None,
    unset: Annotated[
        list[str] | None, typer.Option("--unset", help="hand this limit back to the servers' own setting (repeat)")
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show or set a tenant's limits. Servers apply them within seconds, over their own
    --tenant-* options and --tenant-limits file; a limit not set here is the server's."""
    from registry.db import open_registry
    from registry.limits import TENANT_LIMIT_FIELDS, get_tenant_limits, set_tenant_limits

    values = {
        "max_running": max_running,
        "max_queued": max_queued,
        "tokens_per_minute": tokens_per_minute,
        "fine_tuning_jobs": fine_tuning_jobs,
        "stored_files": stored_files,
        "stored_file_bytes": parse_memory_size(stored_file_bytes) if stored_file_bytes is not None else None,
    }
    given = {k: v for k, v in values.items() if v is not None}
    cleared = [u.replace("-", "_") for u in unset or []]
    with open_registry(db_url(ctx, db)) as reg:
        if given or cleared:
            record = set_tenant_limits(reg, name, given, clear=cleared)
        else:
            record = get_tenant_limits(reg, name)
    if as_json:
        updated = record.updated_at.isoformat() if record.updated_at is not None else None
        _echo_json({"tenant": record.tenant, "limits": dict(record.limits), "updated_at": updated})
        return
    table = Table(title=f"limits of tenant {escape(record.tenant)}")
    table.add_column("limit")
    table.add_column("value", justify="right")
    for field in TENANT_LIMIT_FIELDS:
        value = record.limits.get(field)
        shown = (
            "[dim]the server's[/dim]"
            if value is None
            else (format_bytes(value) if field == "stored_file_bytes" else f"{value:,}")
        )
        table.add_row(field, shown)
    Console().print(table)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``45m``, ``90s``, ``2w`` -> a timedelta; InvalidInput otherwise."""
    from registry.errors import InvalidInput

    value, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if unit not in _DURATION_UNITS or not value.isdigit() or int(value) <= 0:
        raise InvalidInput(
            f"duration {text!r} must be a positive whole number with a unit s, m, h, d or w (e.g. 30d)",
            field="expires_in",
        )
    return timedelta(seconds=int(value) * _DURATION_UNITS[unit])


@token_app.command("issue")
def token_issue(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="tenant the token acts for")],
    role: Annotated[
        str, typer.Option("--role", help="tenant (its nodes) or operator (also the Admin service)")
    ] = "tenant",
    expires_in: Annotated[
        str | None, typer.Option("--expires-in", help="lifetime, e.g. 30d, 12h, 45m (default: no expiry)")
    ] = None,
    db: DbOption = None,
) -> None:
    """Issue an API token for a tenant. It is printed once and stored only hashed."""
    from registry.access import issue_token
    from registry.db import open_registry

    lifetime = parse_duration(expires_in) if expires_in is not None else None
    with open_registry(db_url(ctx, db)) as reg:
        issued = issue_token(reg, tenant, role=role, expires_in=lifetime)
    typer.echo(issued.token)
    until = f", expires {issued.expires_at:%Y-%m-%d %H:%M} UTC" if issued.expires_at else ""
    Console(stderr=True).print(
        f"[yellow]{issued.role} token {issued.token_id} for tenant {escape(tenant)}{until}: "
        "store it now, it cannot be shown again[/yellow]"
    )


@token_app.command("ls")
def token_ls(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", help="only this tenant's tokens")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List tokens: id, tenant, role, state, dates. Secrets are never stored, so never shown."""
    from registry.access import list_tokens
    from registry.db import open_registry

    with open_registry(db_url(ctx, db)) as reg:
        tokens = list_tokens(reg, tenant)
    now = datetime.now(UTC)
    if as_json:
        _echo_json({"tokens": [t.to_json(now) for t in tokens]})
        return
    table = Table()
    for col in ("token id", "tenant", "role", "state", "created", "expires", "revoked"):
        table.add_column(col)

    def when(value: datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"

    for t in tokens:
        state = t.state(now)
        style = {"active": "green", "expired": "yellow", "revoked": "red"}[state]
        table.add_row(
            t.token_id,
            escape(t.tenant),
            t.role,
            f"[{style}]{state}[/{style}]",
            when(t.created_at),
            when(t.expires_at),
            when(t.revoked_at),
        )
    Console().print(table)


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context,
    token_id: Annotated[str, typer.Argument(help="the token's id (the part after tlm_)")],
    db: DbOption = None,
) -> None:
    """Revoke an API token by its id; running servers refuse it within about half a second."""
    from registry.access import revoke_token
    from registry.db import open_registry

    with open_registry(db_url(ctx, db)) as reg:
        revoke_token(reg, token_id)
    Console().print(f"[green]revoked[/green] token {escape(token_id)}")
