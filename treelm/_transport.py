"""What the sync and asyncio clients share: retry policy, credentials, metadata, options."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from treelm._errors import DeadlineExceeded, TreeLMError

__all__ = [
    "CHANNEL_OPTIONS",
    "PEM",
    "TLS",
    "UNSET",
    "Deadline",
    "RetryPolicy",
    "auth_metadata",
    "channel_credentials",
]

# Explicit message limits (16 MiB in, the server's send bound; 4 MiB out, though a server refuses
# requests over its own bound, 1.25 MiB by default, before decoding them), and a user agent.
CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.primary_user_agent", "treelm-python"),
    # gRPC's own retries stay off: ours know which calls are idempotent.
    ("grpc.enable_retries", 0),
)

# A call's ``timeout`` left out: the client's default applies (None would mean "wait forever").
UNSET: Any = object()

# None: plaintext; True: TLS with the system's roots; bytes/str/Path: a root CA (PEM or its file);
# or ready grpc.ChannelCredentials.
TLS: TypeAlias = bool | bytes | str | Path | grpc.ChannelCredentials | None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent calls on UNAVAILABLE / RESOURCE_EXHAUSTED, with exponential backoff.

    The n-th retry sleeps a uniformly random time in ``[0, min(max_backoff, initial_backoff * 2**n)]``
    ("full jitter"), so many clients that were turned away together do not come back together.
    A call's ``timeout`` bounds the attempts and sleeps together.
    """

    retries: int = 3  # attempts after the first
    initial_backoff: float = 0.1  # seconds
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if not self.initial_backoff >= 0 or not self.max_backoff >= self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")

    @classmethod
    def of(cls, value: int | RetryPolicy) -> RetryPolicy:
        return value if isinstance(value, RetryPolicy) else cls(retries=value)

    def backoff(self, attempt: int, hint: float | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (0-based); never less than the server's
        ``hint`` (its retry-after), and a call whose deadline comes sooner is not retried."""
        jitter = random.uniform(0.0, min(self.max_backoff, self.initial_backoff * (2**attempt)))
        return max(jitter, hint or 0.0)

    def should_retry(self, error: TreeLMError, attempt: int, remaining: float | None, pause: float) -> bool:
        if not error.retryable or attempt >= self.retries:
            return False
        return remaining is None or pause < remaining


PEM: TypeAlias = bytes | str | Path  # PEM bytes, or the path of a PEM file


def _pem(value: PEM, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (str, Path)):
        return Path(value).read_bytes()
    raise TypeError(f"{what}: expected PEM bytes or a file path, got {value!r}")


def channel_credentials(
    tls: TLS, client_cert: PEM | None = None, client_key: PEM | None = None
) -> grpc.ChannelCredentials | None:
    """Credentials for ``tls`` (see :data:`TLS`); None means a plaintext channel.

    ``client_cert`` and ``client_key`` (PEM bytes or files, both or neither) present a client
    certificate for servers that require one (mutual TLS); they imply TLS (system roots when
    ``tls`` names no CA).
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate needs both client_cert and client_key")
    chain = (_pem(client_cert, "client_cert"), _pem(client_key, "client_key")) if client_cert and client_key else None
    if isinstance(tls, grpc.ChannelCredentials):
        if chain is not None:
            raise ValueError("pass the client certificate inside the grpc.ChannelCredentials given as tls")
        return tls
    if (tls is None or tls is False) and chain is None:
        return None
    if tls is None or isinstance(tls, bool):
        roots = None
    elif isinstance(tls, (bytes, str, Path)):
        roots = _pem(tls, "tls")
    else:
        raise TypeError(f"tls: expected None, True, PEM bytes, a CA file path or grpc.ChannelCredentials, got {tls!r}")
    private_key, certificate_chain = (chain[1], chain[0]) if chain is not None else (None, None)
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=private_key, certificate_chain=certificate_chain
    )


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the bearer token (sent per call, so it works on any channel)."""
    if token is None:
        return ()
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        raise ValueError("token must be a non-empty single-line string")
    return (("authorization", f"Bearer {token}"),)


class Deadline:
    """An overall deadline shared by a call's attempts and the sleeps between them."""

    def __init__(self, timeout: float | None):
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the call's timeout passed while retrying", grpc.StatusCode.DEADLINE_EXCEEDED)
        return left
