"""Variants of any stored node version, built on first request and cached, content-addressed.

    DIR/variants/<kind>/<key>/        one variant: its files, README.md and manifest.json
        manifest.json                  the manifest (hierarchy.updates.variants.VariantManifest, canonical bytes)
    DIR/variants/.locks/<key>.lock    held while one process builds that key

``key`` = sha256 over (builder format, kind, base digest, the chain's links): the same
weights in the same form always land in the same directory, whoever asks, so a variant is
built once; a new version (or a re-pin over another parent version) is a new key. A build
writes into a hidden temp dir and renames it into place when complete, so a directory with a
manifest.json is always whole; a file lock makes concurrent requests for the same key wait
for the one build rather than repeat it.

The cache can be bounded (:meth:`VariantStore.evict`): least recently used first (a variant's
directory mtime, which :meth:`VariantStore.touch` sets on every use, so processes sharing the
tree dir share the order), never a variant that is being built or read (its key's lock is held:
exclusively by a build, shared by :meth:`VariantStore.reading`). An evicted variant is renamed
away whole, then deleted; asked for again, it is rebuilt under the same key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hierarchy.errors import ManifestError
from hierarchy.ids import NodeId
from hierarchy.updates.manifest import FileEntry
from hierarchy.updates.variants import (
    VARIANT_FORMAT,
    VariantLink,
    VariantManifest,
    VariantRequirement,
    parse_variant_manifest,
)
from nodes.build.files import share_permissions
from nodes.build.variants.card import model_card
from nodes.build.variants.kinds import VariantKind, canonical_kind
from nodes.build.variants.source import VariantSource, resolve_source
from nodes.build.variants.writers import write_variant_files
from nodes.errors import ExportError, IntegrityError
from nodes.store.digest import file_digests, sha256_file
from nodes.store.versions import ChainLink

__all__ = [
    "MANIFEST_FILE",
    "VARIANTS_DIR",
    "SilentProgress",
    "VariantArtifact",
    "VariantProgress",
    "VariantStore",
    "variant_key",
    "verify_files",
]

VARIANTS_DIR = "variants"
MANIFEST_FILE = "manifest.json"


class VariantProgress(Protocol):
    """What a front end implements to show variant builds (the CLI draws bars)."""

    def started(self, label: str) -> None: ...

    def advance(self, label: str, what: str, done: int, total: int) -> None: ...

    def finished(self, label: str, artifact: VariantArtifact) -> None: ...


class SilentProgress:
    """A VariantProgress that shows nothing."""

    def started(self, label: str) -> None:
        pass

    def advance(self, label: str, what: str, done: int, total: int) -> None:
        pass

    def finished(self, label: str, artifact: VariantArtifact) -> None:
        pass


def variant_key(source: VariantSource, kind: VariantKind) -> str:
    """The content key of ``kind`` made of ``source``'s weights."""
    payload = {
        "format": VARIANT_FORMAT,
        "kind": kind.name,
        "base": source.tree.base_digest,
        "chain": [x.to_dict() for x in source.links],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_files(directory: Path, manifest: VariantManifest, *, full: bool = True) -> None:
    """Every file the manifest lists is there with its length (and, when ``full``, its sha256)."""
    for entry in manifest.files:
        file = directory / entry.name
        if not file.is_file():
            raise IntegrityError(f"{file} is missing (variant {manifest.kind} of {manifest.node})")
        size = file.stat().st_size
        if size != entry.length:
            raise IntegrityError(f"{file} has {size} bytes, its manifest says {entry.length}")
        if full and (actual := sha256_file(file)) != entry.sha256:
            raise IntegrityError(f"{file} has sha256 {actual[:12]}..., its manifest says {entry.sha256[:12]}...")


@dataclass(frozen=True)
class VariantArtifact:
    """One built variant on disk."""

    kind: VariantKind
    directory: Path
    manifest: VariantManifest
    built: bool = False  # True when this call built it, False when it came from the cache
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest.to_bytes()

    def files(self, role: str) -> list[Path]:
        return [self.directory / name for name in self.manifest.load.get(role, ())]

    def verify(self) -> None:
        verify_files(self.directory, self.manifest)

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "node": str(m.node),
            "version": m.version,
            "variant": m.kind,
            "key": m.key,
            "dir": str(self.directory),
            "bytes": m.size,
            "files": len(m.files),
            "built": self.built,
            "seconds": round(self.seconds, 3),
            "requires": m.requires.to_dict() if m.requires else None,
        }


class VariantStore:
    """The variant cache of one built tree directory (see the module docstring)."""

    def __init__(self, tree_dir: str | Path):
        self.tree_dir = Path(tree_dir).resolve()
        self.root = self.tree_dir / VARIANTS_DIR

    def source(
        self, node: str, *, version: int | None = None, chain: Sequence[ChainLink] | None = None
    ) -> VariantSource:
        return resolve_source(self.tree_dir, node, version=version, chain=chain)

    def directory(self, kind: VariantKind, key: str) -> Path:
        return self.root / kind.name / key

    def cached(self, source: VariantSource, kind: str | VariantKind) -> VariantArtifact | None:
        """The variant when it is already built (files present with their lengths), else None."""
        spec = canonical_kind(kind) if isinstance(kind, str) else kind
        directory = self.directory(spec, variant_key(source, spec))
        file = directory / MANIFEST_FILE
        if not file.is_file():
            return None
        try:
            manifest = parse_variant_manifest(file.read_bytes())
        except (OSError, ManifestError) as exc:
            raise IntegrityError(f"{file} is damaged: {exc}; remove {directory} to rebuild it") from exc
        verify_files(directory, manifest, full=False)
        return VariantArtifact(spec, directory, manifest)

    def build(
        self,
        node: str | VariantSource,
        kind: str | VariantKind,
        *,
        version: int | None = None,
        chain: Sequence[ChainLink] | None = None,
        progress: VariantProgress | None = None,
    ) -> VariantArtifact:
        """The variant ``kind`` of ``node`` at ``version`` (default: as served), built unless cached.

        A kind that runs over the base (flat, gguf-lora) names the base's variant under the
        manifest's ``requires``; :meth:`requirement` builds that one.
        """
        spec = canonical_kind(kind) if isinstance(kind, str) else kind
        source = node if isinstance(node, VariantSource) else self.source(node, version=version, chain=chain)
        if spec.needs_adapters and source.is_base:
            raise ExportError(f"{source.node_id} is the base itself: {spec.name} needs a node with adapters")
        progress = progress or SilentProgress()
        requirement = None
        if spec.requires:  # named by its key; built when a device asks for it (see requirement())
            need = canonical_kind(spec.requires)
            requirement = VariantRequirement(need.name, source.tree.name, variant_key(source.base_source, need))
        found = self.cached(source, spec)
        if found is not None:
            return found
        key = variant_key(source, spec)
        with self._lock(key):
            found = self.cached(source, spec)  # another process may have built it while we waited
            if found is not None:
                return found
            return self._build(source, spec, key, requirement, progress)

    def _build(
        self,
        source: VariantSource,
        kind: VariantKind,
        key: str,
        requirement: VariantRequirement | None,
        progress: VariantProgress,
    ) -> VariantArtifact:
        label = f"{source.describe()} {kind.name}"
        started = time.perf_counter()
        progress.started(label)
        final = self.directory(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=final.parent))
        try:
            load = write_variant_files(
                kind, source, tmp, lambda what, done, total: progress.advance(label, what, done, total)
            )
            need = f"`{requirement.kind}` of {requirement.node}" if requirement else None
            (tmp / "README.md").write_text(model_card(kind, source, load, need))
            load = {**load, "card": ("README.md",)}
            manifest = self._manifest(source, kind, key, tmp, load, requirement)
            (tmp / MANIFEST_FILE).write_bytes(manifest.to_bytes())
            share_permissions(tmp)
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(
                f"cannot write variant {kind.name} of {source.describe()} under {self.root}: {exc}"
            ) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        artifact = VariantArtifact(kind, final, manifest, built=True, seconds=time.perf_counter() - started)
        progress.finished(label, artifact)
        return artifact

    def _manifest(
        self,
        source: VariantSource,
        kind: VariantKind,
        key: str,
        folder: Path,
        load: dict[str, tuple[str, ...]],
        requirement: VariantRequirement | None,
    ) -> VariantManifest:
        tree = source.tree
        node = source.chain[-1] if source.chain else None
        files = [FileEntry(name, str(i["sha256"]), int(i["length"])) for name, i in file_digests(folder).items()]
        metrics = {
            k: v
            for k, v in (node.metrics if node else {}).items()
            if isinstance(v, str) or (isinstance(v, (int, float)) and math.isfinite(v))
        }
        return VariantManifest(
            key=key,
            kind=kind.name,
            node=source.node_id if source.chain else NodeId.parse(tree.name),
            version=source.version,
            chain=tuple(VariantLink(x.path, x.version, x.adapter) for x in source.links),
            base={
                "digest": tree.base_digest,
                "model": tree.base_model or "unknown",
                "hub_id": tree.raw.get("base", {}).get("hub_id"),
            },
            files=tuple(files),
            load=load,
            requires=requirement,
            metrics=metrics,
            builder={"gguf": _version("gguf"), "torch": _version("torch"), "transformers": _version("transformers")},
        )

    def requirement(self, artifact: VariantArtifact, progress: VariantProgress | None = None) -> VariantArtifact | None:
        """The variant ``artifact`` runs over (the base of a flat adapter or of LoRA GGUF files), built if needed."""
        need = artifact.manifest.requires
        if need is None:
            return None
        base = self.build(need.node, need.kind, progress=progress)
        if base.key != need.key:
            raise IntegrityError(
                f"{artifact.directory} needs {need.kind} {need.key[:12]}..., the tree's is {base.key[:12]}..."
            )
        return base

    @contextmanager
    def _lock(self, key: str, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "a+") as fh:
            fcntl.flock(fh, mode)  # LOCK_NB in mode: BlockingIOError when another holder has it
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def reading(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Held while a variant's files are read (served to a device): eviction leaves it alone."""
        return self._lock(key, fcntl.LOCK_SH)

    def touch(self, directory: Path) -> None:
        """Mark the variant in ``directory`` used now (the eviction order is least recently used first)."""
        try:
            os.utime(directory)
        except FileNotFoundError:
            pass  # evicted meanwhile: the next request rebuilds it

    def size(self) -> int:
        """Bytes of every complete variant in the cache (their files as the manifests list them)."""
        return sum(a.manifest.size for a in self.artifacts())

    def evict(self, limit: int, keep: Collection[str] = ()) -> list[VariantArtifact]:
        """Remove least recently used variants until the cache holds at most ``limit`` bytes;
        never those in ``keep`` (content keys) or being built or read. Returns what was removed."""
        found = []
        for artifact in self.artifacts():
            try:
                found.append((artifact.directory.stat().st_mtime_ns, artifact))
            except FileNotFoundError:
                continue  # another process evicted it
        total = sum(a.manifest.size for _, a in found)
        removed: list[VariantArtifact] = []
        for _, artifact in sorted(found, key=lambda x: x[0]):
            if total <= limit:
                break
            if artifact.key in keep:
                continue
            try:
                with self._lock(artifact.key, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    gone = artifact.directory.with_name(f".evicted-{artifact.key}-{os.getpid()}")
                    os.rename(artifact.directory, gone)  # readers see the whole variant or none of it
            except (BlockingIOError, FileNotFoundError):
                continue  # in use, or evicted by another process
            shutil.rmtree(gone, ignore_errors=True)
            total -= artifact.manifest.size
            removed.append(artifact)
        return removed

    def artifacts(self) -> list[VariantArtifact]:
        """Every complete variant in the cache (for listing and cleaning)."""
        out = []
        for file in sorted(self.root.glob(f"*/*/{MANIFEST_FILE}")) if self.root.is_dir() else ():
            if file.parent.name.startswith("."):
                continue  # a build's temp dir, or an evicted variant being deleted
            try:
                kind = canonical_kind(file.parent.parent.name)
                out.append(VariantArtifact(kind, file.parent, parse_variant_manifest(file.read_bytes())))
            except (ExportError, ManifestError, OSError):
                continue
        return out


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
