"""The Updates gRPC service: wire messages <-> Coordinator calls, nothing more.

The caller's tenant must be able to see the node (a private node exists only for its owner:
everyone else gets NOT_FOUND, as for a node that does not exist); what an update may do is
decided by its signatures, not by the token. Statuses leave without the names of private
nodes the caller cannot see (cluster/service/redact.py). Submit checks the envelope (keys,
signatures, manifest, expiry, version, declared sizes) on the first chunk and spools the payload
to disk within limits (cluster/service/uploads.py); a refused upload leaves nothing. Errors become status codes in
cluster/service/interceptors.py (update errors: cluster/updates/wire.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from cluster.errors import BadArgument, NodeNotVisible, PackageError, UploadIdle
from cluster.service.access import NodeAccess
from cluster.service.auth import current_caller
from cluster.service.redact import Redactor
from cluster.service.uploads import UploadSpool
from cluster.updates.coordinator import Coordinator
from cluster.updates.package import MAX_ENVELOPE_BYTES, Package
from cluster.updates.status import UpdateStatus
from hierarchy.errors import InvalidNodePath
from hierarchy.ids import NodeId
from hierarchy.updates.envelope import Envelope, Signature
from hierarchy.updates.manifest import UpdateManifest
from protos.treelm.v1 import updates_pb2, updates_pb2_grpc
from registry.errors import UpdateNotFound

__all__ = ["UpdateBackend", "UpdatesServicer", "status_to_proto"]


class UpdateBackend(Protocol):
    """What the servicer calls: a local :class:`Coordinator`, or the Ray desk's proxy
    (cluster.ray.desk.RemoteCoordinator). Blocking calls; the servicer runs them in a thread."""

    policy: Any  # .max_package_bytes bounds a streamed package

    def check_envelope(self, envelope: Envelope) -> UpdateManifest: ...

    def submit(self, package: Any) -> UpdateStatus: ...

    def status(self, update_id: str) -> UpdateStatus: ...

    def approve(self, update_id: str, keyid: str, signature: bytes) -> UpdateStatus: ...

    def rollback(self, node: str, to_version: int, signatures: Sequence[Signature]) -> Any: ...

    def retire_node(self, node: str, force: bool) -> Sequence[str]:
        """Stop serving ``node`` (in-flight requests finish), keep its records; refuse a node with
        children unless ``force`` (then they go too). Returns the retired ids, the node first."""
        ...


def status_to_proto(s: UpdateStatus) -> updates_pb2.UpdateStatus:
    return updates_pb2.UpdateStatus(
        update_id=s.update_id,
        node=s.node,
        version=s.version,
        state=s.state,
        reasons=list(s.reasons),
        approvals=s.approvals,
        approvals_needed=s.approvals_needed,
        kind=s.kind,
        parent=s.parent,
        parent_version=s.parent_version,
        candidate_id=s.candidate_id or "",
        figures=dict(s.figures),
        manifest_digest=s.manifest_digest,
        envelope=s.envelope,
    )


def _node_id(value: str, field: str = "node") -> str:
    try:
        return str(NodeId.parse(value))
    except InvalidNodePath as exc:
        raise BadArgument(field, str(exc)) from None


async def _next_chunk(chunks: AsyncIterator[Any], idle_s: float) -> Any:
    """The next chunk, None at the end; UploadIdle when the client sends nothing for ``idle_s``."""
    try:
        return await asyncio.wait_for(anext(chunks), idle_s)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise UploadIdle(idle_s) from None


_NO_DESK = "the signed update protocol is not served by this server (it runs no update coordinator)"


class UpdatesServicer(updates_pb2_grpc.UpdatesServicer):
    """The Updates service over a local coordinator or the Ray desk; with neither, every call
    answers UNIMPLEMENTED (a server started without the update protocol)."""

    def __init__(
        self,
        coordinator: Coordinator | UpdateBackend | None,
        access: NodeAccess,
        spool: UploadSpool,
        *,
        hidden_nodes: Callable[[str | None, str], Sequence[str]] | None = None,
    ):
        self._backend = coordinator
        self._access = access
        self._spool = spool  # Submit's payload files go here, bounded (cluster/service/uploads.py)
        # (tenant, node id) -> the private nodes of that tree the tenant cannot see; None: redact nothing
        self._hidden_nodes = hidden_nodes

    async def _redacted(self, status: UpdateStatus) -> UpdateStatus:
        """The status without the names of private nodes the caller cannot see (gate checks name every child)."""
        if self._hidden_nodes is None:
            return status
        hidden = await asyncio.to_thread(self._hidden_nodes, current_caller().tenant, status.node)
        return Redactor(hidden).update(status)

    @property
    def _coordinator(self) -> Coordinator | UpdateBackend:
        if self._backend is None:
            raise NotImplementedError(_NO_DESK)
        return self._backend

    async def _visible_status(self, update_id: str) -> UpdateStatus:
        if not update_id:
            raise BadArgument("update_id", "name the update (the id Submit returned)")
        status = await asyncio.to_thread(self._coordinator.status, update_id)
        try:
            await self._access.check(status.node, current_caller())
        except NodeNotVisible:
            raise UpdateNotFound.for_id(update_id) from None  # exactly the answer for a made-up id
        return status

    async def Submit(self, request_iterator, context):
        # Bounded before any payload is taken: the tenant's concurrent uploads (an idle stream holds
        # its slot only until the idle deadline), the envelope's signatures and declared sizes.
        coordinator, limits = self._coordinator, self._spool.limits
        caller = current_caller()
        with self._spool.open(caller.tenant) as upload:
            chunks = aiter(request_iterator)
            first = await _next_chunk(chunks, limits.idle_s)
            if first is None:
                raise BadArgument("node", "the stream was empty: send the envelope, then the payload files")
            if not first.node:
                raise BadArgument("node", "the first chunk must name the node the package updates")
            node = _node_id(first.node)
            await self._access.check(node, caller)
            if not first.envelope:
                raise PackageError("no envelope was sent (the first chunk carries it)", field="envelope")
            if len(first.envelope) > MAX_ENVELOPE_BYTES:
                raise PackageError(f"the envelope is larger than {MAX_ENVELOPE_BYTES} bytes", field="envelope")
            envelope = Envelope.from_bytes(bytes(first.envelope))
            hint = Package(envelope, {}).node_hint()
            if hint is not None and hint != node:
                raise BadArgument("node", f"the chunks name {node} but the package's manifest names {hint}")
            manifest = await asyncio.to_thread(coordinator.check_envelope, envelope)
            upload.expect(manifest, coordinator.policy.max_package_bytes)
            chunk: Any = first
            while chunk is not None:
                if chunk is not first:
                    if chunk.node and chunk.node != first.node:
                        raise PackageError(f"chunks name two nodes: {first.node!r} and {chunk.node!r}", field="node")
                    if chunk.envelope:
                        raise PackageError("the envelope was sent twice", field="envelope")
                if chunk.data or chunk.file:
                    if not chunk.file:
                        raise PackageError("a data chunk must name its file", field="file")
                    upload.write(chunk.file, bytes(chunk.data))
                chunk = await _next_chunk(chunks, limits.idle_s)
            status = await asyncio.to_thread(upload.finish, coordinator.submit, envelope)
        return status_to_proto(await self._redacted(status))

    async def GetStatus(self, request, context):
        return status_to_proto(await self._redacted(await self._visible_status(request.update_id)))

    async def Approve(self, request, context):
        await self._visible_status(request.update_id)
        if not request.key_id or not request.signature:
            raise BadArgument("signature", "an approval needs key_id and signature")
        status = await asyncio.to_thread(
            self._coordinator.approve, request.update_id, request.key_id, bytes(request.signature)
        )
        return status_to_proto(await self._redacted(status))

    async def Rollback(self, request, context):
        node = _node_id(request.node)
        await self._access.check(node, current_caller())
        if request.alias not in ("", "stable"):
            raise BadArgument("alias", f"a rollback moves `stable`, not {request.alias!r}")
        if request.to_version < 1:
            raise BadArgument("to_version", "name the version to go back to (>= 1)")
        signatures = [Signature(s.key_id, bytes(s.signature)) for s in request.signatures]
        result = await asyncio.to_thread(self._coordinator.rollback, node, int(request.to_version), signatures)
        return updates_pb2.RollbackResponse(
            node=result.node,
            alias=result.alias,
            version=result.version,
            previous_version=result.previous_version,
            held=list(result.held),
        )
