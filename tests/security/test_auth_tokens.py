"""Tokens as an attacker holds them, against real servers on 127.0.0.1: a revoked token stops
working within a second on every server sharing the registry, an expired token is refused, and
only an operator token reads the Admin service."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import openai
import pytest

import treelm
from registry.access import issue_token, revoke_token
from tests.cluster.grpc_harness import PRIVATE, make_world, serve
from tests.cluster.http_harness import openai_client

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("sec-auth"))
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def servers(world):
    """Two servers over one registry database, as the ingresses of a Ray cluster are."""
    first, second = serve(world, http_port=0), serve(world)
    yield first, second
    first.stop()
    second.stop()


def _refused_after(call, started: float, limit_s: float = 5.0) -> float:
    """Seconds from ``started`` until ``call`` raises Unauthenticated (polling as fast as it answers)."""
    while time.monotonic() - started < limit_s:
        try:
            call()
        except treelm.Unauthenticated:
            return time.monotonic() - started
    raise AssertionError(f"still accepted {limit_s} s after revocation")


def test_a_revoked_token_is_refused_within_a_second_on_every_server(world, servers):
    issued = issue_token(world.registry, "acme")
    clients = [treelm.Client(s.target, token=issued.token, retries=0, timeout=10) for s in servers]
    try:
        for client in clients:  # warm both servers' token caches
            assert PRIVATE in {n.id for n in client.nodes()}
        revoke_token(world.registry, issued.token_id)  # what `treelm registry token revoke` does
        started = time.monotonic()
        delays = [_refused_after(client.nodes, started) for client in clients]
    finally:
        for client in clients:
            client.close()
    print(f"revocation delay: {', '.join(f'{d * 1000:.0f} ms' for d in delays)} (server 1, server 2)")
    assert max(delays) <= 1.0
    with treelm.Client(servers[0].target, token=issued.token, retries=0) as client:  # and it stays refused
        with pytest.raises(treelm.Unauthenticated, match="not valid"):
            client.generate("rt/en", "x", max_new_tokens=1)


def test_revocation_reaches_the_openai_api_too(world, servers):
    issued = issue_token(world.registry, "acme")
    client = openai_client(servers[0].server.http_url, issued.token)
    assert PRIVATE in {m.id for m in client.models.list()}
    revoke_token(world.registry, issued.token_id)
    time.sleep(1.0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_an_expired_token_is_refused_even_from_the_cache(world, servers):
    issued = issue_token(world.registry, "globex", expires_in=timedelta(seconds=1.5))
    assert issued.expires_at is not None
    with treelm.Client(servers[0].target, token=issued.token, retries=0) as client:
        assert client.generate("rt/en", "still valid", max_new_tokens=2).node == "rt/en"  # cached from here on
        time.sleep(max(0.0, (issued.expires_at - datetime.now(UTC)).total_seconds()) + 0.2)
        with pytest.raises(treelm.Unauthenticated):
            client.generate("rt/en", "expired", max_new_tokens=2)
    with treelm.Client(servers[1].target, token=issued.token, retries=0) as fresh:  # never cached there
        with pytest.raises(treelm.Unauthenticated):
            fresh.nodes()


def test_admin_status_needs_an_operator_token(world, servers):
    target = servers[0].target
    with treelm.Client(target, token=world.tokens["acme"], retries=0) as tenant:
        tenant.generate(PRIVATE, "warm", max_new_tokens=2)  # acme's private adapter is loaded now
        with pytest.raises(treelm.PermissionDenied, match="operator token"):
            tenant.status()
    with treelm.Client(target, token=world.tokens["globex"], retries=0) as other:
        with pytest.raises(treelm.PermissionDenied):
            other.status()
    with treelm.Client(target, retries=0) as anonymous:
        with pytest.raises(treelm.Unauthenticated):
            anonymous.status()
    with treelm.Client(target, token=world.operator_token, retries=0) as operator:
        status = operator.status()
    assert status.tenant == "ops" and status.auth_enabled
    assert PRIVATE in status.trunks[0].loaded_adapters  # operators see every loaded adapter
