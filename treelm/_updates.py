"""Client side of the signed update protocol: stream a package, sign approvals and rollbacks.

A package is a directory written by ``treelm update make``::

    PKG/envelope.json       DSSE envelope around the manifest (signed by the node's key)
    PKG/files/<name>        the adapter files the manifest signs

Signing happens here, on the caller's machine: the private key never travels. An approval is
an Ed25519 signature over the DSSE PAE of the candidate's envelope (GetStatus returns it; the
manifest digest is checked first, so you sign exactly what the server named); a rollback signs
the canonical rollback statement (hierarchy.updates.statements).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from hierarchy.errors import KeyEncryptedError
from hierarchy.secret_files import exposed_secret_file, read_passphrase
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import PASSPHRASE_ENV, SigningKey
from protos.treelm.v1 import updates_pb2
from treelm._errors import InvalidRequest
from treelm._types import RollbackResult, UpdateStatus

__all__ = [
    "ENVELOPE_FILE",
    "FILES_DIR",
    "approval_signature",
    "load_signing_key",
    "package_chunks",
    "rollback_from_proto",
    "update_status_from_proto",
]

ENVELOPE_FILE = "envelope.json"  # the same layout as cluster.updates.package (a test keeps them equal)
FILES_DIR = "files"
CHUNK_BYTES = 1 << 20  # below the server's gRPC message limit (cluster.service.server.MAX_REQUEST_BYTES, 1.25 MiB)


def package_chunks(package: str | Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[updates_pb2.SubmitChunk]:
    """The Submit stream for a package directory: node + envelope first, then the files in pieces."""
    root = Path(package)
    try:
        envelope = _read_regular(root / ENVELOPE_FILE)
    except OSError as exc:
        raise InvalidRequest(f"{root} is not an update package: {exc.strerror or exc}", field="package") from None
    try:
        node = json.loads(Envelope.from_bytes(envelope).payload)["node"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(
            f"{root / ENVELOPE_FILE} is not a DSSE envelope of a manifest: {exc}", field="envelope"
        ) from None
    files = _package_files(root)

    def chunks() -> Iterator[updates_pb2.SubmitChunk]:
        yield updates_pb2.SubmitChunk(node=str(node), envelope=envelope)
        for file in files:
            name = file.relative_to(root / FILES_DIR).as_posix()
            with _open_regular(file) as fh:
                while piece := fh.read(chunk_bytes):
                    yield updates_pb2.SubmitChunk(file=name, data=piece)

    return chunks()


def _not_regular(path: Path, mode: int) -> InvalidRequest:
    what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    return InvalidRequest(
        f"{path} is {what}: an update package holds regular files only (nothing is sent)", field="package"
    )


def _package_files(root: Path) -> list[Path]:
    """The regular files under PKG/files; InvalidRequest for a link or a special file anywhere in it.

    A link would upload whatever it points to (another file of this machine), so none is followed."""
    top = root / FILES_DIR
    try:
        mode = top.lstat().st_mode
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InvalidRequest(f"cannot read {top}: {exc.strerror or exc}", field="package") from None
    if not stat.S_ISDIR(mode):
        raise _not_regular(top, mode)
    files: list[Path] = []
    for directory, dirs, names in os.walk(top, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(directory) / name
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                files.append(path)
            elif not stat.S_ISDIR(mode):  # os.walk lists a link to a directory among dirs: refused here too
                raise _not_regular(path, mode)
    return sorted(files)


def _open_regular(path: Path) -> BinaryIO:
    """Open without following a link, and check what was opened (it may have changed since the walk)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_regular(path, stat.S_IFLNK) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    return os.fdopen(fd, "rb")


def _read_regular(path: Path) -> bytes:
    with _open_regular(path) as fh:
        return fh.read()


def load_signing_key(key: SigningKey | str | Path, password: bytes | None = None) -> SigningKey:
    """A SigningKey, or one read from a key directory (its private.pem) or a PEM file.

    An encrypted file opens with ``password``, else with $TREELM_KEY_PASSPHRASE; without either it
    is KeyEncryptedError naming the file.
    """
    if isinstance(key, SigningKey):
        return key
    path = Path(key)
    file = path / "private.pem" if path.is_dir() else path
    exposed = exposed_secret_file(file)
    if exposed is not None:
        raise InvalidRequest(exposed, field="key")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read private key {file}: {exc.strerror or exc}", field="key") from None
    try:
        return SigningKey.from_pem(data, password if password is not None else read_passphrase())
    except KeyEncryptedError:
        raise KeyEncryptedError(f"key {file} is encrypted: set {PASSPHRASE_ENV} or pass password=...") from None


def approval_signature(status: UpdateStatus, key: SigningKey) -> bytes:
    """Sign the candidate's envelope (after checking it is the manifest the status names)."""
    if status.kind != "candidate":
        raise InvalidRequest(
            f"update {status.update_id} is a {status.kind}; only candidates are approved", field="update_id"
        )
    envelope = Envelope.from_bytes(status.envelope)
    if hashlib.sha256(envelope.payload).hexdigest() != status.manifest_digest:
        raise InvalidRequest(
            "the envelope does not carry the manifest the status names; refusing to sign", field="envelope"
        )
    return key.sign(envelope.pae())


def update_status_from_proto(msg: updates_pb2.UpdateStatus) -> UpdateStatus:
    return UpdateStatus(
        update_id=msg.update_id,
        kind=msg.kind,
        node=msg.node,
        version=msg.version,
        parent=msg.parent,
        parent_version=msg.parent_version,
        state=msg.state,
        reasons=tuple(msg.reasons),
        approvals=msg.approvals,
        approvals_needed=msg.approvals_needed,
        candidate_id=msg.candidate_id or None,
        figures=dict(msg.figures),
        manifest_digest=msg.manifest_digest,
        envelope=bytes(msg.envelope),
    )


def rollback_from_proto(msg: updates_pb2.RollbackResponse) -> RollbackResult:
    return RollbackResult(
        node=msg.node, alias=msg.alias, version=msg.version, previous_version=msg.previous_version, held=tuple(msg.held)
    )
