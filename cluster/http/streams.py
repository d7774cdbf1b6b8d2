"""Answers that outlive their route function: server-sent events of a streamed generation and
the bytes of a variant file. Each finishes its call (in-flight count, metrics) exactly once,
whether it was read to the end, cut short by the client, or never started."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
from starlette.responses import StreamingResponse

from cluster.http.common import EventSource
from cluster.http.errors import error_body
from cluster.http.serving.distribution import FileSlice
from cluster.service.status import wire_status

__all__ = ["FileResponse", "SSEResponse", "StreamCall"]


class _Api(Protocol):
    in_flight: int

    def _observe(self, method: str, model: str, code: grpc.StatusCode, started: float) -> None: ...


class StreamCall:
    """One streamed answer as server-sent events: one ``data:`` line per chunk, ``data: [DONE]``
    last; an error after the response started is sent as an OpenAI error event (the openai client
    raises it). ``finish`` (idempotent) stops the engine streams and books the call, whether the
    events were read to the end, cut short, or never started."""

    def __init__(self, api: _Api, source: EventSource, method: str, model: str, started: float, fields: dict[str, str]):
        self._api, self._source, self._method, self._model = api, source, method, model
        self._started, self._fields = started, fields
        self._code = grpc.StatusCode.CANCELLED  # until the events end on their own
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for event in self._source.events:
                yield b"data: " + event.model_dump_json().encode() + b"\n\n"
            self._code = grpc.StatusCode.OK
        except Exception as exc:
            status = wire_status(exc)
            self._code = status.code
            _http, body = error_body(exc, self._fields, status)
            yield b"data: " + body.model_dump_json().encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            await self._source.close()
        finally:
            self._api.in_flight -= 1
            self._api._observe(self._method, self._model, self._code, self._started)


class SSEResponse(StreamingResponse):
    """A streaming response that always finishes its call (see :class:`StreamCall`)."""

    def __init__(self, call: StreamCall):
        self.call = call
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(call.__aiter__(), media_type="text/event-stream", headers=headers)

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.call.finish()


class FileResponse(StreamingResponse):
    """A variant file (all of it, or one range) that books its call when the last byte is sent or
    the client leaves."""

    def __init__(self, part: FileSlice, finished: Callable[[grpc.StatusCode], None]):
        self._finished = finished
        super().__init__(
            part.chunks, status_code=part.status, headers=part.headers, media_type="application/octet-stream"
        )

    async def stream_response(self, send: Any) -> None:
        code = grpc.StatusCode.CANCELLED
        try:
            await super().stream_response(send)
            code = grpc.StatusCode.OK
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            self._finished(code)
