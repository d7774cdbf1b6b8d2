"""Content digests for files and directories (sha256), used everywhere we pin content."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["dir_digest", "file_digests", "sha256_bytes", "sha256_file"]

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(root: str | Path, *, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"sha256": ..., "length": ...}}`` for every file under ``root``."""
    root = Path(root)
    out: dict[str, dict[str, int | str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        out[rel] = {"sha256": sha256_file(path), "length": path.stat().st_size}
    return out


def dir_digest(root: str | Path, *, exclude: tuple[str, ...] = ()) -> str:
    """One sha256 over the sorted (path, file sha256) pairs of a directory."""
    h = hashlib.sha256()
    for rel, info in file_digests(root, exclude=exclude).items():
        h.update(rel.encode())
        h.update(b"\0")
        h.update(str(info["sha256"]).encode())
        h.update(b"\n")
    return h.hexdigest()
