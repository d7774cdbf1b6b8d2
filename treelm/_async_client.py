"""The asyncio client: ``AsyncClient(target, token=...)``, the same calls as :class:`Client`.

Example::

    import asyncio
    from treelm import AsyncClient

    async def main():
        async with AsyncClient("127.0.0.1:50051", token="tlm_...") as client:
            results = await asyncio.gather(*(client.generate(n, prompt="Hi") for n in ("demo/en", "demo/fr")))
            async for chunk in client.stream("demo/en", prompt="Once"):
                print(chunk.text, end="")

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Unpack

import grpc
import grpc.aio

from hierarchy.updates.envelope import sign_payload
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.statements import ROLLBACK_PAYLOAD_TYPE, rollback_statement
from protos.treelm.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    fine_tuning_pb2_grpc,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    updates_pb2,
    updates_pb2_grpc,
)
from treelm._convert import (
    MessageLike,
    chunk_from_proto,
    generate_request,
    match_from_proto,
    match_request,
    node_from_proto,
    result_from_proto,
    status_from_proto,
    version_from_proto,
)
from treelm._errors import TreeLMError, from_rpc_error
from treelm._feedback import delete_request, feedback_from_proto, retention_from_proto, submit_request
from treelm._fine_tuning import AsyncFineTuningMixin
from treelm._transport import (
    CHANNEL_OPTIONS,
    PEM,
    TLS,
    UNSET,
    RetryPolicy,
    auth_metadata,
    channel_credentials,
)
from treelm._transport import (
    Deadline as _Deadline,
)
from treelm._types import (
    Chunk,
    Feedback,
    MatchResult,
    Node,
    NodeVersion,
    Result,
    Retention,
    RollbackResult,
    SamplingOptions,
    ServerStatus,
    UpdateStatus,
)
from treelm._updates import (
    approval_signature,
    load_signing_key,
    package_chunks,
    rollback_from_proto,
    update_status_from_proto,
)

__all__ = ["AsyncClient", "AsyncStream"]

_UNSET: Any = UNSET  # shared with the fine-tuning calls (treelm._fine_tuning)


class AsyncStream(AsyncIterator[Chunk]):
    """Chunks of one streamed generation (``async for``); retried only before the first chunk."""

    def __init__(self, start: Callable[[float | None], Any], policy: RetryPolicy, timeout: float | None):
        self._start = start
        self._policy = policy
        self._deadline = _Deadline(timeout)
        self._call: Any = None
        self._received = 0
        self._attempt = 0
        self._done = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        while not self._done:
            if self._call is None:
                self._call = self._start(self._deadline.remaining())
            try:
                message = await self._call.read()
            except asyncio.CancelledError:
                self.cancel()
                raise
            except grpc.RpcError as exc:
                if self._done:
                    break
                error = from_rpc_error(exc)
                if self._received == 0 and await self._retry(error):
                    continue
                self._done = True
                raise error from exc
            if message is grpc.aio.EOF:
                self._done = True
                break
            self._received += 1
            chunk = chunk_from_proto(message)
            if chunk.last:
                self._done = True
            return chunk
        raise StopAsyncIteration

    async def _retry(self, error: TreeLMError) -> bool:
        pause = self._policy.backoff(self._attempt, error.retry_after)
        if not self._policy.should_retry(error, self._attempt, self._deadline.remaining(), pause):
            return False
        await asyncio.sleep(pause)
        self._attempt += 1
        self._call = None
        return True

    def cancel(self) -> None:
        """Stop the generation; the server frees the request's batch slot at its next step."""
        self._done = True
        if self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncClient(AsyncFineTuningMixin):
    """An asyncio TreeLM client; arguments as :class:`treelm.Client` (``channel``: a ``grpc.aio.Channel``).

    Example::

        async with AsyncClient("127.0.0.1:50051", token=TOKEN) as client:
            r = await client.generate("demo/en", prompt="Hello", max_new_tokens=8)
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        tls: TLS = None,
        client_cert: PEM | None = None,
        client_key: PEM | None = None,
        timeout: float | None = 60.0,
        retries: int | RetryPolicy = 3,
        channel: grpc.aio.Channel | None = None,
        options: Sequence[tuple[str, object]] = (),
    ):
        if channel is None and not target:
            raise ValueError("give a target ('host:port') or a channel")
        self._metadata = auth_metadata(token)
        self._timeout = timeout
        self._policy = RetryPolicy.of(retries)
        self._owns_channel = channel is None
        if channel is None:
            creds = channel_credentials(tls, client_cert, client_key)
            opts = list(CHANNEL_OPTIONS) + list(options)
            channel = grpc.aio.secure_channel(target, creds, opts) if creds else grpc.aio.insecure_channel(target, opts)
        self._channel = channel
        # grpc_tools writes no type stubs for services, so the generated stub classes are untyped.
        self._inference = inference_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        self._registry = registry_pb2_grpc.RegistryStub(channel)  # type: ignore[no-untyped-call]
        self._admin = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        self._updates = updates_pb2_grpc.UpdatesStub(channel)  # type: ignore[no-untyped-call]
        self._feedback = feedback_pb2_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
        self._fine_tuning = fine_tuning_pb2_grpc.FineTuningStub(channel)  # type: ignore[no-untyped-call]

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: Any, idempotent: bool = True) -> Any:
        deadline = _Deadline(self._timeout if timeout is _UNSET else timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                pause = self._policy.backoff(attempt, error.retry_after)
                if not (idempotent and self._policy.should_retry(error, attempt, deadline.remaining(), pause)):
                    raise error from exc
                await asyncio.sleep(pause)
                attempt += 1

    async def generate(
        self,
        node: str,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        timeout: float | None = _UNSET,
        request_id: str | None = None,
        **params: Unpack[SamplingOptions],
    ) -> Result:
        """Generate with ``node``; see :meth:`treelm.Client.generate`."""
        request = generate_request(node, prompt, messages, params, request_id)
        return result_from_proto(await self._unary(self._inference.Generate, request, timeout))

    def stream(
        self,
        node: str,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        timeout: float | None = _UNSET,
        request_id: str | None = None,
        **params: Unpack[SamplingOptions],
    ) -> AsyncStream:
        """Stream chunks (``async for chunk in client.stream(...)``); see :meth:`treelm.Client.stream`."""
        request = generate_request(node, prompt, messages, params, request_id)

        def start(remaining: float | None) -> Any:
            return self._inference.GenerateStream(request, timeout=remaining, metadata=self._metadata)

        return AsyncStream(start, self._policy, self._timeout if timeout is _UNSET else timeout)

    async def nodes(self, prefix: str = "", *, timeout: float | None = _UNSET) -> list[Node]:
        reply = await self._unary(self._registry.ListNodes, registry_pb2.ListNodesRequest(prefix=prefix), timeout)
        return [node_from_proto(n) for n in reply.nodes]

    async def node(self, node_id: str, *, timeout: float | None = _UNSET) -> Node:
        request = registry_pb2.GetNodeRequest(node=node_id)
        return node_from_proto(await self._unary(self._registry.GetNode, request, timeout))

    async def versions(self, node_id: str, *, timeout: float | None = _UNSET) -> list[NodeVersion]:
        request = registry_pb2.ListVersionsRequest(node=node_id)
        reply = await self._unary(self._registry.ListVersions, request, timeout)
        return [version_from_proto(v) for v in reply.versions]

    async def match(
        self,
        task: str,
        *,
        device: str = "cpu",
        memory: int | str,
        context: int | None = None,
        batch: int | None = None,
        top: int | None = None,
        bandwidth: str | None = None,
        compute: str | None = None,
        tags: Iterable[str] = (),
        tree: str | None = None,
        dtype: str | None = None,
        timeout: float | None = _UNSET,
    ) -> MatchResult:
        request = match_request(
            task,
            device=device,
            memory=memory,
            context=context,
            batch=batch,
            top=top,
            bandwidth=bandwidth,
            compute=compute,
            tags=tags,
            tree=tree,
            dtype=dtype,
        )
        return match_from_proto(await self._unary(self._registry.Match, request, timeout))

    async def status(self, *, timeout: float | None = _UNSET) -> ServerStatus:
        return status_from_proto(await self._unary(self._admin.Status, admin_pb2.StatusRequest(), timeout))

    async def submit_update(self, package: str | Path, *, timeout: float | None = _UNSET) -> UpdateStatus:
        """Stream an update package (see :meth:`treelm.Client.submit_update`); never retried."""
        chunks = package_chunks(package)
        deadline = _Deadline(self._timeout if timeout is _UNSET else timeout)
        try:
            reply = await self._updates.Submit(chunks, timeout=deadline.remaining(), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return update_status_from_proto(reply)

    async def update_status(self, update_id: str, *, timeout: float | None = _UNSET) -> UpdateStatus:
        request = updates_pb2.GetStatusRequest(update_id=update_id)
        return update_status_from_proto(await self._unary(self._updates.GetStatus, request, timeout))

    async def approve(
        self,
        update_id: str,
        key: SigningKey | str | Path,
        *,
        password: bytes | None = None,
        timeout: float | None = _UNSET,
    ) -> UpdateStatus:
        signer = load_signing_key(key, password)
        signature = approval_signature(await self.update_status(update_id, timeout=timeout), signer)
        request = updates_pb2.ApproveRequest(update_id=update_id, key_id=signer.keyid, signature=signature)
        return update_status_from_proto(await self._unary(self._updates.Approve, request, timeout, idempotent=False))

    async def rollback(
        self,
        node: str,
        to_version: int,
        keys: Sequence[SigningKey | str | Path] | SigningKey | str | Path,
        *,
        password: bytes | None = None,
        timeout: float | None = _UNSET,
    ) -> RollbackResult:
        signers = [
            load_signing_key(k, password) for k in ([keys] if isinstance(keys, (SigningKey, str, Path)) else keys)
        ]
        current = (await self.node(node, timeout=timeout)).stable_version or 0
        signatures = sign_payload(ROLLBACK_PAYLOAD_TYPE, rollback_statement(node, current, to_version), signers)
        request = updates_pb2.RollbackRequest(
            node=node,
            alias="stable",
            to_version=to_version,
            signatures=[updates_pb2.Signature(key_id=s.keyid, signature=s.sig) for s in signatures],
        )
        return rollback_from_proto(await self._unary(self._updates.Rollback, request, timeout, idempotent=False))

    async def feedback(
        self,
        response_id: str,
        rating: int,
        correction: str | None = None,
        tags: Iterable[str] = (),
        *,
        timeout: float | None = _UNSET,
    ) -> Feedback:
        """Rate a response you received (see :meth:`treelm.Client.feedback`); never retried."""
        request = submit_request(response_id, rating, correction, tags)
        return feedback_from_proto(await self._unary(self._feedback.Submit, request, timeout, idempotent=False))

    async def list_feedback(
        self, node: str | None = None, *, limit: int = 0, timeout: float | None = _UNSET
    ) -> list[Feedback]:
        request = feedback_pb2.ListFeedbackRequest(node=node or "", limit=limit)
        return [feedback_from_proto(r) for r in (await self._unary(self._feedback.List, request, timeout)).records]

    async def export_feedback(self, node: str | None = None, *, timeout: float | None = _UNSET) -> list[Feedback]:
        async def export(request: Any, timeout: float | None, metadata: Any) -> list[Any]:
            return [r async for r in self._feedback.Export(request, timeout=timeout, metadata=metadata)]

        request = feedback_pb2.ExportFeedbackRequest(node=node or "")
        return [feedback_from_proto(r) for r in await self._unary(export, request, timeout)]

    async def delete_feedback(
        self, node: str | None = None, response_ids: Iterable[str] | None = None, *, timeout: float | None = _UNSET
    ) -> int:
        return int((await self._unary(self._feedback.Delete, delete_request(node, response_ids), timeout)).deleted)

    async def set_retention(self, node: str, enabled: bool, *, timeout: float | None = _UNSET) -> Retention:
        request = feedback_pb2.RetentionRequest(node=node, enabled=enabled)
        return retention_from_proto(await self._unary(self._feedback.SetRetention, request, timeout))

    async def retention(self, node: str | None = None, *, timeout: float | None = _UNSET) -> list[Retention]:
        request = feedback_pb2.GetRetentionRequest(node=node or "")
        return [
            retention_from_proto(r) for r in (await self._unary(self._feedback.GetRetention, request, timeout)).nodes
        ]

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
