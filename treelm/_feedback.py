"""Feedback requests and records on the wire (``treelm.v1.Feedback``), for both clients."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime

from protos.treelm.v1 import feedback_pb2
from treelm._types import Feedback, Retention

__all__ = ["delete_request", "feedback_from_proto", "retention_from_proto", "submit_request"]


def submit_request(
    response_id: str, rating: int, correction: str | None, tags: Iterable[str]
) -> feedback_pb2.SubmitFeedbackRequest:
    request = feedback_pb2.SubmitFeedbackRequest(response_id=response_id, rating=rating, tags=list(tags))
    if correction is not None:
        request.correction = correction
    return request


def delete_request(node: str | None, response_ids: Iterable[str] | None) -> feedback_pb2.DeleteFeedbackRequest:
    return feedback_pb2.DeleteFeedbackRequest(node=node or "", response_ids=list(response_ids or ()))


def feedback_from_proto(msg: feedback_pb2.FeedbackRecord) -> Feedback:
    return Feedback(
        id=msg.id,
        response_id=msg.response_id,
        node=msg.node,
        version=msg.version,
        rating=msg.rating,
        correction=msg.correction if msg.HasField("correction") else None,
        tags=tuple(msg.tags),
        created_at=datetime.fromtimestamp(msg.created_at, UTC),
        used_by=msg.used_by or None,
        prompt=json.loads(msg.prompt) if msg.HasField("prompt") else None,
        answer=msg.answer if msg.HasField("answer") else None,
    )


def retention_from_proto(msg: feedback_pb2.Retention) -> Retention:
    return Retention(node=msg.node, enabled=msg.enabled)
