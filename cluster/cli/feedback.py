"""`treelm feedback`: your tenant's feedback on a server's answers (the SDK over gRPC).

    treelm feedback ls --node demo/en/medical --server host:50051     # newest first; --json for scripts
    treelm feedback export --node demo/en/medical --out feedback.jsonl   # with retained prompts/answers
    treelm feedback delete --node demo/en/medical                      # final; --response-id ID (repeatable)
    treelm feedback retention demo/en/medical --on                     # keep prompts and answers from now

``--server`` defaults to ``$TREELM_SERVER``, else 127.0.0.1:50051; the token comes from
``--token-file``, ``--token`` or ``$TREELM_TOKEN``, with ``--tls``/``--ca``/``--client-cert`` for TLS
servers (cluster/cli/connect.py). A refused call prints the server's reason and exits 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster.cli.connect import (
    CaOption,
    ClientCertOption,
    ClientKeyOption,
    Connection,
    TlsOption,
    TokenFileOption,
    TokenOption,
)

if TYPE_CHECKING:
    import treelm

__all__ = ["feedback_app"]

feedback_app = typer.Typer(
    help="Your tenant's feedback on answers: list, export, delete; retention of prompts per node.",
    no_args_is_help=True,
)

ServerOption = Annotated[
    str | None, typer.Option("--server", help="HOST:PORT of a server (default: $TREELM_SERVER, else 127.0.0.1:50051)")
]
NodeOption = Annotated[str | None, typer.Option("--node", help="one node's records only (default: every node)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _client(server, token, token_file, tls, ca, client_cert, client_key) -> treelm.Client:
    address = server or os.environ.get("TREELM_SERVER") or "127.0.0.1:50051"
    connection = Connection.of(
        address, token=token, token_file=token_file, tls=tls, ca=ca, client_cert=client_cert, client_key=client_key
    )
    return connection.client(timeout=120.0)


def _json(record: treelm.Feedback) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": record.id,
        "response_id": record.response_id,
        "node": record.node,
        "version": record.version,
        "rating": record.rating,
        "correction": record.correction,
        "tags": list(record.tags),
        "created_at": record.created_at.isoformat(),
        "used_by": record.used_by,
    }
    if record.prompt is not None:
        out["prompt"], out["answer"] = record.prompt, record.answer
    return out


@feedback_app.command("ls")
def feedback_ls(
    node: NodeOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="newest records to show")] = 100,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List your tenant's feedback, newest first."""
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        records = client.list_feedback(node, limit=limit)
    if as_json:
        typer.echo(json.dumps({"feedback": [_json(r) for r in records]}, indent=2))
        return
    table = Table(title=f"feedback ({len(records)})")
    for col in ("response", "node", "version", "rating", "correction", "tags", "created", "used by"):
        table.add_column(col, overflow="fold" if col == "correction" else "ellipsis")
    for r in records:
        correction = r.correction if r.correction is None or len(r.correction) <= 60 else r.correction[:57] + "..."
        table.add_row(
            escape(r.response_id),
            escape(r.node),
            str(r.version),
            "+1" if r.rating > 0 else "-1",
            escape(correction or "-"),
            escape(", ".join(r.tags) or "-"),
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            escape(r.used_by or "-"),
        )
    Console().print(table)


@feedback_app.command("export")
def feedback_export(
    node: NodeOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="write JSON Lines here (default: standard output)")] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
) -> None:
    """Export your tenant's feedback as JSON Lines, with the prompts and answers kept under retention."""
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        records = client.export_feedback(node)
    lines = "".join(json.dumps(_json(r), ensure_ascii=False) + "\n" for r in records)
    if out is None:
        typer.echo(lines, nl=False)
        return
    try:
        out.write_text(lines, encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"cannot write {out}: {exc.strerror or exc}") from None
    Console(stderr=True).print(f"{len(records)} records written to {escape(str(out))}")


@feedback_app.command("delete")
def feedback_delete(
    node: NodeOption = None,
    response_id: Annotated[
        list[str] | None, typer.Option("--response-id", help="delete these responses' records only (repeatable)")
    ] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="delete every record of your tenant (without --node or --response-id)")
    ] = False,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete your tenant's records for good: texts and feedback go, the responses take no more feedback."""
    if node is None and not response_id and not everything:
        raise typer.BadParameter("name what to delete: --node, --response-id, or --all for every record")
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        deleted = client.delete_feedback(node, response_id or None)
    if as_json:
        typer.echo(json.dumps({"deleted": deleted}))
    else:
        Console().print(f"deleted the records of {deleted} responses")


@feedback_app.command("retention")
def feedback_retention(
    node: Annotated[str | None, typer.Argument(help="a node (omit: list the nodes with retention on)")] = None,
    switch: Annotated[
        bool | None, typer.Option("--on/--off", help="keep (or stop keeping) prompts and answers of this node")
    ] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show or set whether your prompts and answers on a node are kept (off by default)."""
    if switch is not None and node is None:
        raise typer.BadParameter("--on/--off needs the node")
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        states = [client.set_retention(node, switch)] if node and switch is not None else client.retention(node)
    if as_json:
        typer.echo(json.dumps({"retention": [{"node": s.node, "enabled": s.enabled} for s in states]}))
        return
    table = Table(title="retention of prompts and answers")
    table.add_column("node")
    table.add_column("retention")
    for s in states:
        table.add_row(escape(s.node), "on" if s.enabled else "off")
    Console().print(table)
