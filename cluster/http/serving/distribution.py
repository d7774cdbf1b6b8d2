"""TreeLM's own routes (not OpenAI's): the variants end devices pull, as gRPC's Distribution offers
them (the same :class:`~cluster.service.distribution.DistributionCalls`, so the same access
checks, builds, signatures and 404s).

    GET /v1/distribution/trust/{tree}                      root keys (hex) + fingerprints, the delegation
    GET /v1/distribution/offer?node=N[@V]&variant=K        the signed manifest, the files and their URLs
    GET /v1/distribution/files/{key}/{name}?node=N         one file; ``Range: bytes=START-[END]`` -> 206

The envelopes are the DSSE JSON objects gRPC sends as bytes (signatures cover the base64
payload, so a device verifies them as they are). ``files`` in an offer is read from the manifest
for convenience and is not trusted until the manifest verifies.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cluster.errors import BadArgument, RangeNotSatisfiable
from cluster.service.admission import NodeRef
from cluster.service.auth import Caller
from cluster.service.distribution import DistributionCalls, ServedFile
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import PublicKey
from hierarchy.updates.variants import parse_variant_manifest
from protos.treelm.v1 import distribution_pb2

__all__ = ["DistributionServing", "FileSlice", "byte_range"]

PREFIX = "/v1/distribution"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class VariantFile(BaseModel):
    name: str
    size: int
    sha256: str
    url: str  # relative to the server: the download route for this file


class VariantOffer(BaseModel):
    object: str = "treelm.variant_offer"
    node: str
    version: int
    variant: str
    key: str
    files: list[VariantFile]
    manifest: dict[str, Any]  # DSSE envelope of the canonical variant manifest
    delegation: dict[str, Any]  # DSSE envelope of root's delegation of the signing key
    stable_note: str = ""
    requires: VariantOffer | None = None  # the base variant it runs over (flat, gguf-lora)


class RootKey(BaseModel):
    fingerprint: str  # sha256 of the raw key: what ``treelm pull --root-key`` takes
    public_key: str  # the raw Ed25519 key, hex


class TrustBundle(BaseModel):
    object: str = "treelm.trust"
    tree: str
    root_keys: list[RootKey]
    root_threshold: int
    delegation: dict[str, Any]


@dataclass(frozen=True)
class FileSlice:
    """A file answer: 200 with all of it or 206 with one range, streamed."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]


def byte_range(header: str | None, length: int) -> tuple[int, int] | None:
    """``[start, end)`` of one ``bytes=`` range (RFC 9110: ``START-``, ``START-END``, ``-SUFFIX``);
    None without a header; RangeNotSatisfiable (416) for anything else or a range past the end."""
    if header is None:
        return None
    found = _RANGE.match(header.strip())
    if found is None or not (found[1] or found[2]):
        raise RangeNotSatisfiable(header, length)
    if not found[1]:  # the last SUFFIX bytes
        suffix = int(found[2])
        if suffix == 0 or length == 0:
            raise RangeNotSatisfiable(header, length)
        return max(0, length - suffix), length
    start = int(found[1])
    end = min(length, int(found[2]) + 1) if found[2] else length
    if start >= length or end <= start:
        raise RangeNotSatisfiable(header, length)
    return start, end


def _envelope(data: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(data)
    return parsed


def _offer(reply: distribution_pb2.VariantOffer) -> VariantOffer:
    manifest = parse_variant_manifest(Envelope.from_bytes(reply.manifest).payload)
    node = urllib.parse.quote(str(manifest.node), safe="/")
    files = [
        VariantFile(
            name=f.name,
            size=f.length,
            sha256=f.sha256,
            url=f"{PREFIX}/files/{manifest.key}/{urllib.parse.quote(f.name)}?node={node}",
        )
        for f in manifest.files
    ]
    return VariantOffer(
        node=str(manifest.node),
        version=manifest.version,
        variant=manifest.kind,
        key=manifest.key,
        files=files,
        manifest=_envelope(reply.manifest),
        delegation=_envelope(reply.delegation),
        stable_note=reply.stable_note,
        requires=_offer(reply.requires) if reply.HasField("requires") else None,
    )


class DistributionServing:
    def __init__(self, calls: DistributionCalls):
        self._calls = calls

    async def trust(self, tree: str) -> TrustBundle:
        reply = await self._calls.trust(tree)
        keys = [PublicKey(raw) for raw in reply.root_keys]
        return TrustBundle(
            tree=tree,
            root_keys=[RootKey(fingerprint=k.keyid, public_key=k.hex) for k in keys],
            root_threshold=reply.root_threshold,
            delegation=_envelope(reply.delegation),
        )

    async def offer(self, node: str | None, variant: str | None, caller: Caller) -> VariantOffer:
        if not variant:
            raise BadArgument("variant", "is required, e.g. variant=merged (see the README's variant kinds)")
        ref = NodeRef.parse(node, "node")
        return _offer(await self._calls.offer(ref.node, ref.version or 0, variant, caller))

    async def file(self, node: str | None, key: str, name: str, range_header: str | None, caller: Caller) -> FileSlice:
        ref = NodeRef.parse(node, "node")
        if ref.version is not None:
            raise BadArgument("node", "a file is named by the variant's key: give the node without @version")
        file = await self._calls.file(ref.node, key, name, caller)
        entry = file.entry
        wanted = byte_range(range_header, entry.length)
        start, end = wanted or (0, entry.length)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Length": str(end - start),
            "ETag": f'"{entry.sha256}"',  # the signed sha256: a strong validator
        }
        if wanted is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.length}"
        return FileSlice(206 if wanted else 200, headers, self._bytes(file, start, end))

    async def _bytes(self, file: ServedFile, start: int, end: int) -> AsyncIterator[bytes]:
        async with aclosing(self._calls.chunks(file, start, end)) as chunks:  # the file closes with the response
            async for _offset, data in chunks:
                yield data
