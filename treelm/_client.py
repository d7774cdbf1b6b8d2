"""The blocking client: ``Client(target, token=...)``.

Example::

    from treelm import Client

    with Client("127.0.0.1:50051", token="tlm_...") as client:
        print(client.generate("demo/en/medical", prompt="The patient").text)
        for chunk in client.stream("demo/en", prompt="Once", max_new_tokens=16):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Unpack

import grpc

from hierarchy.updates.envelope import Signature, sign_payload
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.statements import ROLLBACK_PAYLOAD_TYPE, rollback_statement
from protos.treelm.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    distribution_pb2,
    distribution_pb2_grpc,
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
from treelm._fine_tuning import FineTuningMixin
from treelm._pulltypes import Offer, PullResult, TrustBundle, offer_from_proto, trust_from_proto
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

__all__ = ["Client", "Stream"]

_UNSET: Any = UNSET  # shared with the fine-tuning calls (treelm._fine_tuning)


class Stream(Iterator[Chunk]):
    """Chunks of one streamed generation, in order. ``cancel()`` (or leaving a ``with``) ends it early.

    A stream that fails with UNAVAILABLE / RESOURCE_EXHAUSTED before its first chunk is retried
    like a unary call; after the first chunk it is never retried (text was already delivered).
    """

    def __init__(self, start: Callable[[float | None], Any], policy: RetryPolicy, timeout: float | None):
        self._start = start
        self._policy = policy
        self._deadline = _Deadline(timeout)
        self._call: Any = None
        self._received = 0
        self._attempt = 0
        self._done = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        while not self._done:
            if self._call is None:
                self._call = self._start(self._deadline.remaining())
            try:
                message = next(self._call)
            except StopIteration:
                self._done = True
                break
            except grpc.RpcError as exc:
                if self._done:  # cancelled by us: end quietly
                    break
                error = from_rpc_error(exc)
                if self._received == 0 and self._retry(error):
                    continue
                self._done = True
                raise error from exc
            self._received += 1
            chunk = chunk_from_proto(message)
            if chunk.last:
                self._done = True
            return chunk
        raise StopIteration

    def _retry(self, error: TreeLMError) -> bool:
        pause = self._policy.backoff(self._attempt, error.retry_after)
        if not self._policy.should_retry(error, self._attempt, self._deadline.remaining(), pause):
            return False
        time.sleep(pause)
        self._attempt += 1
        self._call = None
        return True

    def cancel(self) -> None:
        """Stop the generation; the server frees the request's batch slot at its next step."""
        self._done = True
        if self._call is not None:
            self._call.cancel()

    close = cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client(FineTuningMixin):
    """A blocking TreeLM client.

    Args:
        target: ``host:port`` of a ``treelm serve`` server (ignored when ``channel`` is given).
        token: the bearer token from ``treelm registry token issue TENANT``.
        tls: None (plaintext), True (system roots), PEM bytes or a CA file, or ChannelCredentials.
        client_cert, client_key: a client certificate and its key (PEM bytes or files) for servers
            that require one (``treelm serve --tls-client-ca``); they imply TLS.
        timeout: default seconds per call (streams: for the whole stream); None waits forever.
        retries: retries of idempotent calls on UNAVAILABLE / RESOURCE_EXHAUSTED (or a RetryPolicy).
        channel: a ready ``grpc.Channel`` to use instead (tests, custom interceptors); not closed by us.

    Example::

        client = Client("127.0.0.1:50051", token=TOKEN, timeout=30)
        best = client.match(task="en/medical/radiology", device="cpu", memory="8GiB").best
        print(best.node, best.variant, best.fit)
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
        channel: grpc.Channel | None = None,
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
            channel = grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)
        self._channel = channel
        # grpc_tools writes no type stubs for services, so the generated stub classes are untyped.
        self._inference = inference_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        self._registry = registry_pb2_grpc.RegistryStub(channel)  # type: ignore[no-untyped-call]
        self._admin = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        self._updates = updates_pb2_grpc.UpdatesStub(channel)  # type: ignore[no-untyped-call]
        self._distribution = distribution_pb2_grpc.DistributionStub(channel)  # type: ignore[no-untyped-call]
        self._feedback = feedback_pb2_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
        self._fine_tuning = fine_tuning_pb2_grpc.FineTuningStub(channel)  # type: ignore[no-untyped-call]

    # -- plumbing ---------------------------------------------------------------------------
    # Reads and generation are idempotent (they change nothing on the server) and are retried;
    # update calls (submit, approve, rollback) pass idempotent=False and are never retried.
    def _unary(self, method: Callable[..., Any], request: Any, timeout: Any, idempotent: bool = True) -> Any:
        deadline = _Deadline(self._timeout if timeout is _UNSET else timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                pause = self._policy.backoff(attempt, error.retry_after)
                if not (idempotent and self._policy.should_retry(error, attempt, deadline.remaining(), pause)):
                    raise error from exc
                time.sleep(pause)
                attempt += 1

    # -- inference --------------------------------------------------------------------------
    def generate(
        self,
        node: str,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        timeout: float | None = _UNSET,
        request_id: str | None = None,
        **params: Unpack[SamplingOptions],
    ) -> Result:
        """Generate with ``node`` (``"demo/en"``, or pinned: ``"demo/en@2"``); ``params``: see
        :class:`SamplingOptions` (max_new_tokens, temperature, top_p, top_k, seed, stop, n, penalties,
        logit_bias, logprobs, top_logprobs, echo, response_format).

        Example::

            r = client.generate("demo/en", prompt="Hello", max_new_tokens=8, temperature=0)
            r.text, r.usage.completion_tokens, r.node_version
            r = client.generate("demo/en", prompt="Hello", n=3, temperature=0.8, logprobs=True, top_logprobs=2)
            [c.text for c in r.choices], r.logprobs[0].logprob, r.logprobs[0].top
            score = client.generate("demo/en", prompt="The cat sat", max_new_tokens=0, echo=True, logprobs=True)
            sum(t.logprob for t in score.echo.logprobs[1:])   # the prompt's log-likelihood
        """
        request = generate_request(node, prompt, messages, params, request_id)
        return result_from_proto(self._unary(self._inference.Generate, request, timeout))

    def stream(
        self,
        node: str,
        prompt: str | None = None,
        *,
        messages: Iterable[MessageLike] | None = None,
        timeout: float | None = _UNSET,
        request_id: str | None = None,
        **params: Unpack[SamplingOptions],
    ) -> Stream:
        """Like :meth:`generate`, but yields :class:`Chunk` s as tokens are produced.

        Example::

            with client.stream("demo/en", messages=[{"role": "user", "content": "hi"}]) as chunks:
                text = "".join(chunk.text for chunk in chunks)
        """
        request = generate_request(node, prompt, messages, params, request_id)

        def start(remaining: float | None) -> Any:
            return self._inference.GenerateStream(request, timeout=remaining, metadata=self._metadata)

        return Stream(start, self._policy, self._timeout if timeout is _UNSET else timeout)

    # -- registry ---------------------------------------------------------------------------
    def nodes(self, prefix: str = "", *, timeout: float | None = _UNSET) -> list[Node]:
        """The nodes this token may use, parents first; ``prefix`` keeps one subtree."""
        reply = self._unary(self._registry.ListNodes, registry_pb2.ListNodesRequest(prefix=prefix), timeout)
        return [node_from_proto(n) for n in reply.nodes]

    def node(self, node_id: str, *, timeout: float | None = _UNSET) -> Node:
        """One node; :class:`NodeNotFound` if it does not exist or is another tenant's private node."""
        return node_from_proto(self._unary(self._registry.GetNode, registry_pb2.GetNodeRequest(node=node_id), timeout))

    def versions(self, node_id: str, *, timeout: float | None = _UNSET) -> list[NodeVersion]:
        """A node's versions, oldest first."""
        reply = self._unary(self._registry.ListVersions, registry_pb2.ListVersionsRequest(node=node_id), timeout)
        return [version_from_proto(v) for v in reply.versions]

    def match(
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
        """The best nodes and variants for a task on a device (private nodes only for their owner).

        Example::

            m = client.match(task="en/medical/radiology", device="cpu", memory="8GiB", context=2048)
            for c in m.candidates:
                print(c.node, c.variant, c.fit, c.reasons)
        """
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
        return match_from_proto(self._unary(self._registry.Match, request, timeout))

    # -- updates ----------------------------------------------------------------------------
    def submit_update(self, package: str | Path, *, timeout: float | None = _UNSET) -> UpdateStatus:
        """Stream an update package (a `treelm update make` directory); never retried.

        Example::

            status = client.submit_update("onc-v2")
            status.state, status.candidate_id   # e.g. "aggregated", the parent's candidate
        """
        chunks = package_chunks(package)
        try:
            reply = self._updates.Submit(
                chunks,
                timeout=_Deadline(self._timeout if timeout is _UNSET else timeout).remaining(),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return update_status_from_proto(reply)

    def update_status(self, update_id: str, *, timeout: float | None = _UNSET) -> UpdateStatus:
        """Where an update stands (state, reasons, approvals, screening and gate figures)."""
        request = updates_pb2.GetStatusRequest(update_id=update_id)
        return update_status_from_proto(self._unary(self._updates.GetStatus, request, timeout))

    def approve(
        self,
        update_id: str,
        key: SigningKey | str | Path,
        *,
        password: bytes | None = None,
        timeout: float | None = _UNSET,
    ) -> UpdateStatus:
        """Sign and send one approval of a candidate (the key stays here; only the signature travels).

        ``key``: a SigningKey, or a key directory / private PEM file from `treelm keys gen`.
        """
        signer = load_signing_key(key, password)
        signature = approval_signature(self.update_status(update_id, timeout=timeout), signer)
        request = updates_pb2.ApproveRequest(update_id=update_id, key_id=signer.keyid, signature=signature)
        return update_status_from_proto(self._unary(self._updates.Approve, request, timeout, idempotent=False))

    def rollback(
        self,
        node: str,
        to_version: int,
        keys: Sequence[SigningKey | str | Path] | SigningKey | str | Path,
        *,
        password: bytes | None = None,
        timeout: float | None = _UNSET,
    ) -> RollbackResult:
        """Move ``node``'s ``stable`` alias to ``to_version``, signed by operator key(s); re-signs nothing."""
        signers = [
            load_signing_key(k, password) for k in ([keys] if isinstance(keys, (SigningKey, str, Path)) else keys)
        ]
        current = self.node(node, timeout=timeout).stable_version or 0
        statement = rollback_statement(node, current, to_version)
        signatures: tuple[Signature, ...] = sign_payload(ROLLBACK_PAYLOAD_TYPE, statement, signers)
        request = updates_pb2.RollbackRequest(
            node=node,
            alias="stable",
            to_version=to_version,
            signatures=[updates_pb2.Signature(key_id=s.keyid, signature=s.sig) for s in signatures],
        )
        return rollback_from_proto(self._unary(self._updates.Rollback, request, timeout, idempotent=False))

    # -- distribution (see treelm._pull for verified downloads) -----------------------------
    def offer(self, node: str, variant: str, *, version: int = 0, timeout: float | None = _UNSET) -> Offer:
        """The signed manifest of ``variant`` of ``node`` (version 0: stable), built by the server if needed.

        The answer is not verified here: :meth:`pull` checks it against root keys before use.
        """
        request = distribution_pb2.OfferRequest(node=node, version=version, variant=variant)
        return offer_from_proto(self._unary(self._distribution.Offer, request, timeout))

    def download(
        self, node: str, key: str, file: str, *, offset: int = 0, timeout: float | None = _UNSET
    ) -> Iterator[tuple[int, bytes]]:
        """``(offset, data)`` chunks of one file of a variant, from ``offset`` to its end (not retried)."""
        request = distribution_pb2.DownloadRequest(node=node, key=key, file=file, offset=offset)
        deadline = _Deadline(self._timeout if timeout is _UNSET else timeout)
        call = self._distribution.Download(request, timeout=deadline.remaining(), metadata=self._metadata)
        try:
            for chunk in call:
                yield chunk.offset, chunk.data
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            call.cancel()

    def trust(self, tree: str, *, timeout: float | None = _UNSET) -> TrustBundle:
        """The server's root public keys and the tree's variant signers' delegation (to confirm once)."""
        reply = self._unary(self._distribution.Trust, distribution_pb2.TrustRequest(tree=tree), timeout)
        return trust_from_proto(reply)

    def pull(self, target: str, **options: Any) -> PullResult:
        """Pull a node (or the best node for a task) as a verified, ready-to-run directory: see treelm._pull.pull."""
        from treelm._pull import pull

        return pull(self, target, **options)

    # -- feedback ---------------------------------------------------------------------------
    def feedback(
        self,
        response_id: str,
        rating: int,
        correction: str | None = None,
        tags: Iterable[str] = (),
        *,
        timeout: float | None = _UNSET,
    ) -> Feedback:
        """Rate a response you received (+1 or -1; ``Result.request_id``, or an HTTP ``chatcmpl-...`` id),
        optionally with the answer it should have given. Never retried (a retry would rate twice).

        Raises ResponseNotFound (an id your tenant never received), FeedbackDeleted (you deleted its
        records), InvalidRequest naming ``rating``, ``correction`` or ``tags``.
        """
        request = submit_request(response_id, rating, correction, tags)
        return feedback_from_proto(self._unary(self._feedback.Submit, request, timeout, idempotent=False))

    def list_feedback(
        self, node: str | None = None, *, limit: int = 0, timeout: float | None = _UNSET
    ) -> list[Feedback]:
        """Your tenant's feedback (on ``node``, or all), newest first; ``limit`` 0 = the server's 100."""
        request = feedback_pb2.ListFeedbackRequest(node=node or "", limit=limit)
        return [feedback_from_proto(r) for r in self._unary(self._feedback.List, request, timeout).records]

    def export_feedback(self, node: str | None = None, *, timeout: float | None = _UNSET) -> list[Feedback]:
        """All your tenant's feedback with the retained prompts and answers (None where not retained)."""

        def export(request: Any, timeout: float | None, metadata: Any) -> list[Any]:
            return list(self._feedback.Export(request, timeout=timeout, metadata=metadata))

        request = feedback_pb2.ExportFeedbackRequest(node=node or "")
        return [feedback_from_proto(r) for r in self._unary(export, request, timeout)]

    def delete_feedback(
        self, node: str | None = None, response_ids: Iterable[str] | None = None, *, timeout: float | None = _UNSET
    ) -> int:
        """Delete your tenant's records (all, one node's, or some responses'); returns how many responses.
        Final: their texts and feedback are gone and they take no more feedback."""
        return int(self._unary(self._feedback.Delete, delete_request(node, response_ids), timeout).deleted)

    def set_retention(self, node: str, enabled: bool, *, timeout: float | None = _UNSET) -> Retention:
        """Keep (or stop keeping) the prompts and answers of your responses on ``node`` (off by default)."""
        request = feedback_pb2.RetentionRequest(node=node, enabled=enabled)
        return retention_from_proto(self._unary(self._feedback.SetRetention, request, timeout))

    def retention(self, node: str | None = None, *, timeout: float | None = _UNSET) -> list[Retention]:
        """``node``'s retention switch, or every node you turned retention on for."""
        reply = self._unary(self._feedback.GetRetention, feedback_pb2.GetRetentionRequest(node=node or ""), timeout)
        return [retention_from_proto(r) for r in reply.nodes]

    # -- admin ------------------------------------------------------------------------------
    def status(self, *, timeout: float | None = _UNSET) -> ServerStatus:
        """What the server is doing: trunks, loaded adapters, queue depth, cache counters."""
        return status_from_proto(self._unary(self._admin.Status, admin_pb2.StatusRequest(), timeout))

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
