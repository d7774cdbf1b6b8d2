"""Update packages on disk and on the wire.

    PKG/envelope.json      the DSSE envelope; its payload is the manifest's canonical bytes (signed)
    PKG/manifest.json      the same bytes, for people to read (must equal the signed payload)
    PKG/files/<name>       the payload files the manifest signs: adapter_config.json, adapter_model.safetensors

Nothing in a package is trusted before ``hierarchy.updates.verify_update`` has run; this module
only reads bytes, bounded in size, and refuses links and names outside ``files/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import PackageError
from hierarchy.errors import InvalidNodePath, ManifestError
from hierarchy.ids import NodeId
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.manifest import FileEntry

__all__ = [
    "ENVELOPE_FILE",
    "FILES_DIR",
    "MANIFEST_FILE",
    "MAX_ENVELOPE_BYTES",
    "Package",
    "read_package",
    "write_package",
]

ENVELOPE_FILE = "envelope.json"
MANIFEST_FILE = "manifest.json"
FILES_DIR = "files"
MAX_ENVELOPE_BYTES = 1 << 20


@dataclass(frozen=True)
class Package:
    """An envelope and the payload files that travel beside it (bytes, unverified)."""

    envelope: Envelope
    files: Mapping[str, bytes] = field(repr=False)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    def node_hint(self) -> str | None:
        """The node the (not yet verified) payload names; only to choose what to load, never trusted."""
        try:
            node = json.loads(self.envelope.payload)["node"]
            return str(NodeId.parse(str(node)))
        except (ValueError, KeyError, TypeError, InvalidNodePath):
            return None


def write_package(out: str | Path, envelope: Envelope, files: Mapping[str, bytes]) -> Path:
    """Write a package directory (all of it or nothing); ``out`` must not exist or be empty."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackageError(f"{out} already exists; choose a new --out directory", field="out")
    for name in files:
        FileEntry.of(name, b"")  # the manifest's own name check: relative, no '..'
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / ENVELOPE_FILE).write_bytes(envelope.to_bytes())
        (tmp / MANIFEST_FILE).write_bytes(envelope.payload)
        for name, data in files.items():
            target = tmp / FILES_DIR / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_package(path: str | Path, max_bytes: int = 256 << 20) -> Package:
    """Read a package directory; PackageError / EnvelopeError / ManifestError when it is malformed."""
    path = Path(path)
    env_file = path / ENVELOPE_FILE
    if not env_file.is_file():
        raise PackageError(f"{path} is not an update package (no {ENVELOPE_FILE}); make one with `treelm update make`")
    if env_file.stat().st_size > MAX_ENVELOPE_BYTES:
        raise PackageError(f"{env_file} is larger than {MAX_ENVELOPE_BYTES} bytes", field="envelope")
    envelope = Envelope.from_bytes(env_file.read_bytes())
    manifest_file = path / MANIFEST_FILE
    if manifest_file.is_file() and manifest_file.read_bytes() != envelope.payload:
        raise ManifestError(f"{manifest_file} differs from the manifest the envelope signs: the package was edited")
    files: dict[str, bytes] = {}
    root = path / FILES_DIR
    total = 0
    if root.is_dir():
        for file in sorted(root.rglob("*")):
            if file.is_symlink():
                raise PackageError(f"{file} is a link; a package holds plain files only", field="files")
            if file.is_dir():
                continue
            total += file.stat().st_size
            if total > max_bytes:
                raise PackageError(f"package is larger than {max_bytes} bytes", field="files")
            files[file.relative_to(root).as_posix()] = file.read_bytes()
    return Package(envelope, files)
