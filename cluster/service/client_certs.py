"""Mutual TLS: a client certificate's subject may stand for a tenant (``--tls-client-tenants FILE``).

The file is a YAML mapping from a certificate subject to a tenant::

    hospital-gateway: st-marys                      # the subject's common name (CN)
    "CN=lab,OU=Pathology,O=St Marys": st-marys      # or a whole RFC 4514 subject (it has an '=')

A whole subject is written as RFC 4514 prints it (most specific first, no spaces after the
commas: what ``openssl x509 -noout -subject -nameopt RFC2253`` shows) and compared in
cryptography's canonical form; it wins over a common name. A call whose
verified certificate maps to a tenant and that carries no token is that tenant's (role tenant);
one whose token belongs to another tenant is refused UNAUTHENTICATED; a certificate that maps to
nothing changes nothing. gRPC gives the verified peer certificate in the call's auth context;
uvicorn's TLS transport gives it per connection (see :func:`peer_aware_protocol`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from cluster.errors import ServeError

if TYPE_CHECKING:
    import grpc

__all__ = ["PEER_CERTIFICATE", "ClientTenants", "grpc_peer_certificate", "http_peer_certificate", "peer_aware_protocol"]

# Where an HTTP request's ASGI scope["state"] holds the DER of its connection's client certificate.
PEER_CERTIFICATE = "treelm.peer_certificate"
_MAX_ENTRIES = 100_000  # a mapping file is configuration, not data: bound what it may make us hold


def _canonical(subject: str) -> str:
    """An RFC 4514 subject in one spelling (cryptography's), for comparison."""
    return x509.Name.from_rfc4514_string(subject).rfc4514_string()


@dataclass(frozen=True)
class ClientTenants:
    """Certificate subject -> tenant: whole subjects (canonical RFC 4514) and common names."""

    by_subject: Mapping[str, str] = field(default_factory=dict)
    by_common_name: Mapping[str, str] = field(default_factory=dict)
    _seen: dict[bytes, str | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> ClientTenants:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
            raise ServeError(f"cannot read the client certificate tenants {path}: {exc}") from None
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "client certificate tenants") -> ClientTenants:
        if not isinstance(data, dict) or not data or len(data) > _MAX_ENTRIES:
            raise ServeError(f"{source}: expected a mapping of certificate subject (CN or RFC 4514) -> tenant")
        subjects: dict[str, str] = {}
        names: dict[str, str] = {}
        for key, tenant in data.items():
            if not isinstance(key, str) or not key.strip() or not isinstance(tenant, str) or not tenant.strip():
                raise ServeError(f"{source}: {str(key)[:80]!r}: subjects and tenants are non-empty strings")
            if "=" in key:
                try:
                    subjects[_canonical(key)] = tenant
                except ValueError:
                    raise ServeError(
                        f"{source}: {key[:80]!r} is not an RFC 4514 subject (like CN=lab,O=St Marys)"
                    ) from None
            else:
                names[key] = tenant
        return cls(subjects, names)

    @property
    def tenants(self) -> set[str]:
        return {*self.by_subject.values(), *self.by_common_name.values()}

    def tenant_of(self, certificate: bytes | None) -> str | None:
        """The tenant a client certificate (PEM or DER bytes, as verified by TLS) maps to, or None."""
        if not certificate:
            return None
        if certificate in self._seen:
            return self._seen[certificate]
        tenant = self._lookup(certificate)
        if len(self._seen) >= 1024:  # a client brings one certificate per connection: keep a few
            self._seen.clear()
        self._seen[certificate] = tenant
        return tenant

    def _lookup(self, certificate: bytes) -> str | None:
        try:
            if certificate.lstrip().startswith(b"-----BEGIN"):
                subject = x509.load_pem_x509_certificate(certificate).subject
            else:
                subject = x509.load_der_x509_certificate(certificate).subject
        except ValueError:  # TLS verified it already; one we cannot parse maps to nobody
            return None
        tenant = self.by_subject.get(subject.rfc4514_string())
        if tenant is not None:
            return tenant
        for attribute in subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value if isinstance(attribute.value, str) else attribute.value.decode("utf-8", "replace")
            if value in self.by_common_name:
                return self.by_common_name[value]
        return None


def grpc_peer_certificate(context: grpc.aio.ServicerContext) -> bytes | None:
    """The client certificate (PEM) grpc verified for this call; None without mutual TLS."""
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    return pem[0] if pem else None


def http_peer_certificate(state: Mapping[str, Any] | None) -> bytes | None:
    """The client certificate (DER) of an HTTP request's connection, from its ASGI scope's state."""
    der = (state or {}).get(PEER_CERTIFICATE)
    return der if isinstance(der, bytes) and der else None


def peer_aware_protocol(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class ``base``, which also puts the connection's verified client
    certificate (DER) into every request's ``scope["state"]``.

    uvicorn builds each request's scope["state"] from its protocol's ``app_state``; the TLS
    handshake is over when ``connection_made`` runs, so the certificate is known there and is
    added to this connection's own copy (never to the dict shared by all connections).
    """

    class PeerAwareProtocol(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der:
                shared: dict[str, Any] = getattr(self, "app_state", {})
                self.app_state = {**shared, PEER_CERTIFICATE: der}
            super().connection_made(transport)

    return PeerAwareProtocol
