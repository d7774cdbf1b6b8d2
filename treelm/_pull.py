"""Pull a node onto a device: choose, download (resumably), verify from the root keys, switch atomically.

    result = pull(client, "en/medical/cardiology", out="cardiology", hardware="cpu:2GiB",
                  root_keys=["3f2a..."])            # the root keys' fingerprints (sha256 of the raw key)
    check(client, "cardiology")                     # a newer stable version? which update, which approvals
    upgrade(client, "cardiology")                   # fetch it; the old directory stays until the new verifies

1. **Choose.** A node id (``demo/en/medical``) is pulled as asked; a task (``en/medical/cardiology``)
   goes to the registry's Match with the hardware profile, and the best downloadable candidate wins.
   A variant that the registry does not list as fitting the hardware is refused unless ``force``.
2. **Verify the offer** (``hierarchy.updates.distribution.verify_variant``): root keys, chosen by
   fingerprint from what the server reports, must have signed the delegation of the server's
   signing key, which must have signed the manifest; the base variant it runs over likewise.
3. **Download** every file the manifest lists into ``OUT.partial/<key>/``: a file grows in
   ``<name>.incomplete`` and resumes from its length, so after an interruption only the missing
   bytes travel; a complete file is re-hashed against the manifest, fetched once more if it
   differs (a corrupted transfer), and refused if it differs again.
4. **Switch.** The directory is assembled next to OUT and renamed into place: OUT is either the old
   directory or the new, verified one, never a mix; ``treelm-pull.json`` records what was pulled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from hierarchy.errors import HierarchyError
from hierarchy.updates.distribution import verify_variant
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import PublicKey
from hierarchy.updates.variants import VariantManifest
from treelm._errors import DiskError, NodeNotFound, PullError, VerificationFailed
from treelm._hardware import DeviceProfile, hardware_profile
from treelm._pulltypes import Offer, PullResult, UpdateCheck

__all__ = ["PULL_RECORD", "ConfirmRoots", "PullProgress", "check", "pull", "read_record", "upgrade"]

PULL_RECORD = "treelm-pull.json"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.dsse.json"
DELEGATION = "delegation.dsse.json"
BASE_DIR = "base"
NOT_DOWNLOADABLE = frozenset({"chain"})  # the served chain itself: pull its flat form instead
_CHUNK = 1 << 20


class PullProgress(Protocol):
    """What a front end implements to show a pull (the CLI draws a bar with bytes and speed)."""

    def file_started(self, name: str, total: int, done: int) -> None: ...

    def advanced(self, name: str, nbytes: int) -> None: ...

    def file_finished(self, name: str) -> None: ...


class _Silent:
    def file_started(self, name: str, total: int, done: int) -> None:
        pass

    def advanced(self, name: str, nbytes: int) -> None:
        pass

    def file_finished(self, name: str) -> None:
        pass


def _is_node(client: Any, target: str) -> bool:
    """Whether ``target`` names a node the caller can see (else it is read as a task)."""
    try:
        client.node(target)
    except (NodeNotFound, ValueError):
        return False
    return True


def _choose(
    client: Any, target: str, variant: str | None, version: int, hardware: DeviceProfile | None, force: bool
) -> tuple[str, str, int]:
    """(node, variant, version) to pull, checked against the registry's fit for the hardware."""
    is_node = _is_node(client, target)
    if hardware is None:
        if not (is_node and variant):
            raise PullError("name a node and a variant, or give a hardware profile so the registry can choose")
        return target, variant, version
    tree, _, task = target.partition("/") if is_node else ("", "", target)
    if is_node and not task:
        if not variant:
            raise PullError(f"{target} is a tree's base: name the variant to pull (--variant)")
        return target, variant, version
    match = client.match(task=task, device=hardware.device, memory=hardware.memory_text, tree=tree or None, top=50)
    fitting = [c for c in match.candidates if c.variant not in NOT_DOWNLOADABLE]
    if is_node:
        fitting = [c for c in fitting if c.node == target]
    if variant:
        fitting = [c for c in fitting if c.variant == variant]
    if fitting:
        return fitting[0].node, fitting[0].variant, version
    if is_node and variant and force:
        return target, variant, version
    wanted = f"{variant} of {target}" if variant else target
    hints = "; ".join(s.message for s in match.suggestions) or "none"
    raise PullError(
        f"{wanted} does not fit {hardware.describe()} by the registry's estimate (what would: {hints})"
        + ("; --force pulls it anyway" if is_node and variant else "")
    )


ConfirmRoots = Callable[[str, Sequence[PublicKey]], Sequence[str]]


def _roots(client: Any, tree: str, fingerprints: Sequence[str], confirm: ConfirmRoots | None = None) -> list[PublicKey]:
    """The server's root keys whose fingerprints the device trusts (given, or confirmed once by ``confirm``)."""
    reported = {PublicKey(raw).keyid: PublicKey(raw) for raw in client.trust(tree).root_keys}
    if not fingerprints and confirm is not None:
        fingerprints = list(confirm(tree, list(reported.values())))
    if not fingerprints:
        raise VerificationFailed(
            "no root key fingerprints to verify against: give --root-key (or confirm the server's)"
        )
    missing = [f for f in fingerprints if not any(k.startswith(f.lower()) for k in reported)]
    if missing:
        raise VerificationFailed(
            f"the server does not hold root key(s) {', '.join(m[:16] for m in missing)}: "
            "it is not the tree you trust, or its root keys were rotated"
        )
    return [k for keyid, k in reported.items() if any(keyid.startswith(f.lower()) for f in fingerprints)]


def _verify(offer: Offer, roots: list[PublicKey], threshold: int) -> tuple[VariantManifest, tuple[str, ...]]:
    try:
        manifest, _, signers = verify_variant(
            Envelope.from_bytes(offer.manifest), Envelope.from_bytes(offer.delegation), roots, threshold
        )
    except HierarchyError as exc:
        raise VerificationFailed(f"the offered manifest does not verify: {exc}") from exc
    return manifest, signers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _disk(exc: OSError, where: Path) -> DiskError:
    if exc.errno == errno.ENOSPC:
        return DiskError(f"the disk holding {where} is full: free space and pull again (it resumes)")
    return DiskError(f"cannot write {where}: {exc.strerror or exc}")


def _download(client: Any, node: str, manifest: VariantManifest, folder: Path, progress: PullProgress) -> int:
    """Every listed file into ``folder``, resuming partial ones; returns the bytes that travelled."""
    moved = 0
    for entry in manifest.files:
        final = folder / entry.name
        if final.is_file() and final.stat().st_size == entry.length and _sha256(final) == entry.sha256:
            continue  # fetched and checked by an earlier, interrupted pull
        partial = folder / (entry.name + ".incomplete")
        for attempt in range(2):
            try:
                partial.parent.mkdir(parents=True, exist_ok=True)
                have = partial.stat().st_size if partial.is_file() else 0
                if have > entry.length:
                    partial.unlink()
                    have = 0
                progress.file_started(entry.name, entry.length, have)
                with open(partial, "ab") as fh:
                    if have < entry.length:
                        for offset, data in client.download(node, manifest.key, entry.name, offset=have):
                            if offset != fh.tell():
                                raise VerificationFailed(f"{entry.name}: a chunk at {offset}, expected {fh.tell()}")
                            fh.write(data)
                            moved += len(data)
                            progress.advanced(entry.name, len(data))
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise _disk(exc, partial) from exc
            progress.file_finished(entry.name)
            size = partial.stat().st_size
            if size == entry.length and _sha256(partial) == entry.sha256:
                os.replace(partial, final)
                break
            partial.unlink()  # a corrupted transfer: fetch the whole file once more
            if attempt:
                raise VerificationFailed(
                    f"{entry.name} of {manifest.node} {manifest.kind} does not match its signed sha256 "
                    f"({size} bytes, expected {entry.length}): the server's copy is damaged or altered; refused"
                )
    return moved


def _write_meta(folder: Path, offer: Offer, manifest: VariantManifest) -> None:
    (folder / MANIFEST).write_bytes(manifest.to_bytes())
    (folder / SIGNATURE).write_bytes(offer.manifest)
    (folder / DELEGATION).write_bytes(offer.delegation)


def read_record(directory: str | Path) -> dict[str, Any]:
    file = Path(directory) / PULL_RECORD
    try:
        record: dict[str, Any] = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise PullError(f"{directory} is not a pulled model directory (no readable {PULL_RECORD}): {exc}") from exc
    return record


def pull(
    client: Any,
    target: str,
    *,
    out: str | Path | None = None,
    variant: str | None = None,
    version: int = 0,
    hardware: DeviceProfile | str | None = "auto",
    root_keys: Sequence[str] = (),
    root_threshold: int | None = None,
    force: bool = False,
    server: str = "",
    progress: PullProgress | None = None,
    confirm_roots: ConfirmRoots | None = None,
) -> PullResult:
    """Pull ``target`` (a node id or a task) into ``out`` (default: ``./<node>-<variant>``; see the module doc).

    ``confirm_roots(tree, keys)``, when no ``root_keys`` are given, returns the fingerprints to trust
    among the root keys the server reports (the CLI asks the user once and remembers the answer).
    """
    progress = progress or _Silent()
    try:
        profile = hardware_profile(hardware) if isinstance(hardware, str) else hardware
    except ValueError as exc:
        raise PullError(str(exc)) from None
    node, kind, version = _choose(client, target, variant, version, profile, force)
    out = Path(out or f"{node.replace('/', '-')}-{kind}").expanduser().resolve()
    offer = client.offer(node, kind, version=version)
    tree = node.split("/", 1)[0]
    roots = _roots(client, tree, root_keys, confirm_roots)
    threshold = root_threshold or len(roots)
    manifest, signers = _verify(offer, roots, threshold)
    if str(manifest.node) != node or (version and manifest.version != version):
        raise VerificationFailed(
            f"asked for {node} v{version or 'stable'}, the signed manifest is {manifest.node} v{manifest.version}"
        )
    base = None
    if manifest.requires is not None:
        if offer.requires is None:
            raise VerificationFailed(
                f"{manifest.kind} runs over {manifest.requires.kind} of the base; none was offered"
            )
        base, _ = _verify(offer.requires, roots, threshold)
        if base.key != manifest.requires.key:
            raise VerificationFailed("the offered base is not the one the signed manifest requires")
    partial = Path(str(out) + ".partial")
    moved = _download(client, node, manifest, partial / manifest.key, progress)
    if base is not None and offer.requires is not None:
        moved += _download(client, str(base.node), base, partial / base.key, progress)
    previous = read_record(out).get("version") if (out / PULL_RECORD).is_file() else None
    record = {
        "format": "treelm-pull/1",
        "server": server,
        "node": node,
        "version": manifest.version,
        "variant": manifest.kind,
        "key": manifest.key,
        "chain": chain_text(manifest),
        "manifest_sha256": hashlib.sha256(manifest.to_bytes()).hexdigest(),
        "signers": list(signers),
        "root_keys": [k.keyid for k in roots],
        "root_threshold": threshold,
        "base": {"variant": base.kind, "key": base.key, "dir": BASE_DIR} if base else None,
        "stable_note": offer.stable_note,
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _switch(out, partial, manifest, offer, base, record)
    return PullResult(
        directory=out,
        node=node,
        version=manifest.version,
        variant=manifest.kind,
        key=manifest.key,
        files=tuple(f.name for f in manifest.files),
        bytes_total=manifest.size + (base.size if base else 0),
        bytes_transferred=moved,
        signers=signers,
        base_dir=out / BASE_DIR if base else None,
        stable_note=offer.stable_note,
        upgraded_from=previous if isinstance(previous, int) and previous != manifest.version else None,
    )


def _switch(
    out: Path,
    partial: Path,
    manifest: VariantManifest,
    offer: Offer,
    base: VariantManifest | None,
    record: dict[str, Any],
) -> None:
    """Assemble the verified files next to ``out`` and rename the result into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise _disk(exc, out) from exc
    old = None
    try:
        for entry in manifest.files:
            (tmp / entry.name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial / manifest.key / entry.name, tmp / entry.name)
        _write_meta(tmp, offer, manifest)
        if base is not None and offer.requires is not None:
            for entry in base.files:
                (tmp / BASE_DIR / entry.name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(partial / base.key / entry.name, tmp / BASE_DIR / entry.name)
            _write_meta(tmp / BASE_DIR, offer.requires, base)
        (tmp / PULL_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous version back
        raise _disk(exc, out) from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)


def check(client: Any, directory: str | Path) -> UpdateCheck:
    """Whether the server has a newer stable version of the pulled node (and why)."""
    record = read_record(directory)
    offer = client.offer(record["node"], record["variant"], version=0)
    roots = _roots(client, record["node"].split("/", 1)[0], record["root_keys"])
    manifest, _ = _verify(offer, roots, int(record.get("root_threshold") or len(roots)))
    return UpdateCheck(
        Path(directory),
        record["node"],
        record["variant"],
        int(record["version"]),
        manifest.version,
        offer.stable_note,
        # A record from before chains were recorded compares by version only.
        current_chain=str(record.get("chain", "")),
        stable_chain=chain_text(manifest),
    )


def chain_text(manifest: VariantManifest) -> str:
    """``en@v1 -> en/medical@v2 -> en/medical/cardiology@v1``: what a variant was made of."""
    return " -> ".join(f"{link.path}@v{link.version}" for link in manifest.chain)


def upgrade(client: Any, directory: str | Path, *, progress: PullProgress | None = None) -> PullResult | UpdateCheck:
    """Pull the newer stable version into ``directory`` (atomically); the check itself when there is none."""
    found = check(client, directory)
    if not found.newer:
        return found
    record = read_record(directory)
    return pull(
        client,
        record["node"],
        out=directory,
        variant=record["variant"],
        hardware=None,
        root_keys=record["root_keys"],
        root_threshold=record.get("root_threshold"),
        server=record.get("server", ""),
        progress=progress,
    )
