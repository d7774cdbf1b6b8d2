"""Files that hold a secret (a private key) must be private to their owner, as ssh demands.

Shared by the server (signing and TLS keys) and the SDK (signing keys), which raise their own
typed errors with the message this returns.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["exposed_secret_file"]


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
