"""Variants for end devices over gRPC (``treelm.v1.Distribution``): signed offers, file chunks, trust.

    distributor = Distributor({"demo": tree_dir}, catalog, VariantSigning(key, {"demo": delegation}))
    TreeServer(trunks, catalog, config, distribution=distributor)

* **Offer** resolves the node version the caller asked for (0: the registry's ``stable``), the
  exact chain it is served over (the registry's serving pin, else the tree dir's snapshot),
  builds the variant on first request (``nodes.build.variants``: cached by content key) and
  answers with its canonical manifest signed by the server's variant signing key, root's
  delegation of that key, and the same for the base variant it runs over (flat, gguf-lora).
* **Download** streams one listed file from an offset, in chunks; the device re-hashes.
* **Trust** gives the registry's root public keys and the tree's delegation, for a device to
  confirm by fingerprint once.

The cache of built variants is bounded (``cache_bytes``, default :data:`CACHE_BYTES`, per tree
dir): after each build the least recently offered or downloaded variants are evicted, never the
one just offered nor one being downloaded (``VariantStore.evict``); asked for again, an evicted
variant is rebuilt under the same key.

Private nodes: the node of every call is checked first, so another tenant's private node (and
every variant key of it) answers NOT_FOUND exactly as an unknown node does.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock

from cluster.errors import BadArgument, NodeNotVisible, ServeError
from cluster.service.access import NodeAccess
from cluster.service.auth import Caller, current_caller
from cluster.service.catalog import Catalog
from cluster.updates.keys import load_trust
from hierarchy.errors import HierarchyError
from hierarchy.ids import NodeId
from hierarchy.updates.distribution import parse_delegation, verify_variant
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import PublicKey, SigningKey
from hierarchy.updates.manifest import FileEntry
from hierarchy.updates.trust import Role
from hierarchy.updates.variants import VariantManifest, parse_variant_manifest, sign_variant_manifest
from nodes.build.variants import MANIFEST_FILE, VariantArtifact, VariantStore, canonical_kind
from nodes.errors import ExportError
from nodes.store.versions import ChainLink
from protos.treelm.v1 import distribution_pb2, distribution_pb2_grpc
from registry.updates import current_pins, list_updates

__all__ = [
    "CACHE_BYTES",
    "CHUNK_BYTES",
    "DistributionCalls",
    "DistributionServicer",
    "Distributor",
    "ServedFile",
    "VariantSigning",
]

CHUNK_BYTES = 1 << 20  # one FileChunk: well under the 16 MiB send limit
CACHE_BYTES = 20 << 30  # built variants kept per tree dir: a few nodes' merged, int8 and GGUF forms of a ~1B base
_KEY = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class VariantSigning:
    """The server's online variant signing key and, per tree, root's delegation of it."""

    key: SigningKey
    delegations: Mapping[str, Envelope] = field(default_factory=dict)  # tree -> DSSE envelope

    def delegation(self, tree: str) -> Envelope:
        envelope = self.delegations.get(tree)
        if envelope is None:
            raise ServeError(f"no variant signers' delegation for tree {tree!r}: start the server with one")
        return envelope


@dataclass(frozen=True)
class ServedFile:
    """One listed file of a built variant, as a download reads it."""

    path: Path
    entry: FileEntry
    store: VariantStore
    key: str  # the variant's content key


class Distributor:
    """The domain side of Distribution (synchronous; the servicer runs it in threads)."""

    def __init__(
        self,
        trees: Mapping[str, Path],
        catalog: Catalog,
        signing: VariantSigning,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        cache_bytes: int = CACHE_BYTES,
    ):
        if cache_bytes <= 0:
            raise ServeError(f"the variant cache bound must be more than 0 bytes, got {cache_bytes}")
        self.trees = {name: Path(path) for name, path in trees.items()}
        self.chunk_bytes = chunk_bytes
        self.cache_bytes = cache_bytes
        self.catalog = catalog
        self.signing = signing
        self._signed: dict[str, bytes] = {}  # variant key -> signed manifest envelope (JSON bytes)
        self._lock = Lock()
        for tree in self.trees:
            self.check_delegation(tree)

    def check_delegation(self, tree: str) -> None:
        """The delegation names this server's key for ``tree`` and verifies against the registry's roots."""
        envelope = self.signing.delegation(tree)
        try:
            delegation = parse_delegation(envelope.payload)
            roots, threshold = self.root_keys()
            probe = sign_variant_manifest_probe(tree, self.signing.key)
            verify_variant(probe, envelope, roots, threshold)
        except HierarchyError as exc:
            raise ServeError(f"the variant signers' delegation for tree {tree!r} does not hold: {exc}") from None
        if delegation.tree != tree:
            raise ServeError(f"the delegation is for tree {delegation.tree!r}, not {tree!r}")

    def root_keys(self) -> tuple[list[PublicKey], int]:
        trust = load_trust(self.catalog.registry)
        return [k.public for k in trust.active_keys(Role.ROOT)], trust.threshold(Role.ROOT)

    # -- offers --------------------------------------------------------------------------------
    def store(self, node: str) -> VariantStore:
        tree = NodeId.parse(node).tree
        if tree not in self.trees:
            raise NodeNotVisible(node)
        return VariantStore(self.trees[tree])

    def _chain(self, node_id: str, version: int) -> tuple[ChainLink, ...] | None:
        """The registry's serving pin of ``node_id`` when it is this version (None: the tree dir decides)."""
        pin = current_pins(self.catalog.registry, NodeId.parse(node_id).tree).get(node_id)
        if pin is None or pin.version != version:
            return None
        return tuple(ChainLink.from_dict(x) for x in pin.chain)

    def _version(self, node_id: str, version: int, tenant: str | None) -> int:
        if NodeId.parse(node_id).is_base:
            if version:
                raise BadArgument("version", f"{node_id} is the base: it has no versions")
            return 0
        detail = self.catalog.node(node_id, tenant)
        accepted = [v.version for v in detail.versions if v.status == "accepted"]
        if not version:
            if detail.node.stable_version is None:
                raise BadArgument("version", f"{node_id} has no stable version")
            return detail.node.stable_version
        if version not in accepted:
            raise BadArgument("version", f"{node_id} has no accepted version {version}; accepted: {accepted or 'none'}")
        return version

    def artifact(self, node: str, version: int, variant: str, tenant: str | None) -> VariantArtifact:
        try:
            kind = canonical_kind(variant)
        except ExportError as exc:
            raise BadArgument("variant", str(exc)) from None
        node_id = str(NodeId.parse(node))
        store = self.store(node_id)
        resolved = self._version(node_id, version, tenant)
        try:
            return store.build(node_id, kind, version=resolved or None, chain=self._chain(node_id, resolved))
        except ExportError as exc:
            if kind.needs_adapters and NodeId.parse(node_id).is_base:
                raise BadArgument("variant", str(exc)) from None
            raise

    def signed(self, artifact: VariantArtifact) -> bytes:
        with self._lock:
            found = self._signed.get(artifact.key)
        if found is None:
            found = sign_variant_manifest(artifact.manifest, [self.signing.key]).to_bytes()
            with self._lock:
                self._signed[artifact.key] = found
        return found

    def stable_note(self, node_id: str, version: int) -> str:
        """Which update made this version and who approved it, when an update did."""
        if not version or NodeId.parse(node_id).is_base:
            return ""
        made = [u for u in list_updates(self.catalog.registry, node=node_id) if u.version == version]
        if not made:
            return f"v{version}: built with the tree"
        u = made[-1]
        approvers = ", ".join(a.get("keyid", "")[:12] for a in u.approvals) or "none recorded"
        return f"v{version}: {u.kind} {u.update_id} ({u.state}); approvals by {approvers}"

    def offer(self, node: str, version: int, variant: str, tenant: str | None) -> distribution_pb2.VariantOffer:
        artifact = self.artifact(node, version, variant, tenant)
        tree = artifact.manifest.node.tree
        offer = distribution_pb2.VariantOffer(
            manifest=self.signed(artifact),
            delegation=self.signing.delegation(tree).to_bytes(),
            stable_note=self.stable_note(str(artifact.manifest.node), artifact.manifest.version),
        )
        used = [artifact]
        need = artifact.manifest.requires
        if need is not None:
            base = self.store(need.node).build(need.node, need.kind)
            used.append(base)
            offer.requires.CopyFrom(
                distribution_pb2.VariantOffer(manifest=self.signed(base), delegation=offer.delegation)
            )
        store = self.store(str(artifact.manifest.node))
        for x in used:
            store.touch(x.directory)
        if any(x.built for x in used):
            self.evict(store, keep={x.key for x in used})
        return offer

    def evict(self, store: VariantStore, keep: set[str]) -> None:
        """Bring ``store`` under the cache bound (least recently used first; never ``keep``)."""
        for gone in store.evict(self.cache_bytes, keep):
            with self._lock:
                self._signed.pop(gone.key, None)

    # -- files ---------------------------------------------------------------------------------
    def file(self, node: str, key: str, name: str) -> ServedFile:
        """Where a listed file of variant ``key`` of ``node`` lives, and its manifest entry."""
        node_id = str(NodeId.parse(node))
        if not _KEY.match(key):
            raise BadArgument("key", "must be a variant's 64-character content key")
        store = self.store(node_id)
        found = sorted(store.root.glob(f"*/{key}/{MANIFEST_FILE}")) if store.root.is_dir() else []
        if not found:
            raise NodeNotVisible(node_id)  # never built for anyone: say no more than for an unknown node
        manifest = parse_variant_manifest(found[0].read_bytes())
        if str(manifest.node) != node_id:
            raise NodeNotVisible(node_id)  # another node's variant: the caller asked through the wrong node
        entry = manifest.file(name)
        if entry is None:
            raise BadArgument("file", f"variant {key[:12]}... has no file {name!r}")
        store.touch(found[0].parent)
        return ServedFile(found[0].parent / entry.name, entry, store, key)

    def trust(self, tree: str) -> distribution_pb2.TrustBundle:
        if tree not in self.trees:
            raise NodeNotVisible(tree)
        roots, threshold = self.root_keys()
        return distribution_pb2.TrustBundle(
            root_keys=[k.raw for k in roots],
            root_threshold=threshold,
            delegation=self.signing.delegation(tree).to_bytes(),
        )


def sign_variant_manifest_probe(tree: str, key: SigningKey) -> Envelope:
    """A throw-away manifest of ``tree`` signed by ``key``: does the delegation cover this server's key?"""
    digest = "0" * 64
    probe = VariantManifest(
        key=digest,
        kind="merged",
        node=NodeId.parse(tree),
        version=0,
        chain=(),
        base={"digest": digest, "model": "probe", "hub_id": None},
        files=(FileEntry("probe", digest, 0),),
        load={"probe": ("probe",)},
    )
    return sign_variant_manifest(probe, [key])


class DistributionCalls:
    """What gRPC (:class:`DistributionServicer`) and HTTP (``cluster.http.serving.distribution``) both
    answer: the node's access check first (so a foreign private node is an unknown one), then the
    Distributor in a thread."""

    def __init__(self, distributor: Distributor | None, access: NodeAccess):
        self._distributor = distributor
        self._access = access

    def ready(self) -> Distributor:
        if self._distributor is None:
            raise NotImplementedError("this server has no variant signing key (treelm serve --variant-key ...)")
        return self._distributor

    async def offer(self, node: str, version: int, variant: str, caller: Caller) -> distribution_pb2.VariantOffer:
        distributor = self.ready()
        await self._access.check(node, caller)  # before anything reveals the node
        return await asyncio.to_thread(distributor.offer, node, version, variant, caller.tenant)

    async def file(self, node: str, key: str, name: str, caller: Caller) -> ServedFile:
        distributor = self.ready()
        await self._access.check(node, caller)
        return await asyncio.to_thread(distributor.file, node, key, name)

    async def chunks(self, file: ServedFile, start: int, end: int) -> AsyncGenerator[tuple[int, bytes]]:
        """``(offset, data)`` of the file's bytes ``[start, end)``, a chunk at a time (not evicted meanwhile)."""
        size = self.ready().chunk_bytes
        with file.store.reading(file.key), open(file.path, "rb") as fh:
            fh.seek(start)
            offset = start
            while offset < end:
                data = await asyncio.to_thread(fh.read, min(size, end - offset))
                if not data:
                    break
                yield offset, data
                offset += len(data)

    async def trust(self, tree: str) -> distribution_pb2.TrustBundle:
        return await asyncio.to_thread(self.ready().trust, tree)


class DistributionServicer(distribution_pb2_grpc.DistributionServicer):
    """Translation only (see :class:`DistributionCalls`)."""

    def __init__(self, calls: DistributionCalls):
        self._calls = calls

    async def Offer(self, request, context):
        return await self._calls.offer(request.node, request.version, request.variant, current_caller())

    async def Download(self, request, context) -> AsyncIterator[distribution_pb2.FileChunk]:
        file = await self._calls.file(request.node, request.key, request.file, current_caller())
        length = file.entry.length
        if request.offset > length:
            raise BadArgument("offset", f"{request.offset} is past the end of {request.file} ({length} bytes)")
        end = length if not request.length else min(length, request.offset + request.length)
        async for offset, data in self._calls.chunks(file, request.offset, end):
            yield distribution_pb2.FileChunk(offset=offset, data=data)

    async def Trust(self, request, context):
        return await self._calls.trust(request.tree)
