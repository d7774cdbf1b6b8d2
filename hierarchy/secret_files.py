"""Files that hold a secret (a private key) must be private to their owner, as ssh demands.

Shared by the server (signing and TLS keys) and the SDK (signing keys), which raise their own
typed errors with the message this returns; and where both find the passphrase of an encrypted
private key (a file, else an environment variable).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hierarchy.errors import KeyFormatError
from hierarchy.updates.keys import PASSPHRASE_ENV

__all__ = ["exposed_secret_file", "read_passphrase"]


def exposed_secret_file(path: str | Path, what: str = "private key") -> str | None:
    """Why ``path`` may not be used as a secret (group or others may access it), or None when it may.

    A file that does not exist passes: reading it then fails with its own message.
    """
    if os.name != "posix":  # Windows has ACLs, not mode bits
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_IMODE(mode) & 0o077:
        return (
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"make it private with: chmod 600 {path}"
        )
    return None


def read_passphrase(file: str | Path | None = None, env: str | None = None) -> bytes | None:
    """The passphrase of private keys: the first line of ``file`` when given, else the environment
    variable ``env`` (default $TREELM_KEY_PASSPHRASE) when set and not empty, else None.

    A variable named on purpose that is not set, and a passphrase file others may read, unreadable
    or empty, are KeyFormatError (never silently "no passphrase").
    """
    if file is not None:
        exposed = exposed_secret_file(file, "passphrase file")
        if exposed is not None:
            raise KeyFormatError(exposed)
        try:
            text = Path(file).read_bytes()
        except OSError as exc:
            raise KeyFormatError(f"cannot read passphrase file {file}: {exc.strerror or exc}") from None
        line = text.splitlines()[0] if text.strip() else b""
        if not line:
            raise KeyFormatError(f"passphrase file {file} is empty")
        return line
    name = env or PASSPHRASE_ENV
    value = os.environ.get(name)
    if value is None and env is not None:
        raise KeyFormatError(f"environment variable {env} is not set (it should hold the keys' passphrase)")
    return value.encode() if value else None
