"""Feedback calls, shared by gRPC (``treelm.v1.Feedback``) and HTTP (``/v1/feedback``).

Translation only: storage, bounds and the typed refusals are registry/feedback.py's
(ResponseNotFound for an unknown or another tenant's id, FeedbackDeleted after deletion,
InvalidInput naming ``rating``, ``correction``, ``tags`` or ``response_id``). Every call acts on the
caller's tenant only (``""`` when auth is off). A node named in a call must be visible to the
caller: another tenant's private node is refused exactly like an unknown one (NodeNotVisible).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from cluster.errors import BadArgument
from cluster.service.access import NodeAccess
from cluster.service.admission import NodeRef
from cluster.service.auth import Caller, current_caller
from cluster.service.responses import RetentionCache
from protos.treelm.v1 import feedback_pb2, feedback_pb2_grpc
from registry.feedback import FeedbackRecord, add_feedback, delete_feedback, list_feedback, list_retention

__all__ = ["DEFAULT_LIST", "MAX_DELETE_IDS", "MAX_LIST", "FeedbackCalls", "FeedbackServicer", "RetentionState"]

DEFAULT_LIST = 100
MAX_LIST = 10_000
MAX_DELETE_IDS = 1_000  # response ids in one delete call


@dataclass(frozen=True)
class RetentionState:
    node: str
    enabled: bool


class FeedbackCalls:
    """What both transports call (see the module docstring)."""

    def __init__(self, retention: RetentionCache, access: NodeAccess):
        self.registry = retention.registry
        self.retention = retention
        self._access = access

    async def node(self, text: str | None, caller: Caller) -> str | None:
        """The canonical id of a node the caller may see; None when not given."""
        return await self._visible(text, caller) if text else None

    async def _visible(self, text: object, caller: Caller) -> str:
        ref = NodeRef.parse(text, "node")  # BadArgument naming "node" when missing or malformed
        if ref.version is not None:
            raise BadArgument("node", "feedback is kept per node, not per version: leave out '@version'")
        await self._access.check(ref.node, caller)  # another tenant's private node: the unknown node's 404
        return ref.node

    async def submit(
        self, caller: Caller, response_id: str, rating: int, correction: str | None, tags: Sequence[str]
    ) -> FeedbackRecord:
        return await asyncio.to_thread(
            add_feedback, self.registry, caller.tenant, response_id, rating, correction, tuple(tags)
        )

    async def records(
        self, caller: Caller, node: str | None, limit: int | None = None, *, with_text: bool = False
    ) -> tuple[FeedbackRecord, ...]:
        if limit is not None and (isinstance(limit, bool) or not 1 <= limit <= MAX_LIST):
            raise BadArgument("limit", f"must be 1..{MAX_LIST}, got {limit!r}")
        canonical = await self.node(node, caller)
        return await asyncio.to_thread(
            list_feedback, self.registry, caller.tenant, canonical, limit=limit, with_text=with_text
        )

    async def delete(self, caller: Caller, node: str | None, response_ids: Sequence[str] | None) -> int:
        if response_ids is not None and len(response_ids) > MAX_DELETE_IDS:
            raise BadArgument("response_ids", f"at most {MAX_DELETE_IDS} in one call, got {len(response_ids)}")
        canonical = await self.node(node, caller)
        ids = list(response_ids) if response_ids is not None else None
        return await asyncio.to_thread(delete_feedback, self.registry, caller.tenant, canonical, ids)

    async def set_retention(self, caller: Caller, node: str | None, enabled: bool) -> RetentionState:
        canonical = await self._visible(node, caller)
        await asyncio.to_thread(self.retention.set, caller.tenant or "", canonical, bool(enabled))
        return RetentionState(canonical, bool(enabled))

    async def get_retention(self, caller: Caller, node: str | None) -> tuple[RetentionState, ...]:
        """One node's switch, or every node the caller turned retention on for."""
        canonical = await self.node(node, caller)
        if canonical is not None:
            enabled = await asyncio.to_thread(self.retention.enabled, caller.tenant or "", canonical)
            return (RetentionState(canonical, enabled),)
        pairs = await asyncio.to_thread(list_retention, self.registry, caller.tenant or "")
        return tuple(RetentionState(n, True) for _, n in pairs)


def record_to_proto(r: FeedbackRecord) -> feedback_pb2.FeedbackRecord:
    msg = feedback_pb2.FeedbackRecord(
        id=r.id,
        response_id=r.response_id,
        node=r.node,
        version=r.version,
        rating=r.rating,
        tags=list(r.tags),
        created_at=r.created_at.timestamp(),
        used_by=r.used_by or "",
    )
    if r.correction is not None:
        msg.correction = r.correction
    if r.prompt is not None:
        msg.prompt = r.prompt
        msg.answer = r.answer or ""
    return msg


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, calls: FeedbackCalls):
        self._calls = calls

    async def Submit(self, request, context):
        correction = request.correction if request.HasField("correction") else None
        record = await self._calls.submit(
            current_caller(), request.response_id, request.rating, correction, tuple(request.tags)
        )
        return record_to_proto(record)

    async def List(self, request, context):
        records = await self._calls.records(current_caller(), request.node, request.limit or DEFAULT_LIST)
        return feedback_pb2.ListFeedbackResponse(records=[record_to_proto(r) for r in records])

    async def Export(self, request, context) -> AsyncIterator[feedback_pb2.FeedbackRecord]:
        for record in await self._calls.records(current_caller(), request.node, with_text=True):
            yield record_to_proto(record)

    async def Delete(self, request, context):
        ids = list(request.response_ids) or None
        deleted = await self._calls.delete(current_caller(), request.node, ids)
        return feedback_pb2.DeleteFeedbackResponse(deleted=deleted)

    async def SetRetention(self, request, context):
        state = await self._calls.set_retention(current_caller(), request.node, request.enabled)
        return feedback_pb2.Retention(node=state.node, enabled=state.enabled)

    async def GetRetention(self, request, context):
        states = await self._calls.get_retention(current_caller(), request.node)
        return feedback_pb2.RetentionList(
            nodes=[feedback_pb2.Retention(node=s.node, enabled=s.enabled) for s in states]
        )
