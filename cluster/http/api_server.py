"""The OpenAI-compatible HTTP API: routes wired to the serving classes, and the uvicorn server
that runs them on the gRPC server's event loop (:class:`cluster.service.server.TreeServer`
starts it when ``ServerConfig.http_port`` is set, in ``treelm serve`` and in each Ray ingress
replica alike).

    GET  /v1/models                    the nodes this token may use here
    GET  /v1/models/{id}               one of them (ids contain slashes)
    POST /v1/chat/completions          messages -> the node's chat template -> a completion / SSE
    POST /v1/completions               prompt(s) -> completions; echo + logprobs score text
    GET  /v1/distribution/...          TreeLM's own: variants for end devices (serving_distribution)
    *    /v1/feedback...               TreeLM's own: ratings, corrections, retention (serving_feedback)
    *    /v1/files...                  training files for fine-tuning (serving/files.py)
    *    /v1/fine_tuning/jobs...       fine-tuning jobs: a tenant's new node (serving/fine_tuning.py)

Every request: 503 while the server drains, then the bearer token (401), then the body: read
up to ``max_body_bytes`` (413 beyond, from Content-Length before reading when it is given),
UTF-8 JSON (400), the schema (400 naming the parameter; a body over 64 KiB is decoded and
validated in a worker thread, never on the event loop), then the node (404: unknown and other
tenants' private nodes alike), then the engine's checks (400, 429). The body is parsed here,
not by FastAPI, so that size, encoding and JSON errors get the same error shape as the rest.
``POST /v1/files`` alone takes multipart/form-data, up to the training-file limit plus the
multipart overhead (serving/files.py reads it within that bound).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from cluster.errors import MalformedRequest, RequestTooLarge, ServeError, ShuttingDown
from cluster.http.common import ApiContext
from cluster.http.errors import error_response, json_response, validation_error
from cluster.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    FineTuningJobRequest,
)
from cluster.http.serving.chat import ChatServing
from cluster.http.serving.completion import CompletionServing
from cluster.http.serving.distribution import PREFIX, DistributionServing, FileSlice
from cluster.http.serving.feedback import FeedbackRequest, FeedbackServing, RetentionRequest
from cluster.http.serving.files import FilesServing
from cluster.http.serving.fine_tuning import FineTuningServing
from cluster.http.serving.models import ModelServing
from cluster.http.streams import FileResponse, SSEResponse, StreamCall
from cluster.service.auth import Authenticator, Caller
from cluster.service.catalog import Catalog
from cluster.service.client_certs import http_peer_certificate, peer_aware_protocol
from cluster.service.distribution import DistributionCalls
from cluster.service.feedback import FeedbackCalls
from cluster.service.fine_tuning import FineTuningCalls
from cluster.service.fine_tuning_io import UploadSlots
from cluster.service.interceptors import LOGGED_DETAIL_CHARS
from cluster.service.refusals import PENALIZED_HTTP_STATUSES, RefusalLog, RefusalPenalty
from cluster.service.status import wire_status
from hierarchy.clip import clip

__all__ = ["PARSE_IN_THREAD_BYTES", "HttpApi", "HttpLimits", "HttpServer"]

# A body longer than this is decoded and validated in a worker thread (a 2 MiB body takes ~5 ms).
PARSE_IN_THREAD_BYTES = 64 * 1024

log = logging.getLogger("treelm.http")
refusals = RefusalLog(log)

B = TypeVar("B", bound=BaseModel)

# Hook for metrics: (method, node, code name, seconds), the gRPC interceptor's shape.
CallObserver = Callable[[str, str, str, float], None]


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = (2 << 20) + (64 << 10)  # ServerConfig.max_request_body_bytes


class HttpApi:
    """The FastAPI application over one server's admission, auth and catalog."""

    def __init__(
        self,
        ctx: ApiContext,
        authenticator: Authenticator,
        catalog: Catalog,
        distribution: DistributionCalls,
        feedback: FeedbackCalls,
        *,
        fine_tuning: FineTuningCalls | None = None,
        uploads: UploadSlots | None = None,
        limits: HttpLimits = HttpLimits(),
        observe_call: CallObserver | None = None,
        penalty: RefusalPenalty | None = None,
    ):
        self._auth = authenticator
        self._penalty = penalty
        self.authenticator = authenticator
        self._limits = limits
        self._observe_call = observe_call
        self.chat = ChatServing(ctx)
        self.completions = CompletionServing(ctx)
        self.models = ModelServing(ctx, catalog)
        self.distribution = DistributionServing(distribution)
        self.feedback = FeedbackServing(feedback)
        self.files = FilesServing(fine_tuning, uploads or UploadSlots())
        self.fine_tuning = FineTuningServing(fine_tuning)
        self.draining = False
        self.in_flight = 0  # requests and open streams (one event loop: no lock)
        self.app = self._build()

    # -- wiring ---------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="TreeLM (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown route, wrong method
            code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
            info = ErrorInfo(
                message=f"{request.method} {request.url.path}: {exc.detail}",
                type="invalid_request_error",
                param=None,
                code=code,
            )
            return json_response(ErrorResponse(error=info), exc.status_code, exc.headers)

        @app.get("/v1/models")
        async def list_models(request: Request) -> Response:
            return await self._call(request, "GET /v1/models", None, lambda caller, _: self.models.list(caller))

        @app.get("/v1/models/{model_id:path}")
        async def get_model(request: Request, model_id: str) -> Response:
            return await self._call(
                request, "GET /v1/models/{id}", None, lambda caller, _: self.models.retrieve(model_id, caller)
            )

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._call(request, "POST /v1/chat/completions", ChatCompletionRequest, self._chat(request))

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._call(request, "POST /v1/completions", CompletionRequest, self._completions(request))

        @app.get(PREFIX + "/trust/{tree}")
        async def trust(request: Request, tree: str) -> Response:
            return await self._call(
                request, "GET /v1/distribution/trust", None, lambda _caller, _: self.distribution.trust(tree), {}
            )

        @app.get(PREFIX + "/offer")
        async def offer(request: Request, node: str | None = None, variant: str | None = None) -> Response:
            return await self._call(
                request,
                "GET /v1/distribution/offer",
                None,
                lambda caller, _: self.distribution.offer(node, variant, caller),
                {},
            )

        @app.get(PREFIX + "/files/{key}/{name:path}")
        async def download(request: Request, key: str, name: str, node: str | None = None) -> Response:
            wanted = request.headers.get("range")
            return await self._call(
                request,
                "GET /v1/distribution/files",
                None,
                lambda caller, _: self.distribution.file(node, key, name, wanted, caller),
                {},
            )

        self._feedback_routes(app)
        self._fine_tuning_routes(app)
        return app

    def _feedback_routes(self, app: FastAPI) -> None:
        fb = self.feedback

        @app.post("/v1/feedback")
        async def submit(request: Request) -> Response:
            return await self._call(request, "POST /v1/feedback", FeedbackRequest, lambda c, b: fb.submit(b, c), {})

        @app.get("/v1/feedback")
        async def list_feedback(request: Request, node: str | None = None, limit: str | None = None) -> Response:
            return await self._call(request, "GET /v1/feedback", None, lambda c, _: fb.list_records(c, node, limit), {})

        @app.get("/v1/feedback/export")
        async def export(request: Request, node: str | None = None) -> Response:
            return await self._call(request, "GET /v1/feedback/export", None, lambda c, _: fb.export(c, node), {})

        @app.delete("/v1/feedback")
        async def delete(request: Request, node: str | None = None) -> Response:
            ids = request.query_params.getlist("response_id")
            return await self._call(request, "DELETE /v1/feedback", None, lambda c, _: fb.delete(c, node, ids), {})

        @app.put("/v1/feedback/retention")
        async def set_retention(request: Request) -> Response:
            run = lambda c, b: fb.set_retention(b, c)  # noqa: E731
            return await self._call(request, "PUT /v1/feedback/retention", RetentionRequest, run, {})

        @app.get("/v1/feedback/retention")
        async def get_retention(request: Request, node: str | None = None) -> Response:
            run = lambda c, _: fb.get_retention(c, node)  # noqa: E731
            return await self._call(request, "GET /v1/feedback/retention", None, run, {})

    def _fine_tuning_routes(self, app: FastAPI) -> None:
        files, jobs = self.files, self.fine_tuning
        jobs_path = "/v1/fine_tuning/jobs"

        @app.post("/v1/files")
        async def upload(request: Request) -> Response:
            return await self._call(request, "POST /v1/files", None, lambda c, _: files.upload(request, c), {})

        @app.get("/v1/files")
        async def list_files(
            request: Request, purpose: str | None = None, limit: str | None = None, after: str | None = None
        ) -> Response:
            run = lambda c, _: files.list_files(c, purpose, limit, after)  # noqa: E731
            return await self._call(request, "GET /v1/files", None, run, {})

        @app.get("/v1/files/{file_id}")
        async def get_file(request: Request, file_id: str) -> Response:
            return await self._call(request, "GET /v1/files/{id}", None, lambda c, _: files.retrieve(c, file_id), {})

        @app.delete("/v1/files/{file_id}")
        async def delete_file(request: Request, file_id: str) -> Response:
            return await self._call(request, "DELETE /v1/files/{id}", None, lambda c, _: files.delete(c, file_id), {})

        @app.post(jobs_path)
        async def create_job(request: Request) -> Response:
            return await self._call(
                request, f"POST {jobs_path}", FineTuningJobRequest, lambda c, b: jobs.create(b, c), {}
            )

        @app.get(jobs_path)
        async def list_jobs(request: Request, limit: str | None = None, after: str | None = None) -> Response:
            return await self._call(request, f"GET {jobs_path}", None, lambda c, _: jobs.list_jobs(c, limit, after), {})

        @app.get(jobs_path + "/{job_id}")
        async def get_job(request: Request, job_id: str) -> Response:
            return await self._call(request, f"GET {jobs_path}/{{id}}", None, lambda c, _: jobs.retrieve(c, job_id), {})

        @app.get(jobs_path + "/{job_id}/events")
        async def job_events(
            request: Request, job_id: str, limit: str | None = None, after: str | None = None
        ) -> Response:
            run = lambda c, _: jobs.events(c, job_id, limit, after)  # noqa: E731
            return await self._call(request, f"GET {jobs_path}/{{id}}/events", None, run, {})

        @app.post(jobs_path + "/{job_id}/cancel")
        async def cancel_job(request: Request, job_id: str) -> Response:
            return await self._call(
                request, f"POST {jobs_path}/{{id}}/cancel", None, lambda c, _: jobs.cancel(c, job_id), {}
            )

    def _chat(self, request: Request):
        return lambda caller, body: self.chat.create(body, caller, request)

    def _completions(self, request: Request):
        return lambda caller, body: self.completions.create(body, caller, request)

    # -- one call -------------------------------------------------------------------------------
    async def _call(
        self,
        request: Request,
        method: str,
        schema: type[B] | None,
        run: Callable[..., Any],
        fields: dict[str, str] | None = None,  # error field -> parameter (default: the schema's)
    ) -> Response:
        started = time.perf_counter()
        self.in_flight += 1
        body: Any = None
        caller: Caller | None = None
        streaming = False
        code = grpc.StatusCode.OK
        fixed = fields is not None
        fields = fields if fields is not None else self._fields(schema, None)
        try:
            if self.draining:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            caller = await self._caller(request)
            if schema is not None:
                body = await self._body(request, schema)
                fields = fields if fixed else self._fields(schema, body)
            answer = await run(caller, body)
            if answer is None:  # the client went away
                code = grpc.StatusCode.CANCELLED
                return Response(status_code=499)
            if isinstance(answer, BaseModel):
                return json_response(answer)
            if isinstance(answer, Response):  # a whole answer of another type (a feedback export)
                return answer
            streaming = True
            if isinstance(answer, FileSlice):
                return FileResponse(answer, lambda code: self._finished(method, started, code))
            return SSEResponse(StreamCall(self, answer, method, getattr(body, "model", ""), started, fields))
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            code = grpc.StatusCode.CANCELLED
            return Response(status_code=499)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            status = wire_status(exc)
            code = status.code
            if code is not grpc.StatusCode.INTERNAL:  # INTERNAL was logged with its traceback already
                refusals.info("%s failed: %s %s", method, status.http_status, clip(status.details, LOGGED_DETAIL_CHARS))
            if self._penalty is not None and status.http_status in PENALIZED_HTTP_STATUSES:
                peer = request.client.host if request.client is not None else "?"
                await self._penalty.hold(caller.tenant if caller and caller.tenant else f"peer {peer}")
            return error_response(exc, fields, status)
        finally:
            if not streaming:
                self.in_flight -= 1
                self._observe(method, getattr(body, "model", ""), code, started)

    @staticmethod
    def _fields(schema: type[BaseModel] | None, body: Any) -> dict[str, str]:
        if schema is ChatCompletionRequest:
            return ChatServing.fields(body)
        if schema is CompletionRequest:
            return CompletionServing.fields(body)
        return {"node": "model"}

    def _finished(self, method: str, started: float, code: grpc.StatusCode) -> None:
        """A streamed file answer ended (sent, or cut short by the client)."""
        self.in_flight -= 1
        self._observe(method, "", code, started)

    def _observe(self, method: str, model: str, code: grpc.StatusCode, started: float) -> None:
        if self._observe_call is not None:
            node = model.partition("@")[0] if isinstance(model, str) else ""
            self._observe_call(method, node, code.name, time.perf_counter() - started)

    async def _caller(self, request: Request) -> Caller:
        header = request.headers.get("authorization")
        metadata = [("authorization", header)] if header is not None else []
        certificate = http_peer_certificate(request.scope.get("state")) if self._auth.client_tenants else None
        return await self._auth.authenticate(metadata, certificate)

    async def _body(self, request: Request, schema: type[B]) -> B:
        limit = self._limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(limit)
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise RequestTooLarge(limit)
        if len(data) > PARSE_IN_THREAD_BYTES:  # megabytes of JSON take milliseconds: not on the event loop
            return await asyncio.to_thread(_parse, schema, bytes(data))
        return _parse(schema, bytes(data))


def _parse(schema: type[B], data: bytes) -> B:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRequest(f"the body is not UTF-8 (byte {exc.start}); send UTF-8 JSON") from None
    try:
        return schema.model_validate_json(text)
    except ValidationError as exc:
        raise validation_error(exc) from None


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the process that runs the server owns the signals."""

    def capture_signals(self):
        return nullcontext()


def _http_protocol() -> type[asyncio.Protocol]:
    """The HTTP protocol class uvicorn picks by default (httptools when installed, else h11)."""
    return import_from_string(HTTP_PROTOCOLS["auto"])


class HttpServer:
    """Serves an :class:`HttpApi` with uvicorn on the running event loop, on a socket bound first
    (port 0 = any free port; a port in use is a ServeError at once)."""

    def __init__(
        self,
        api: HttpApi,
        host: str,
        port: int,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
    ):
        self.api = api
        self._host, self._requested = host, port
        self._tls = (tls_cert, tls_key)
        self._client_ca = tls_client_ca  # set: a client certificate signed by this CA is required
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    def _socket(self) -> socket.socket:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self._host, self._requested, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ServeError(f"cannot listen on {self._host}:{self._requested} (HTTP): {exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise ServeError(
                f"cannot listen on {self._host}:{self._requested} (HTTP): {exc} (is the port in use? try --http-port)"
            ) from None
        return sock

    async def start(self) -> None:
        sock = self._socket()
        self.port = int(sock.getsockname()[1])
        cert, key = self._tls
        # With client certificates mapped to tenants, each request sees its connection's certificate.
        mapped = self._client_ca is not None and self.api.authenticator.client_tenants is not None
        config = uvicorn.Config(
            self.api.app,
            http=peer_aware_protocol(_http_protocol()) if mapped else "auto",
            lifespan="off",
            log_config=None,  # the process's logging stays as its owner configured it
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
            ssl_certfile=cert,
            ssl_keyfile=key,
            ssl_ca_certs=self._client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if self._client_ca else ssl.CERT_NONE,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                sock.close()
                error = self._task.exception()
                raise ServeError(f"the HTTP server did not start on port {self.port}: {error!r}")
            await asyncio.sleep(0.01)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace: float) -> None:
        """503 for new requests, in-flight ones (streams included) get ``grace`` seconds, then close."""
        if self._server is None or self._task is None:
            return
        self.api.draining = True
        end = time.monotonic() + grace
        while self.api.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=5.0)
        except TimeoutError:
            self._server.force_exit = True
            await asyncio.wait_for(self._task, timeout=5.0)
        except Exception:  # a failure while closing must not hide the gRPC side's
            log.warning("the HTTP server did not stop cleanly", exc_info=True)
