"""Bearer tokens -> tenants.

A call carries ``authorization: Bearer <token>`` metadata; the registry maps the
token (stored hashed there) to its tenant. With auth on (the default) a call
without a valid token fails with UNAUTHENTICATED. ``treelm serve
--insecure-no-auth`` turns that off for local development: calls without a token
are then anonymous and see only public nodes; a token that is sent is still
checked, so a tenant can use its private nodes.

Resolved tokens are cached (keyed by the token's sha256, never the token itself) for at most
``cache_ttl_s`` seconds and never past the token's expiry. Revocation needs no waiting for the
TTL: at most every ``check_interval_s`` seconds the authenticator reads the registry's token
generation (a count that grows with every revocation) and drops its whole cache when it moved.
Every server that shares the registry database (the ingresses of a Ray cluster) does the same,
so a revoked token is refused everywhere within about that interval.

A token's role is ``tenant`` or ``operator``; :func:`require_operator` gates the Admin service.

With mutual TLS and ``client_tenants`` (``--tls-client-tenants``), a client certificate whose
subject maps to a tenant authenticates a call without a token as that tenant (role tenant), and
a token of any other tenant sent over that certificate is refused UNAUTHENTICATED
(cluster/service/client_certs.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

from cluster.errors import PermissionDenied, Unauthenticated
from cluster.service.client_certs import ClientTenants
from registry.errors import InvalidToken
from registry.records import TokenGrant

__all__ = [
    "ANONYMOUS",
    "CALLER",
    "Authenticator",
    "Caller",
    "bearer_token",
    "current_caller",
    "require_operator",
]


@dataclass(frozen=True)
class Caller:
    """Who is calling: a tenant's name and its token's role, or nobody (anonymous, only with auth off)."""

    tenant: str | None
    role: str | None = "tenant"  # tenant | operator; None for anonymous callers

    @property
    def anonymous(self) -> bool:
        return self.tenant is None

    @property
    def operator(self) -> bool:
        return self.role == "operator"


ANONYMOUS = Caller(tenant=None, role=None)

# Set by AuthInterceptor for the duration of one call; read by the servicers.
CALLER: ContextVar[Caller] = ContextVar("treelm_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    return CALLER.get()


def require_operator(caller: Caller, *, auth_required: bool) -> None:
    """PermissionDenied unless ``caller`` holds an operator token.

    With auth off (local development) an anonymous caller is let through: the operator chose an
    open server; a tenant token that was sent still counts as a tenant.
    """
    if caller.operator or (caller.anonymous and not auth_required):
        return
    raise PermissionDenied("this call needs an operator token (`treelm registry token issue TENANT --role operator`)")


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


@dataclass(frozen=True)
class _Cached:
    caller: Caller
    until: float  # monotonic clock
    expires_at: datetime | None  # the token's own expiry (wall clock)


class Authenticator:
    """Resolves tokens with ``resolve(token) -> TokenGrant`` (raising InvalidToken), with a cache
    invalidated by ``generation()`` (see the module docstring)."""

    def __init__(
        self,
        resolve: Callable[[str], TokenGrant],
        *,
        required: bool = True,
        cache_ttl_s: float = 30.0,
        generation: Callable[[], int] | None = None,
        check_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        client_tenants: ClientTenants | None = None,
    ):
        self._resolve = resolve
        self.client_tenants = client_tenants
        self.required = required
        self._ttl = cache_ttl_s
        self._generation = generation
        self._interval = check_interval_s
        self._clock = clock
        self._wall = wall_clock
        self._cache: dict[str, _Cached] = {}
        self._seen_generation: int | None = None
        self._checked_at = float("-inf")
        self._check_lock = asyncio.Lock()

    async def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, certificate: bytes | None = None
    ) -> Caller:
        """The caller of a call with this metadata, over a connection with this verified client
        certificate (PEM or DER; None without mutual TLS)."""
        token = bearer_token(metadata)
        tenant = self.client_tenants.tenant_of(certificate) if self.client_tenants is not None else None
        if tenant is not None:
            if token is None:
                return Caller(tenant=tenant, role="tenant")
            caller = await self._caller(token)
            if caller.tenant != tenant:
                raise Unauthenticated(
                    "the bearer token belongs to another tenant than the client certificate's: "
                    "send that tenant's token, or none"
                )
            return caller
        if token is None:
            if self.required:
                raise Unauthenticated(
                    "this server needs a bearer token: Client(..., token=...), the openai client's api_key, or "
                    "'authorization: Bearer <token>' (issue one with `treelm registry token issue TENANT`)"
                )
            return ANONYMOUS
        return await self._caller(token)

    async def _revalidate(self) -> None:
        """Drop the cache when the registry's token generation moved (checked at most every interval)."""
        if self._generation is None or self._clock() - self._checked_at < self._interval:
            return
        async with self._check_lock:
            if self._clock() - self._checked_at < self._interval:  # another call checked while we waited
                return
            generation = await asyncio.to_thread(self._generation)
            if generation != self._seen_generation:
                self._cache.clear()
                self._seen_generation = generation
            self._checked_at = self._clock()

    async def _caller(self, token: str) -> Caller:
        await self._revalidate()
        key = hashlib.sha256(token.encode("utf-8")).hexdigest()
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit.until > now and (hit.expires_at is None or hit.expires_at > self._wall()):
            return hit.caller
        try:
            # The registry is synchronous (SQLAlchemy); keep the event loop free while it looks.
            grant = await asyncio.to_thread(self._resolve, token)
        except InvalidToken:
            self._cache.pop(key, None)
            raise Unauthenticated("the bearer token is not valid (unknown, malformed, expired or revoked)") from None
        if len(self._cache) > 10_000:  # bound memory under token spraying
            self._cache.clear()
        caller = Caller(tenant=grant.tenant, role=grant.role)
        self._cache[key] = _Cached(caller, now + self._ttl, grant.expires_at)
        return caller
