"""Update uploads spooled to disk: a streamed package never sits whole in the server's memory.

    spool = UploadSpool(tree_dir / "spool", UploadLimits())
    with spool.open(tenant) as upload:       # UploadRefused beyond the tenant's concurrent uploads
        upload.expect(manifest, max_bytes)   # declared sizes checked and reserved before any payload
        upload.write(name, data)             # each chunk to SPOOL/<pid>-<random>/<name>
        status = upload.finish(submit, envelope)   # the pipeline reads the spooled files
    # on leaving the block, refused or aborted or done, the upload's directory is gone

The manifest (verified from the first chunk) declares every file's length: a byte beyond it, or a
file it does not sign, is refused at once, so what one upload can write is bounded by what its
signers declared, and all uploads in progress together by ``max_spool_bytes``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from cluster.errors import PackageError, ServeError, UploadRefused
from cluster.updates.package import Package
from hierarchy.errors import LengthMismatchError, UnexpectedFileError
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.manifest import UpdateManifest
from registry.errors import InvalidMemorySize
from registry.memory import parse_memory_size

__all__ = ["SpooledFiles", "Upload", "UploadLimits", "UploadSpool", "upload_limits"]

_MIB = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on update uploads (Updates.Submit); `treelm serve --upload-*` and the Ray ingress's
    ``upload_*`` keys set them."""

    max_file_bytes: int = 256 * _MIB  # one payload file, as its signed manifest declares it
    max_spool_bytes: int = 1024 * _MIB  # what all uploads in progress declare together
    per_tenant: int = 2  # concurrent uploads of one tenant (an idle stream counts too)
    idle_s: float = 30.0  # a stream that sends nothing for this long is aborted

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_spool_bytes", "per_tenant"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServeError(f"upload {name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not self.idle_s > 0:
            raise ServeError(f"upload idle timeout must be > 0 seconds, got {self.idle_s!r}")


def upload_limits(max_file: str, spool: str, per_tenant: int, idle_s: float) -> UploadLimits:
    """UploadLimits from the CLI's and cluster.yaml's spelling (sizes like ``256MiB``)."""
    try:
        sizes = parse_memory_size(max_file, field="upload max file"), parse_memory_size(spool, field="upload spool")
    except InvalidMemorySize as exc:
        raise ServeError(str(exc)) from None
    return UploadLimits(max_file_bytes=sizes[0], max_spool_bytes=sizes[1], per_tenant=per_tenant, idle_s=idle_s)


class SpooledFiles(Mapping[str, bytes]):
    """A package's payload files in the spool, read from disk when asked for (one at a time).

    Pickled (to a Ray update desk, perhaps on another machine) it becomes a plain dict of bytes."""

    def __init__(self, paths: Mapping[str, Path]):
        self._paths = dict(paths)

    def __getitem__(self, name: str) -> bytes:
        return self._paths[name].read_bytes()

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self.items()),))


class UploadSpool:
    """The spool directory (0700) and the limits every upload in it shares."""

    def __init__(self, root: str | Path, limits: UploadLimits = UploadLimits()):
        self.root = Path(root)
        self.limits = limits
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._lock = threading.Lock()
        self._tenants: dict[str, int] = {}
        self._reserved = 0
        self._clear_dead()

    def _clear_dead(self) -> None:
        # Uploads of a server that died (a crash leaves its spool behind); other live servers
        # sharing the directory (Ray ingress replicas on one machine) keep theirs.
        for entry in self.root.iterdir():
            pid = entry.name.split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def entries(self) -> list[Path]:
        """This server's uploads in progress (what a refused or finished upload must not leave)."""
        return sorted(p for p in self.root.iterdir() if p.name.startswith(f"{os.getpid()}-"))

    def open(self, tenant: str | None) -> Upload:
        key = tenant or ""
        with self._lock:
            if self._tenants.get(key, 0) >= self.limits.per_tenant:
                raise UploadRefused(
                    f"{self.limits.per_tenant} upload(s) of this tenant are in progress; "
                    "wait for one to finish, then send again"
                )
            self._tenants[key] = self._tenants.get(key, 0) + 1
        try:
            directory = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.root))
        except BaseException:
            self._release(key, 0)
            raise
        return Upload(self, key, directory)

    def _reserve(self, nbytes: int) -> None:
        with self._lock:
            if self._reserved + nbytes > self.limits.max_spool_bytes:
                raise UploadRefused(
                    f"the upload spool is full ({self._reserved} of {self.limits.max_spool_bytes} bytes "
                    f"declared by uploads in progress; this one declares {nbytes}); send it again later"
                )
            self._reserved += nbytes

    def _release(self, tenant: str, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes
            self._tenants[tenant] -= 1
            if not self._tenants[tenant]:
                del self._tenants[tenant]


class Upload:
    """One upload's directory in the spool; a context manager that removes it on leaving."""

    def __init__(self, spool: UploadSpool, tenant: str, directory: Path):
        self._spool = spool
        self._tenant = tenant
        self.directory = directory
        self._declared: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._handles: dict[str, IO[bytes]] = {}
        self._reserved = 0
        self._lock = threading.Lock()
        self._handed_off = False  # the pipeline's thread owns the files now: it removes them when done
        self._removed = False

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()  # unless finish() handed the files to the pipeline: it removes them when done

    def expect(self, manifest: UpdateManifest, max_package_bytes: int) -> None:
        """Check the signed manifest's declared sizes against the limits and reserve them."""
        limits = self._spool.limits
        for entry in manifest.files:
            if entry.length > limits.max_file_bytes:
                raise PackageError(
                    f"payload file {entry.name!r} declares {entry.length} bytes; this server takes at most "
                    f"{limits.max_file_bytes} per file",
                    field="files",
                )
        total = sum(e.length for e in manifest.files)
        if total > max_package_bytes:
            raise PackageError(f"package declares {total} bytes, larger than {max_package_bytes} bytes", field="data")
        self._spool._reserve(total)
        self._reserved = total
        self._declared = {e.name: e.length for e in manifest.files}

    def write(self, name: str, data: bytes) -> None:
        """Append a chunk to ``name``: a file the manifest signs, never past its declared length."""
        if name not in self._declared:
            raise UnexpectedFileError(f"file(s) not signed by the manifest: {name}", files=[name])
        got = self._written.get(name, 0) + len(data)
        if got > self._declared[name]:
            raise LengthMismatchError(
                f"payload file {name!r} has more than the {self._declared[name]} bytes the manifest signs",
                file=name,
                expected=self._declared[name],
                got=got,
            )
        handle = self._handles.get(name)
        if handle is None:
            target = self.directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            handle = self._handles[name] = open(target, "xb")  # noqa: SIM115  (closed in _close_handles)
        handle.write(data)  # a chunk (<= the message limit) into the page cache: shorter than a thread hop
        self._written[name] = got

    def package(self, envelope: Envelope) -> Package:
        self._close_handles()
        return Package(envelope, SpooledFiles({n: self.directory / n for n in self._written}))

    def finish(self, submit: Callable[[Package], T], envelope: Envelope) -> T:
        """Run the pipeline over the spooled files (in a worker thread), then remove them."""
        with self._lock:
            if self._removed:  # the call was cancelled before this thread started
                raise PackageError("the upload was aborted", field="data")
            self._handed_off = True
        try:
            return submit(self.package(envelope))
        finally:
            self._remove(owner=True)

    def _close_handles(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _remove(self, *, owner: bool = False) -> None:
        with self._lock:
            if self._removed or (self._handed_off and not owner):
                return
            self._removed = True
        self._close_handles()
        shutil.rmtree(self.directory, ignore_errors=True)
        self._spool._release(self._tenant, self._reserved)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
