"""`treelm keys delegate-variants`: root's offline statement that a server key may sign variant manifests.

    treelm keys gen --out keys/variants                       # the server's online key
    treelm keys delegate-variants demo --key keys/variants --sign-with keys/root --out variants.dsse
    treelm serve build/demo --variant-key keys/variants --variant-delegation variants.dsse

Devices verify every variant they pull from their root keys down through this delegation
(``hierarchy.updates.distribution``); root keys never sign online.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cluster.cli.passphrase import PasswordEnv, PasswordFile, load_keys, passphrase

__all__ = ["delegate_variants_command"]


def delegate_variants_command(
    tree: Annotated[str, typer.Argument(help="the tree whose variant manifests the keys may sign, e.g. demo")],
    key: Annotated[list[Path], typer.Option("--key", help="key dir or public PEM of a signing key (repeatable)")],
    sign_with: Annotated[list[Path], typer.Option("--sign-with", help="a root key dir or private PEM (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="file for the signed delegation (DSSE envelope JSON)")],
    threshold: Annotated[int, typer.Option(help="how many of the keys must sign one manifest")] = 1,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
) -> None:
    """Delegate, as root, the signing of a tree's variant manifests to online keys."""
    from cluster.updates.keys import load_public_key
    from hierarchy.updates.distribution import SignerDelegation, sign_delegation

    password = passphrase(password_env, password_file)
    if out.exists():
        raise typer.BadParameter(f"{out} exists; choose a new --out (delegations are never overwritten)")
    delegation = SignerDelegation(tree, tuple(load_public_key(k) for k in key), threshold)
    envelope = sign_delegation(delegation, load_keys(sign_with, password))
    out.write_bytes(envelope.to_bytes())
    signers = ", ".join(s.keyid[:12] for s in envelope.signatures)
    Console().print(
        f"[green]wrote[/green] {escape(str(out))}: {len(delegation.keys)} key(s) may sign variant manifests of "
        f"{escape(tree)} ({threshold} at once), signed by {signers}"
    )
