"""The passphrase of private signing keys, for every command that writes or loads one.

``treelm keys gen`` encrypts the new private key unless told ``--no-encrypt``: the passphrase
comes from ``--password-file FILE``, else the variable ``--password-env VAR`` (default
$TREELM_KEY_PASSPHRASE), else a prompt (twice) when stdin is a terminal; with none of them it
ends with exit 2 and says what to set. Commands that load a key take the same two options; an
encrypted key with no passphrase at hand is asked for on a terminal, else refused with
KeyEncryptedError (exit 2) naming the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hierarchy.errors import KeyEncryptedError, KeyFormatError
from hierarchy.secret_files import read_passphrase
from hierarchy.updates.keys import PASSPHRASE_ENV, SigningKey

__all__ = [
    "NoEncryptOption",
    "PasswordEnv",
    "PasswordFile",
    "load_key",
    "load_keys",
    "new_key_passphrase",
    "passphrase",
]

PasswordEnv = Annotated[
    str | None,
    typer.Option(
        "--password-env",
        help=f"environment variable holding the private keys' passphrase (default: {PASSPHRASE_ENV})",
    ),
]
PasswordFile = Annotated[
    Path | None,
    typer.Option("--password-file", help="a file (mode 0600) whose first line is the private keys' passphrase"),
]
NoEncryptOption = Annotated[
    bool, typer.Option("--no-encrypt", help="write the private key unencrypted (throwaway and test keys)")
]


def passphrase(env: str | None, file: Path | None) -> bytes | None:
    """The passphrase from ``--password-file`` or ``--password-env`` (or $TREELM_KEY_PASSPHRASE), if any."""
    try:
        return read_passphrase(file, env)
    except KeyFormatError as exc:
        raise typer.BadParameter(str(exc), param_hint="--password-file" if file else "--password-env") from None


def _interactive() -> bool:
    return sys.stdin.isatty()


def new_key_passphrase(env: str | None, file: Path | None, no_encrypt: bool) -> bytes | None:
    """What `keys gen` encrypts the new key with; None only with ``--no-encrypt``."""
    if no_encrypt:
        if env or file:
            raise typer.BadParameter("--no-encrypt writes no passphrase: drop --password-env / --password-file")
        return None
    found = passphrase(env, file)
    if found is not None:
        return found
    if _interactive():
        text = typer.prompt("passphrase for the new private key", hide_input=True, confirmation_prompt=True)
        if text:
            return text.encode()
    Console(stderr=True).print(
        f"[bold red]error:[/bold red] private keys are encrypted and there is no passphrase: set {PASSPHRASE_ENV} "
        "(or pass --password-file FILE), or pass --no-encrypt to write the key unencrypted",
        highlight=False,
    )
    raise typer.Exit(2)


def load_key(path: Path, password: bytes | None) -> SigningKey:
    """A private key from a key dir or PEM; an encrypted one without a passphrase is asked for on a terminal."""
    from cluster.updates.keys import load_signing_key

    try:
        return load_signing_key(path, password)
    except KeyEncryptedError:
        if not _interactive():
            raise
    text = typer.prompt(f"passphrase for {path}", hide_input=True)
    return load_signing_key(path, text.encode())


def load_keys(paths: list[Path] | None, password: bytes | None) -> list[SigningKey]:
    return [load_key(p, password) for p in paths or ()]
