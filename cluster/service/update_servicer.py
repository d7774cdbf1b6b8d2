"""The Updates gRPC service: wire messages <-> Coordinator calls, nothing more.

The caller's tenant must be able to see the node (a private node exists only for its owner:
everyone else gets NOT_FOUND, as for a node that does not exist); what an update may do is
decided by its signatures, not by the token. Statuses leave without the names of private
nodes the caller cannot see (cluster/service/redact.py). Errors become status codes in
cluster/service/interceptors.py (update errors: cluster/updates/wire.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cluster.errors import BadArgument, NodeNotVisible
from cluster.service.access import NodeAccess
from cluster.service.auth import current_caller
from cluster.service.redact import Redactor
from cluster.updates.coordinator import Coordinator
from cluster.updates.package import PackageAssembler
from cluster.updates.status import UpdateStatus
from hierarchy.errors import InvalidNodePath
from hierarchy.ids import NodeId
from hierarchy.updates.envelope import Signature
from protos.treelm.v1 import updates_pb2, updates_pb2_grpc
from registry.errors import UpdateNotFound

__all__ = ["UpdateBackend", "UpdatesServicer", "status_to_proto"]


class UpdateBackend(Protocol):
    """What the servicer calls: a local :class:`Coordinator`, or the Ray desk's proxy
    (cluster.ray.desk.RemoteCoordinator). Blocking calls; the servicer runs them in a thread."""

    policy: Any  # .max_package_bytes bounds a streamed package

    def submit(self, package: Any) -> UpdateStatus: ...

    def status(self, update_id: str) -> UpdateStatus: ...

    def approve(self, update_id: str, keyid: str, signature: bytes) -> UpdateStatus: ...

    def rollback(self, node: str, to_version: int, signatures: Sequence[Signature]) -> Any: ...


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


_NO_DESK = "the signed update protocol is not served by this server (it runs no update coordinator)"


class UpdatesServicer(updates_pb2_grpc.UpdatesServicer):
    """The Updates service over a local coordinator or the Ray desk; with neither, every call
    answers UNIMPLEMENTED (a server started without the update protocol)."""

    def __init__(
        self,
        coordinator: Coordinator | UpdateBackend | None,
        access: NodeAccess,
        *,
        hidden_nodes: Callable[[str | None, str], Sequence[str]] | None = None,
    ):
        self._backend = coordinator
        self._access = access
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
        assembler = PackageAssembler(self._coordinator.policy.max_package_bytes)
        node = ""
        async for chunk in request_iterator:
            if not node:  # the first chunk names the node: check access before taking any payload
                if not chunk.node:
                    raise BadArgument("node", "the first chunk must name the node the package updates")
                node = _node_id(chunk.node)
                await self._access.check(node, current_caller())
            assembler.add(node=chunk.node, envelope=chunk.envelope, file=chunk.file, data=chunk.data)
        if not node:
            raise BadArgument("node", "the stream was empty: send the envelope, then the payload files")
        package = assembler.package()
        hint = package.node_hint()
        if hint is not None and hint != node:
            raise BadArgument("node", f"the chunks name {node} but the package's manifest names {hint}")
        status = await asyncio.to_thread(self._coordinator.submit, package)
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
