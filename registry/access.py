"""Tenants and API tokens, signing keys, deployments.

Tokens look like ``tlm_<token id>_<secret>``. Only the token id (for lookup),
a random per-token salt and HMAC-SHA256(salt, secret) are stored; checking a
token recomputes the HMAC and compares in constant time. The secret is shown
once, when issued. A token has a role (``tenant``, or ``operator``: may also call the
Admin service) and may expire; revoking or expiry ends it for every server (see
:func:`token_generation`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from registry._rows import canonical_node_id, find_node, find_version, utc
from registry.db import Registry
from registry.errors import Conflict, InvalidInput, InvalidToken, NotFound, SigningKeyNotFound, TenantNotFound
from registry.models import ApiToken, Deployment, Node, NodeVersion, SigningKey, Tenant, utcnow
from registry.records import (
    DeploymentRecord,
    IssuedToken,
    SigningKeyRecord,
    TenantRecord,
    TokenGrant,
    TokenRecord,
    check_name,
    check_role,
    check_token_role,
)
from registry.vocab import DEPLOYMENT_STATUSES

__all__ = [
    "add_signing_key",
    "authenticate_token",
    "create_tenant",
    "get_signing_key",
    "get_tenant",
    "issue_token",
    "list_deployments",
    "list_signing_keys",
    "list_tenants",
    "list_tokens",
    "record_deployment",
    "remove_deployment",
    "resolve_token",
    "revoke_signing_key",
    "revoke_token",
    "token_generation",
]

TOKEN_PREFIX = "tlm"


def create_tenant(reg: Registry, name: str) -> TenantRecord:
    check_name(name, "tenant")
    try:
        with reg.write() as session:
            if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
                raise Conflict(f"tenant {name!r} already exists")
            row = Tenant(name=name, created_at=utcnow())
            session.add(row)
            session.flush()
            return TenantRecord(row.name, utc(row.created_at))
    except IntegrityError:
        raise Conflict(f"tenant {name!r} already exists") from None


def _tenant(session, name: str) -> Tenant:
    row = session.scalar(select(Tenant).where(Tenant.name == name))
    if row is None:
        raise TenantNotFound(f"unknown tenant {name!r}: add it with `treelm registry tenant add {name}`")
    return row


def get_tenant(reg: Registry, name: str) -> TenantRecord:
    with reg.read() as session:
        row = _tenant(session, name)
        return TenantRecord(row.name, utc(row.created_at))


def list_tenants(reg: Registry) -> tuple[TenantRecord, ...]:
    with reg.read() as session:
        return tuple(
            TenantRecord(t.name, utc(t.created_at)) for t in session.scalars(select(Tenant).order_by(Tenant.name))
        )


def _hash(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def issue_token(
    reg: Registry, tenant: str, *, role: str = "tenant", expires_in: timedelta | None = None
) -> IssuedToken:
    """A new bearer token for ``tenant``; the returned ``token`` is the only copy of the secret.

    ``role`` "operator" may also call the Admin service; ``expires_in`` ends the token by itself.
    """
    check_token_role(role)
    if expires_in is not None and expires_in <= timedelta(0):
        raise InvalidInput(f"a token's lifetime must be positive, got {expires_in}", field="expires_in")
    now = utcnow()
    expires_at = now + expires_in if expires_in is not None else None
    with reg.write() as session:
        owner = _tenant(session, tenant)
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        session.add(
            ApiToken(
                token_id=token_id,
                tenant_id=owner.id,
                salt=salt,
                token_hash=_hash(salt, secret),
                created_at=now,
                role=role,
                expires_at=expires_at,
            )
        )
    return IssuedToken(
        tenant=tenant,
        token_id=token_id,
        token=f"{TOKEN_PREFIX}_{token_id}_{secret}",
        role=role,
        expires_at=expires_at,
    )


# Compared against when the token id is unknown, so unknown and wrong tokens take the same time.
_DUMMY_SALT, _DUMMY_HASH = "00" * 16, "0" * 64


def authenticate_token(reg: Registry, token: str | None) -> TokenGrant:
    """What a bearer token grants; InvalidToken (never saying why) when unknown, wrong, revoked or expired."""
    if not token or not isinstance(token, str):
        raise InvalidToken("missing API token")
    prefix, _, rest = token.strip().partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not token_id or not secret:
        raise InvalidToken("invalid API token")
    with reg.read() as session:
        found = session.execute(
            select(ApiToken, Tenant.name)
            .join(Tenant, Tenant.id == ApiToken.tenant_id)
            .where(ApiToken.token_id == token_id)
        ).first()
    salt, expected = (found[0].salt, found[0].token_hash) if found else (_DUMMY_SALT, _DUMMY_HASH)
    ok = hmac.compare_digest(_hash(salt, secret), expected)
    if not found or not ok or found[0].revoked_at is not None:
        raise InvalidToken("invalid API token")
    row, tenant = found
    expires_at = utc(row.expires_at) if row.expires_at is not None else None
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidToken("invalid API token")
    return TokenGrant(tenant=tenant, role=row.role, token_id=row.token_id, expires_at=expires_at)


def resolve_token(reg: Registry, token: str | None) -> TenantRecord:
    """The tenant a bearer token belongs to; InvalidToken (never saying why) otherwise."""
    return get_tenant(reg, authenticate_token(reg, token).tenant)


def list_tokens(reg: Registry, tenant: str | None = None) -> tuple[TokenRecord, ...]:
    """Every issued token (of ``tenant``), oldest first: ids, roles and dates, never secrets or hashes."""
    query = (
        select(ApiToken, Tenant.name)
        .join(Tenant, Tenant.id == ApiToken.tenant_id)
        .order_by(ApiToken.created_at, ApiToken.id)
    )
    with reg.read() as session:
        if tenant is not None:
            query = query.where(ApiToken.tenant_id == _tenant(session, tenant).id)
        return tuple(
            TokenRecord(
                token_id=row.token_id,
                tenant=name,
                role=row.role,
                created_at=utc(row.created_at),
                expires_at=utc(row.expires_at) if row.expires_at is not None else None,
                revoked_at=utc(row.revoked_at) if row.revoked_at is not None else None,
            )
            for row, name in session.execute(query)
        )


def revoke_token(reg: Registry, token_id: str) -> None:
    with reg.write() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.token_id == token_id))
        if row is None:
            raise NotFound(f"unknown token id {token_id!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()


def token_generation(reg: Registry) -> int:
    """A number that grows with every revocation (revocations are never undone).

    Servers cache resolved tokens; they compare this cheap count at most every fraction of a
    second and drop their cache when it moved, so a revocation reaches every server sharing
    the database within that time.
    """
    with reg.read() as session:
        return int(
            session.scalar(select(func.count()).select_from(ApiToken).where(ApiToken.revoked_at.is_not(None))) or 0
        )


def _key_record(row: SigningKey, node_id: str | None) -> SigningKeyRecord:
    return SigningKeyRecord(
        key_id=row.key_id,
        public_key=row.public_key,
        algorithm=row.algorithm,
        role=row.role,
        status=row.status,
        node_id=node_id,
        created_at=utc(row.created_at),
        revoked_at=utc(row.revoked_at) if row.revoked_at else None,
    )


def add_signing_key(
    reg: Registry,
    public_key: str,
    role: str,
    *,
    node_id: str | None = None,
    key_id: str | None = None,
    algorithm: str = "ed25519",
) -> SigningKeyRecord:
    """Trust ``public_key`` (PEM or base64 text) for ``role``; ``key_id`` defaults to sha256 of the key text."""
    check_role(role)
    if not isinstance(public_key, str) or not public_key.strip():
        raise InvalidInput("public key is empty", field="public_key")
    key_id = key_id or hashlib.sha256(public_key.strip().encode()).hexdigest()
    if len(key_id) > 64:
        raise InvalidInput(f"key id {key_id!r} is longer than 64 characters", field="key_id")
    with reg.write() as session:
        node_pk = find_node(session, node_id, include_private=True).id if node_id else None
        if session.scalar(select(SigningKey.id).where(SigningKey.key_id == key_id)) is not None:
            raise Conflict(f"signing key {key_id[:16]}... is already registered")
        row = SigningKey(
            key_id=key_id,
            public_key=public_key.strip(),
            algorithm=algorithm,
            role=role,
            status="active",
            node_id=node_pk,
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        return _key_record(row, canonical_node_id(node_id) if node_id else None)


def _keys(session, query) -> tuple[SigningKeyRecord, ...]:
    rows = session.execute(query.add_columns(Node.node_id).outerjoin(Node, Node.id == SigningKey.node_id)).all()
    return tuple(_key_record(key, node_id) for key, node_id in rows)


def get_signing_key(reg: Registry, key_id: str) -> SigningKeyRecord:
    with reg.read() as session:
        found = _keys(session, select(SigningKey).where(SigningKey.key_id == key_id))
    if not found:
        raise SigningKeyNotFound(f"unknown signing key {key_id!r}")
    return found[0]


def list_signing_keys(
    reg: Registry, *, role: str | None = None, node_id: str | None = None, status: str | None = None
) -> tuple[SigningKeyRecord, ...]:
    query = select(SigningKey).order_by(SigningKey.created_at, SigningKey.id)
    if role is not None:
        query = query.where(SigningKey.role == check_role(role))
    if status is not None:
        query = query.where(SigningKey.status == status)
    with reg.read() as session:
        if node_id is not None:
            query = query.where(SigningKey.node_id == find_node(session, node_id, include_private=True).id)
        return _keys(session, query)


def revoke_signing_key(reg: Registry, key_id: str) -> SigningKeyRecord:
    with reg.write() as session:
        row = session.scalar(select(SigningKey).where(SigningKey.key_id == key_id).with_for_update())
        if row is None:
            raise SigningKeyNotFound(f"unknown signing key {key_id!r}")
        if row.status != "revoked":
            row.status, row.revoked_at = "revoked", utcnow()
            session.flush()
        node_id = session.scalar(select(Node.node_id).where(Node.id == row.node_id)) if row.node_id else None
        return _key_record(row, node_id)


def record_deployment(
    reg: Registry, node_id: str, *, trunk: str, endpoint: str, status: str = "active", version: int | None = None
) -> DeploymentRecord:
    """Say that ``endpoint`` (trunk ``trunk``) serves the node; updates the existing record for that endpoint."""
    if status not in DEPLOYMENT_STATUSES:
        raise InvalidInput(
            f"deployment status {status!r} is not one of {', '.join(DEPLOYMENT_STATUSES)}", field="status"
        )
    if not endpoint or not trunk:
        raise InvalidInput("a deployment needs a trunk and an endpoint", field="endpoint" if not endpoint else "trunk")
    with reg.write() as session:
        node = find_node(session, node_id, include_private=True)
        version_pk = find_version(session, node, version).id if version is not None else None
        row = session.scalar(select(Deployment).where(Deployment.node_id == node.id, Deployment.endpoint == endpoint))
        now = utcnow()
        if row is None:
            row = Deployment(
                node_id=node.id,
                trunk=trunk,
                endpoint=endpoint,
                status=status,
                version_id=version_pk,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
        else:
            row.trunk, row.status, row.version_id, row.updated_at = trunk, status, version_pk, now
        session.flush()
        return DeploymentRecord(node.node_id, trunk, endpoint, status, version, utc(now))


def list_deployments(reg: Registry, node_id: str | None = None) -> tuple[DeploymentRecord, ...]:
    query = (
        select(Deployment, Node.node_id, NodeVersion.version)
        .join(Node, Node.id == Deployment.node_id)
        .outerjoin(NodeVersion, NodeVersion.id == Deployment.version_id)
        .order_by(Node.node_id, Deployment.endpoint)
    )
    with reg.read() as session:
        if node_id is not None:
            query = query.where(Deployment.node_id == find_node(session, node_id, include_private=True).id)
        return tuple(
            DeploymentRecord(nid, d.trunk, d.endpoint, d.status, version, utc(d.updated_at))
            for d, nid, version in session.execute(query)
        )


def remove_deployment(reg: Registry, node_id: str, endpoint: str) -> None:
    with reg.write() as session:
        node = find_node(session, node_id, include_private=True)
        row = session.scalar(select(Deployment).where(Deployment.node_id == node.id, Deployment.endpoint == endpoint))
        if row is None:
            raise NotFound(f"node {node.node_id!r} has no deployment at {endpoint!r}")
        session.delete(row)
