"""Every HTTP error leaves as one shape, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.

The status, ``type`` and ``code`` come from the one table (cluster/service/status.py), exactly as
gRPC's status codes do; this module only renames the engine's field names to the endpoint's
parameters (``max_new_tokens`` -> ``max_tokens``) and turns pydantic's validation errors into
the project's typed errors. 429 and 503 carry ``Retry-After`` (the error's own hint where it has one), 416 ``Content-Range: bytes */LENGTH``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import ValidationError
from starlette.responses import Response

from cluster.errors import BadArgument, MalformedRequest, RangeNotSatisfiable, UnknownParameter
from cluster.http.protocol import UNSUPPORTED, ErrorInfo, ErrorResponse
from cluster.service.status import WireStatus, wire_status

__all__ = ["RETRY_AFTER_S", "error_response", "json_response", "validation_error"]

RETRY_AFTER_S = 1  # what 429 and 503 (draining, replica restarting) suggest when the error names no wait

# Union branch tags in pydantic's error locations ("str", "list[int]", "TextPart"): not fields.
_TAG = re.compile(r"^(str|int|float|bool|none|[A-Z]\w*|.*[\[\]-].*)$")


def json_response(model: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    body = model.model_dump_json() if hasattr(model, "model_dump_json") else str(model)
    return Response(body, status_code=status, headers=dict(headers or {}), media_type="application/json")


def error_body(
    exc: BaseException, fields: Mapping[str, str] | None = None, status: WireStatus | None = None
) -> tuple[int, ErrorResponse]:
    """The HTTP status and OpenAI error body of ``exc`` (``fields``: engine field -> parameter).

    ``status``: ``wire_status(exc)`` when the caller has it already (an internal error is logged,
    with its incident id, once per call of wire_status)."""
    status = status or wire_status(exc)
    param = status.field
    message = status.details
    if param is not None and fields:
        top = param.split(".")[0]
        renamed = fields.get(param) or (fields[top] + param[len(top) :] if top in fields else param)
        if renamed != param and message.startswith(param):
            message = renamed + message[len(param) :]
        param = renamed
    info = ErrorInfo(message=message, type=status.openai_type, param=param, code=status.openai_code)
    return status.http_status, ErrorResponse(error=info)


def error_response(
    exc: BaseException, fields: Mapping[str, str] | None = None, status: WireStatus | None = None
) -> Response:
    status = status or wire_status(exc)
    http_status, body = error_body(exc, fields, status)
    retry = status.retry_after_s if status.retry_after_s is not None else RETRY_AFTER_S
    headers = {"Retry-After": str(retry)} if http_status in (429, 503) else {}
    if isinstance(exc, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{exc.length}"  # RFC 9110: the length a range must fall within
    return json_response(body, http_status, headers)


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TAG.match(part):
            out += f".{part}" if out else part
    return out


def validation_error(exc: ValidationError) -> Exception:
    """A request body that does not fit the schema, as the typed error of its first problem."""
    errors = exc.errors(include_url=False)
    for error in errors:
        if error["type"] == "json_invalid":
            return MalformedRequest(f"the body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}")
    # The likeliest cause first: a value outside a fixed set (a part's "type", a message's "role"),
    # then a field the API does not have, else the deepest error (in a union: the branch that got furthest).
    ranked = [e for e in errors if e["type"] == "literal_error"] + [e for e in errors if e["type"] == "extra_forbidden"]
    first = ranked[0] if ranked else max(errors, key=lambda e: len(e["loc"]))
    param = _param(first["loc"])
    if not param:
        return MalformedRequest("the body must be a JSON object")
    if first["type"] == "extra_forbidden":
        reason = UNSUPPORTED.get(param, "this API has no such parameter")
        return UnknownParameter(param, f"unrecognized request argument ({reason})")
    if first["type"] == "missing":
        return BadArgument(param, "is required")
    branches = [e for e in errors if _param(e["loc"]) == param]
    if len(branches) > 1:  # no branch of a union fits
        got = type(first.get("input")).__name__
        return BadArgument(param, f"has the wrong type ({got}); see the API reference for what it takes")
    return BadArgument(param, first["msg"][:1].lower() + first["msg"][1:])
