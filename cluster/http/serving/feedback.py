"""TreeLM's own feedback endpoints (not OpenAI's), over the calls gRPC uses (cluster/service/feedback.py).

    POST   /v1/feedback                {response_id, rating: +1|-1, correction?, tags?} -> the stored record
    GET    /v1/feedback?node=&limit=   the caller's records, newest first
    GET    /v1/feedback/export?node=   JSON Lines, one record a line, with the retained prompt and answer
    DELETE /v1/feedback?node=&response_id=...   delete the caller's records (final) -> {"deleted": n}
    PUT    /v1/feedback/retention      {node, enabled} -> keep prompts and answers of this node's responses
    GET    /v1/feedback/retention?node=   the switch of one node, or the nodes with retention on

Errors take the OpenAI shape from the one table: 404 ``response_not_found`` (an unknown id and
another tenant's alike), 409 ``feedback_deleted``, 400 naming ``rating``, ``correction``, ``tags``,
``response_id``, ``node`` or ``limit``; a node the caller may not see is the unknown node's 404.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from cluster.errors import BadArgument
from cluster.service.auth import Caller
from cluster.service.feedback import DEFAULT_LIST, FeedbackCalls, RetentionState
from registry.feedback import FeedbackRecord

__all__ = [
    "DeleteResult",
    "FeedbackList",
    "FeedbackObject",
    "FeedbackRequest",
    "FeedbackServing",
    "RetentionList",
    "RetentionObject",
    "RetentionRequest",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FeedbackRequest(_Request):
    response_id: str
    rating: int  # +1 or -1 (the registry's check names the field)
    correction: str | None = None
    tags: list[str] = Field(default_factory=list)


class RetentionRequest(_Request):
    node: str
    enabled: bool


class FeedbackObject(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: int
    response_id: str
    node: str
    version: int
    rating: int
    correction: str | None
    tags: list[str]
    created_at: str  # ISO 8601, UTC
    used_by: str | None  # the update made from it


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackObject]


class DeleteResult(BaseModel):
    object: Literal["feedback.deleted"] = "feedback.deleted"
    deleted: int  # responses whose records were deleted


class RetentionObject(BaseModel):
    object: Literal["feedback.retention"] = "feedback.retention"
    node: str
    enabled: bool


class RetentionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RetentionObject]


def _object(r: FeedbackRecord) -> FeedbackObject:
    return FeedbackObject(
        id=r.id,
        response_id=r.response_id,
        node=r.node,
        version=r.version,
        rating=r.rating,
        correction=r.correction,
        tags=list(r.tags),
        created_at=r.created_at.isoformat(),
        used_by=r.used_by,
    )


def _retention(s: RetentionState) -> RetentionObject:
    return RetentionObject(node=s.node, enabled=s.enabled)


def _limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_LIST
    if not text.isdigit():
        raise BadArgument("limit", f"must be a whole number, got {text[:20]!r}")
    return int(text)


class FeedbackServing:
    """Translation between the endpoints' JSON and the shared feedback calls."""

    def __init__(self, calls: FeedbackCalls):
        self.calls = calls

    async def submit(self, body: FeedbackRequest, caller: Caller) -> FeedbackObject:
        record = await self.calls.submit(caller, body.response_id, body.rating, body.correction, body.tags)
        return _object(record)

    async def list_records(self, caller: Caller, node: str | None, limit: str | None) -> FeedbackList:
        records = await self.calls.records(caller, node, _limit(limit))
        return FeedbackList(data=[_object(r) for r in records])

    async def export(self, caller: Caller, node: str | None) -> Response:
        records = await self.calls.records(caller, node, with_text=True)
        lines = "".join(json.dumps(r.as_json(), ensure_ascii=False) + "\n" for r in records)
        return Response(lines, media_type="application/x-ndjson")

    async def delete(self, caller: Caller, node: str | None, response_ids: list[str]) -> DeleteResult:
        deleted = await self.calls.delete(caller, node, response_ids or None)
        return DeleteResult(deleted=deleted)

    async def set_retention(self, body: RetentionRequest, caller: Caller) -> RetentionObject:
        return _retention(await self.calls.set_retention(caller, body.node, body.enabled))

    async def get_retention(self, caller: Caller, node: str | None) -> RetentionList:
        return RetentionList(data=[_retention(s) for s in await self.calls.get_retention(caller, node)])
