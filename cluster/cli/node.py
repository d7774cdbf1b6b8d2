"""`treelm node`: grow the tree while it serves (fine-tuning jobs, over the SDK and gRPC).

    treelm node create --parent demo/en/medical --data notes.jsonl --suffix st-marys-oncology
                       [--validation held.jsonl] [--epochs 3] [--lr 0.002] [--rank 8] [--public] [--no-wait] [--json]
    treelm node jobs                     # your tenant's jobs, newest first
    treelm node job ftjob-...            # one job with its events
    treelm node cancel ftjob-...
    treelm node retire demo/en/legal [--force]          # operators: stop serving it, keep its records
    treelm node add oncology.yaml --parent demo/en/medical   # operators: a public node from a spec fragment

``create`` uploads the data (JSON Lines of chat records, or plain text; at most 8 MiB), creates
the job and follows it with a progress bar (step, loss) until the new node is served, then prints
its result: the held-out perplexities of the new node and of its parent, and the timings. A job
that does not beat its parent ends failed: the reason is printed and the exit code is 2.

``--server`` defaults to ``$TREELM_SERVER``, else 127.0.0.1:50051; the token comes from
``--token-file``, ``--token`` or ``$TREELM_TOKEN``, with ``--tls``/``--ca``/``--client-cert`` for TLS
servers (cluster/cli/connect.py). A refused call prints the server's reason and exits 2.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict
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

__all__ = ["node_app", "read_fragment"]

node_app = typer.Typer(
    help="Grow the tree while it serves: fine-tuning jobs that make new nodes; retire nodes.",
    no_args_is_help=True,
)

ServerOption = Annotated[
    str | None, typer.Option("--server", help="HOST:PORT of a server (default: $TREELM_SERVER, else 127.0.0.1:50051)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
NoWaitOption = Annotated[bool, typer.Option("--no-wait", help="print the job and return; follow it with `node job`")]
DataFile = Annotated[Path, typer.Option("--data", exists=True, dir_okay=False, readable=True, help="training file")]

_SUFFIX = re.compile(r"[^a-z0-9_-]+")


def _client(server, token, token_file, tls, ca, client_cert, client_key) -> treelm.Client:
    address = server or os.environ.get("TREELM_SERVER") or "127.0.0.1:50051"
    connection = Connection.of(
        address, token=token, token_file=token_file, tls=tls, ca=ca, client_cert=client_cert, client_key=client_key
    )
    return connection.client(timeout=120.0)


def _when(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def job_json(state: treelm.JobState, events: Iterable[treelm.JobEvent] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": state.id,
        "parent": state.parent,
        "node": state.node,
        "fine_tuned_model": state.fine_tuned_model,
        "status": state.status,
        "visibility": state.visibility,
        "training_file": state.training_file,
        "validation_file": state.validation_file,
        "hyperparameters": dict(state.hyperparameters),
        "result": dict(state.result),
        "error": None if state.error is None else asdict(state.error),
        "cancel_requested": state.cancel_requested,
        "created_at": _when(state.created_at),
        "started_at": _when(state.started_at),
        "finished_at": _when(state.finished_at),
    }
    events = list(events)
    if events:
        out["events"] = [
            {
                "id": e.id,
                "level": e.level,
                "message": e.message,
                "data": dict(e.data),
                "created_at": _when(e.created_at),
            }
            for e in events
        ]
    return out


def _flat(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def result_table(state: treelm.JobState) -> Table:
    """The job's outcome: the new node, both held-out perplexities (and the change), timings."""
    table = Table(title=f"job {escape(state.id)}: {state.status}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("node", escape(state.fine_tuned_model or f"{state.node} (not made)"))
    table.add_row("parent", escape(state.parent))
    result = dict(state.result)
    new, old = result.get("perplexity"), result.get("parent_perplexity")
    if isinstance(new, (int, float)) and isinstance(old, (int, float)) and old:
        table.add_row("held-out perplexity", f"{new:.4g} (parent {old:.4g}, {100 * (new - old) / old:+.1f}%)")
    for key, value in _flat({k: v for k, v in result.items() if k not in ("perplexity", "parent_perplexity")}):
        table.add_row(escape(key), _figure(value))
    if state.error is not None:
        table.add_row("error", f"[red]{escape(state.error.code)}: {escape(state.error.message)}[/red]")
    return table


def _events_table(events: list[treelm.JobEvent]) -> Table:
    table = Table(title=f"events ({len(events)})")
    for col in ("time", "level", "message", "data"):
        table.add_column(col, overflow="fold")
    for e in events:
        data = ", ".join(f"{k}={_figure(v)}" for k, v in e.data.items())
        table.add_row(e.created_at.strftime("%H:%M:%S"), e.level, escape(e.message), data or "-")
    return table


def follow(job: treelm.FineTuneJob, as_json: bool) -> None:
    """Wait for the job with a progress bar fed by its events (on stderr with --json); print the
    result (exit 2 when it made no node)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import treelm

    console = Console(stderr=as_json)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"))
    failed: treelm.JobFailed | None = None
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(f"training {escape(job.node)}", total=None, loss="")

        def on_event(event: treelm.JobEvent) -> None:
            if event.step is not None and event.total_steps:
                loss = f"loss {event.loss:.4f}" if event.loss is not None else ""
                progress.update(task, total=event.total_steps, completed=event.step, loss=loss)
            else:
                style = "red" if event.level == "error" else "dim"
                data = ", ".join(f"{k}={_figure(v)}" for k, v in event.data.items())
                line = escape(event.message) + (f" ({data})" if data else "")
                progress.console.print(f"[{style}]{line}[/{style}]")

        try:
            job.wait(on_event=on_event)
        except treelm.JobFailed as exc:
            failed = exc
    if as_json:
        typer.echo(json.dumps(job_json(job.state), indent=2))
    else:
        Console().print(result_table(job.state))
    if failed is not None:
        Console(stderr=True).print("[bold red]error:[/bold red]", escape(str(failed)), highlight=False)
        raise typer.Exit(2)


def _suffix_of(path: Path) -> str:
    return _SUFFIX.sub("-", path.stem.lower()).strip("-_")[:63] or "node"


def _start(job: treelm.FineTuneJob, no_wait: bool, as_json: bool) -> None:
    if not no_wait:
        follow(job, as_json)
    elif as_json:
        typer.echo(json.dumps(job_json(job.state), indent=2))
    else:
        Console().print(
            f"job {escape(job.id)} queued: it makes {escape(job.node)} (follow it: treelm node job {job.id})"
        )


@node_app.command("create")
def node_create(
    parent: Annotated[str, typer.Option("--parent", help="the node to fine-tune, e.g. demo/en/medical")],
    data: DataFile,
    suffix: Annotated[
        str | None, typer.Option("--suffix", help="the new node's name (default: from the data file's name)")
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option("--validation", exists=True, dir_okay=False, help="held-out file (default: part of --data)"),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="passes over the data")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="learning rate")] = None,
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="LoRA rank")] = None,
    public: Annotated[bool, typer.Option("--public", help="a public node (operator tokens only)")] = False,
    no_wait: NoWaitOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make a node of your own under PARENT from your data; served as soon as it beats its parent."""
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        job = client.customize(
            parent,
            data,
            suffix=suffix or _suffix_of(data),
            validation=validation,
            n_epochs=epochs,
            learning_rate=lr,
            lora_rank=rank,
            public=public,
        )
        _start(job, no_wait, as_json)


@node_app.command("jobs")
def node_jobs(
    limit: Annotated[int, typer.Option("--limit", min=1, max=100, help="newest jobs to show")] = 20,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List your tenant's fine-tuning jobs, newest first."""
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        jobs = client.fine_tuning_jobs(limit=limit)
    if as_json:
        typer.echo(json.dumps({"jobs": [job_json(j.state) for j in jobs]}, indent=2))
        return
    table = Table(title=f"fine-tuning jobs ({len(jobs)})")
    for col in ("job", "node", "status", "created", "held-out perplexity"):
        table.add_column(col)
    for j in jobs:
        new, old = j.result.get("perplexity"), j.result.get("parent_perplexity")
        figure = (
            f"{new:.4g} (parent {old:.4g})" if isinstance(new, (int, float)) and isinstance(old, (int, float)) else "-"
        )
        table.add_row(escape(j.id), escape(j.node), j.status, j.state.created_at.strftime("%Y-%m-%d %H:%M:%S"), figure)
    Console().print(table)


@node_app.command("job")
def node_job(
    job_id: Annotated[str, typer.Argument(help="the job's id (ftjob-...)")],
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one job: its state, result and latest events."""
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        job = client.fine_tuning_job(job_id)
        events = job.events()
    if as_json:
        typer.echo(json.dumps(job_json(job.state, events), indent=2))
        return
    console = Console()
    console.print(result_table(job.state))
    console.print(_events_table(events))


@node_app.command("cancel")
def node_cancel(
    job_id: Annotated[str, typer.Argument(help="the job's id (ftjob-...)")],
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job: a queued one at once, a running one at its next step; nothing is served."""
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        job = client.fine_tuning_job(job_id).cancel()
    if as_json:
        typer.echo(json.dumps(job_json(job.state), indent=2))
    elif job.status == "cancelled":
        Console().print(f"job {escape(job.id)} cancelled")
    else:
        Console().print(f"job {escape(job.id)} is {job.status}: it stops at its next step")


@node_app.command("retire")
def node_retire(
    node: Annotated[str, typer.Argument(help="the node to retire")],
    force: Annotated[bool, typer.Option("--force", help="retire its children too")] = False,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop serving a node (in-flight requests finish) and keep its records; operators only."""
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        retired = client.retire_node(node, force=force)
    if as_json:
        typer.echo(json.dumps({"node": retired.node, "retired": list(retired.retired)}))
    else:
        Console().print(f"retired {escape(', '.join(retired.retired))}")


_FRAGMENT_KEYS = {"name", "suffix", "description", "data", "train", "eval", "lora", "training"}
_TRAINING_KEYS = {"epochs": "n_epochs", "lr": "learning_rate", "batch_size": "batch_size"}


def read_fragment(path: Path) -> dict[str, Any]:
    """A spec fragment (one node of a tree spec) -> customize's arguments; BadParameter naming the key."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(
            f"{path}: expected a mapping like one node of a tree spec (name, data, lora, training)"
        )
    unknown = sorted(set(spec) - _FRAGMENT_KEYS)
    if unknown:
        raise typer.BadParameter(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_FRAGMENT_KEYS))})")
    name = spec.get("suffix", spec.get("name"))
    if not isinstance(name, str) or not name:
        raise typer.BadParameter(f"{path}: 'name' must name the new node (one segment, e.g. st-marys-oncology)")
    data = spec.get("data") or {}
    if not isinstance(data, dict) or set(data) - {"train", "eval"}:
        raise typer.BadParameter(f"{path}: 'data' must be a mapping with 'train' and optionally 'eval'")
    files = {k: data.get(k, spec.get(k)) for k in ("train", "eval")}
    if not isinstance(files["train"], str):
        raise typer.BadParameter(f"{path}: data.train must name the training file")
    paths = {k: (path.parent / v) if isinstance(v, str) else None for k, v in files.items()}
    for key, file in paths.items():
        if file is not None and not file.is_file():
            raise typer.BadParameter(f"{path}: data.{key} {file} is not a file")
    lora, training = spec.get("lora") or {}, spec.get("training") or {}
    if not isinstance(lora, dict) or set(lora) - {"r"}:
        raise typer.BadParameter(f"{path}: 'lora' takes r (the rank) here")
    if not isinstance(training, dict) or set(training) - set(_TRAINING_KEYS):
        raise typer.BadParameter(f"{path}: 'training' takes {', '.join(_TRAINING_KEYS)} here (a job trains in epochs)")
    out: dict[str, Any] = {
        "suffix": name,
        "data": paths["train"],
        "validation": paths["eval"],
        "lora_rank": lora.get("r"),
    }
    out["description"] = spec.get("description")
    out |= {arg: training.get(key) for key, arg in _TRAINING_KEYS.items()}
    return out


@node_app.command("add")
def node_add(
    fragment: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML: one node of a tree spec")],
    parent: Annotated[str, typer.Option("--parent", help="the node it goes under, e.g. demo/en/medical")],
    no_wait: NoWaitOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a public node to the live tree from a spec fragment (operators only), e.g.

    name: oncology / data: {train: onc.txt, eval: onc-eval.txt} / lora: {r: 8} / training: {epochs: 3, lr: 0.002}
    """
    arguments = read_fragment(fragment)
    if arguments.pop("description", None):
        Console(stderr=True).print("note: a job keeps no description; the node is described by its id and data")
    with _client(server, token, token_file, tls, ca, client_cert, client_key) as client:
        job = client.customize(parent, public=True, **arguments)
        _start(job, no_wait, as_json)
