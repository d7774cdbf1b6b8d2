"""`treelm pull`: a device pulls its model from a TreeLM server (the SDK does the work: treelm._pull).

    treelm pull en/medical/cardiology --hardware auto --server host:50051 --token tlm_... --out cardiology
    treelm pull demo/en/medical --variant gguf-lora --root-key 3f2a9c...      # a node, a variant
    treelm pull --check cardiology                                           # a newer stable version?
    treelm pull --upgrade cardiology                                         # fetch it, switch atomically

``--server`` defaults to ``$TREELM_SERVER``; the token comes from ``--token-file``, ``--token`` or
``$TREELM_TOKEN``; ``--tls``, ``--ca`` and ``--client-cert``/``--client-key`` reach TLS and
mutual-TLS servers (cluster/cli/connect.py). Root keys are
trusted by fingerprint: ``--root-key`` (repeatable), else the server's are shown once for the user
to confirm (``--yes`` accepts them) and remembered in ``~/.treelm/roots.json`` per server and tree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

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
    from hierarchy.updates.keys import PublicKey

__all__ = ["pull_command"]

ROOTS_FILE = Path("~/.treelm/roots.json")


class _Bar:
    """Bytes and speed per file (rich), for treelm._pull's progress callbacks."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def file_started(self, name: str, total: int, done: int) -> None:
        if name in self.tasks:
            self.progress.update(self.tasks[name], total=total, completed=done)
        else:
            self.tasks[name] = self.progress.add_task(name, total=total, completed=done)

    def advanced(self, name: str, nbytes: int) -> None:
        self.progress.advance(self.tasks[name], nbytes)

    def file_finished(self, name: str) -> None:
        pass


def _remembered(server: str, tree: str) -> list[str]:
    try:
        data = json.loads(ROOTS_FILE.expanduser().read_text())
    except (OSError, ValueError):
        return []
    found = data.get(f"{server}/{tree}", [])
    return [str(f) for f in found] if isinstance(found, list) else []


def _remember(server: str, tree: str, fingerprints: Sequence[str]) -> None:
    file = ROOTS_FILE.expanduser()
    try:
        data = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data[f"{server}/{tree}"] = list(fingerprints)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _confirmer(server: str, assume_yes: bool, err: Console):
    def confirm(tree: str, keys: Sequence[PublicKey]) -> list[str]:
        known = _remembered(server, tree)
        if known:
            return known
        fingerprints = [k.keyid for k in keys]
        err.print(f"[bold]{escape(server)}[/bold] reports root key(s) of tree [bold]{escape(tree)}[/bold]:")
        for fp in fingerprints:
            err.print(f"  {fp}")
        if not assume_yes and not typer.confirm("trust these root keys (compare them with your operator's)?"):
            raise typer.Exit(code=2)
        _remember(server, tree, fingerprints)
        return fingerprints

    return confirm


def pull_command(
    target: Annotated[
        str | None, typer.Argument(help="a node id (demo/en/medical) or a task (en/medical/cardiology)")
    ] = None,
    server: Annotated[str | None, typer.Option("--server", envvar="TREELM_SERVER", help="HOST:PORT")] = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    hardware: Annotated[str, typer.Option(help="auto, or DEVICE:MEMORY such as cpu:2GiB or cuda:24GiB")] = "auto",
    variant: Annotated[
        str | None, typer.Option(help="merged, flat, merged-int8, gguf-lora, ... (default: best fit)")
    ] = None,
    version: Annotated[int, typer.Option(help="a version of the node (default: its stable version)")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="the model directory (default: ./<node>-<variant>)")] = None,
    root_key: Annotated[
        list[str] | None, typer.Option("--root-key", help="fingerprint of a root key to trust (repeatable)")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="trust the server's root keys without asking (once)")] = False,
    force: Annotated[bool, typer.Option("--force", help="pull a variant even if it does not fit the hardware")] = False,
    check: Annotated[
        Path | None, typer.Option("--check", help="a pulled directory: is a newer version stable?")
    ] = None,
    upgrade: Annotated[
        Path | None, typer.Option("--upgrade", help="a pulled directory: fetch the newer version")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Pull a node onto this device: match, signed download (resumable), verify, switch atomically."""
    from treelm._pull import check as check_dir
    from treelm._pull import pull, read_record
    from treelm._pull import upgrade as upgrade_dir

    console, err = Console(), Console(stderr=True)
    if sum(x is not None for x in (target, check, upgrade)) != 1:
        raise typer.BadParameter("give one of TARGET, --check DIR or --upgrade DIR")
    directory = check or upgrade
    if server is None and directory is not None:
        server = read_record(directory).get("server") or None
    if not server:
        raise typer.BadParameter("no server: pass --server HOST:PORT or set TREELM_SERVER")
    remote = Connection.of(
        server, token=token, token_file=token_file, tls=tls, ca=ca, client_cert=client_cert, client_key=client_key
    )
    with remote.client(timeout=None, retries=3) as client:
        if check is not None:
            found = check_dir(client, check)
            if as_json:
                typer.echo(json.dumps(found.to_json(), indent=2))
                return
            if found.repinned:
                console.print(
                    f"[yellow]newer[/yellow]: {escape(found.node)} v{found.stable} is now served over "
                    f"{escape(found.stable_chain)} (you have {escape(found.current_chain)}); {escape(found.note)}"
                )
                console.print(f"  `treelm pull --upgrade {escape(str(check))}` fetches it")
            elif found.newer:
                console.print(
                    f"[yellow]newer[/yellow]: {escape(found.node)} v{found.stable} is stable "
                    f"(you have v{found.current}); {escape(found.note)}"
                )
                console.print(f"  `treelm pull --upgrade {escape(str(check))}` fetches it")
            else:
                console.print(f"[green]up to date[/green]: {escape(found.node)} v{found.current} is the stable version")
            return
        with _Bar(err) as bar:
            if upgrade is not None:
                result: Any = upgrade_dir(client, upgrade, progress=bar)
            else:
                result = pull(
                    client,
                    str(target),
                    out=out,
                    variant=variant,
                    version=version,
                    hardware=hardware,
                    root_keys=root_key or (),
                    force=force,
                    server=server,
                    progress=bar,
                    confirm_roots=_confirmer(server, yes, err),
                )
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    if not hasattr(result, "bytes_total"):
        console.print(f"[green]up to date[/green]: {escape(result.node)} v{result.current} is the stable version")
        return
    moved = result.bytes_transferred / 1e6
    console.print(
        f"[green]pulled[/green] {escape(result.node)} v{result.version} as [bold]{result.variant}[/bold] into "
        f"{escape(str(result.directory))} ({result.bytes_total / 1e6:.1f} MB, {moved:.1f} MB transferred), "
        f"verified: signed by {', '.join(s[:12] for s in result.signers)}"
    )
    if result.upgraded_from is not None:
        console.print(f"  upgraded from v{result.upgraded_from}; {escape(result.stable_note)}")
