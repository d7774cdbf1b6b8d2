"""Bearer tokens -> tenants.

A call carries ``authorization: Bearer <token>`` metadata; the registry maps the
token (stored hashed there) to its tenant. With auth on (the default) a call
without a valid token fails with UNAUTHENTICATED. ``treelm serve
--insecure-no-auth`` turns that off for local development: calls without a token
are then anonymous and see only public nodes; a token that is sent is still
checked, so a tenant can use its private nodes.

Resolved tokens are cached for ``cache_ttl_s`` seconds (keyed by the token's
sha256, never the token itself), so a revoked token stops working within that time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from cluster.errors import Unauthenticated
from registry.errors import InvalidToken

__all__ = ["ANONYMOUS", "CALLER", "Authenticator", "Caller", "bearer_token", "current_caller"]


@dataclass(frozen=True)
class Caller:
    """Who is calling: a tenant's name, or nobody (anonymous, only with auth off)."""

    tenant: str | None

    @property
    def anonymous(self) -> bool:
        return self.tenant is None


ANONYMOUS = Caller(tenant=None)

# Set by AuthInterceptor for the duration of one call; read by the servicers.
CALLER: ContextVar[Caller] = ContextVar("treelm_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    return CALLER.get()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry; None when absent."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization header (gRPC metadata) must be 'Bearer <token>'")
        return token.strip()
    return None


class Authenticator:
    """Resolves tokens with ``resolve(token) -> tenant name`` (raising InvalidToken), with a TTL cache."""

    def __init__(
        self,
        resolve: Callable[[str], str],
        *,
        required: bool = True,
        cache_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._resolve = resolve
        self.required = required
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        token = bearer_token(metadata)
        if token is None:
            if self.required:
                raise Unauthenticated(
                    "this server needs a bearer token: Client(..., token=...), the openai client's api_key, or "
                    "'authorization: Bearer <token>' (issue one with `treelm registry token issue TENANT`)"
                )
            return ANONYMOUS
        return Caller(tenant=await self._tenant(token))

    async def _tenant(self, token: str) -> str:
        key = hashlib.sha256(token.encode("utf-8")).hexdigest()
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            # The registry is synchronous (SQLAlchemy); keep the event loop free while it looks.
            tenant = await asyncio.to_thread(self._resolve, token)
        except InvalidToken:
            self._cache.pop(key, None)
            raise Unauthenticated("the bearer token is not valid (unknown, malformed or revoked)") from None
        if len(self._cache) > 10_000:  # bound memory under token spraying
            self._cache.clear()
        self._cache[key] = (tenant, now + self._ttl)
        return tenant
