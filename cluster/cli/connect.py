"""How the CLI's remote commands reach a server: TLS options, client certificates, the token.

Every command that dials a server (``update submit/status/approve/rollback --server``,
``pull``) takes the same options, so each can reach a TLS or mutual-TLS server. The token is
read from ``--token-file``, else ``--token``, else ``$TREELM_TOKEN``: the file and the
environment keep it out of ``ps`` and shell history, which ``--token`` does not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import treelm

__all__ = [
    "CaOption",
    "ClientCertOption",
    "ClientKeyOption",
    "Connection",
    "TlsOption",
    "TokenFileOption",
    "TokenOption",
]

TokenOption = Annotated[
    str | None,
    typer.Option("--token", help="bearer token (visible in `ps`: prefer --token-file or $TREELM_TOKEN)"),
]
TokenFileOption = Annotated[
    Path | None, typer.Option("--token-file", help="a file holding the bearer token (default: $TREELM_TOKEN)")
]
TlsOption = Annotated[bool, typer.Option("--tls", help="speak TLS, trusting the system's CAs")]
CaOption = Annotated[
    Path | None, typer.Option("--ca", help="PEM CA that signed the server's certificate (implies --tls)")
]
ClientCertOption = Annotated[
    Path | None, typer.Option("--client-cert", help="PEM client certificate, for servers that require one")
]
ClientKeyOption = Annotated[Path | None, typer.Option("--client-key", help="PEM private key of --client-cert")]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Connection:
    """A server address and what it takes to talk to it; ``client()`` opens a :class:`treelm.Client`."""

    server: str
    token: str | None = field(default=None, repr=False)
    ca: bytes | None = field(default=None, repr=False)
    tls: bool = False
    client_cert: bytes | None = field(default=None, repr=False)
    client_key: bytes | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        server: str,
        *,
        token: str | None = None,
        token_file: Path | None = None,
        tls: bool = False,
        ca: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ) -> Connection:
        """Read the options' files now, so a wrong path is a usage error (exit 2) before any call."""
        if token is not None and token_file is not None:
            raise typer.BadParameter("give --token or --token-file, not both")
        if (client_cert is None) != (client_key is None):
            raise typer.BadParameter("a client certificate needs both --client-cert and --client-key")
        if token_file is not None:
            token = _read(token_file, "--token-file").decode("utf-8", "replace").strip()
            if not token or "\n" in token:
                raise typer.BadParameter(f"--token-file {token_file} must hold one token on one line")
        elif token is None:
            token = os.environ.get("TREELM_TOKEN") or None
        return cls(
            server=server,
            token=token,
            ca=_read(ca, "--ca") if ca is not None else None,
            tls=tls,
            client_cert=_read(client_cert, "--client-cert") if client_cert is not None else None,
            client_key=_read(client_key, "--client-key") if client_key is not None else None,
        )

    def client(self, *, timeout: float | None = 600.0, retries: int = 0) -> treelm.Client:
        import treelm

        return treelm.Client(
            self.server,
            token=self.token,
            tls=self.ca if self.ca is not None else (True if self.tls else None),
            client_cert=self.client_cert,
            client_key=self.client_key,
            timeout=timeout,
            retries=retries,
        )
