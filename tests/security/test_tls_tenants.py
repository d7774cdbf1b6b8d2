"""Mutual TLS with `--tls-client-tenants`: a client certificate whose subject maps to a tenant
authenticates calls without a token as that tenant, a token of another tenant over that
certificate is refused (UNAUTHENTICATED / 401), and an unmapped certificate changes nothing -- on
real servers (gRPC and the OpenAI HTTP API) with real certificates."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest

import treelm
from cluster.errors import ServeError
from cluster.service.client_certs import ClientTenants
from cluster.service.server import ServerConfig, TreeServer
from tests.cluster.grpc_harness import serve
from tests.security.certs import issue, make_ca

pytestmark = pytest.mark.timeout(300)

PRIVATE = "rt/en/legal/contracts"  # acme's private node in the random tree


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki-tenants")
    ca = make_ca(folder / "ca")
    tenants = folder / "tenants.yaml"
    tenants.write_text('hospital: acme\n"CN=lab": globex\n')  # a common name, and a whole subject
    return {
        "ca": ca.cert,
        "server": issue(ca, folder, "server", server=True),
        "hospital": issue(ca, folder, "hospital", server=False),
        "lab": issue(ca, folder, "lab", server=False),
        "visitor": issue(ca, folder, "visitor", server=False),
        "tenants": tenants,
    }


@pytest.fixture(scope="module")
def server(world, pki):
    config = {"tls_cert": pki["server"].cert, "tls_key": pki["server"].key, "tls_client_ca": pki["ca"]}
    running = serve(world, http_port=0, tls_client_tenants=pki["tenants"], **config)
    yield running
    running.stop()


def _client(server, pki, who: str, token: str | None = None) -> treelm.Client:
    cert = pki[who]
    return treelm.Client(
        server.target, token=token, tls=pki["ca"], client_cert=cert.cert, client_key=cert.key, retries=0, timeout=30
    )


def _ids(client: treelm.Client) -> set[str]:
    return {n.id for n in client.nodes()}


def test_a_mapped_certificate_is_its_tenant_without_a_token(server, pki, world):
    with _client(server, pki, "hospital") as hospital, _client(server, pki, "hospital", world.tokens["acme"]) as acme:
        assert PRIVATE in _ids(hospital) and _ids(hospital) == _ids(acme)  # acme's private node too
        assert hospital.generate(PRIVATE, "by certificate", max_new_tokens=2).node == PRIVATE
    with _client(server, pki, "lab") as lab:  # mapped by its whole RFC 4514 subject, to globex
        assert PRIVATE not in _ids(lab)
        with pytest.raises(treelm.NotFound):
            lab.generate(PRIVATE, "not globex's", max_new_tokens=2)


def test_a_token_of_another_tenant_over_a_mapped_certificate_is_refused(server, pki, world):
    for token in (world.tokens["globex"], world.operator_token):  # an operator's tenant is "ops", not acme
        with _client(server, pki, "hospital", token) as mixed:
            with pytest.raises(treelm.Unauthenticated, match="another tenant"):
                mixed.nodes()
    with _client(server, pki, "hospital", "not-a-token") as forged:
        with pytest.raises(treelm.Unauthenticated):
            forged.nodes()


def test_an_unmapped_certificate_still_needs_a_token(server, pki, world):
    with _client(server, pki, "visitor") as anonymous:
        with pytest.raises(treelm.Unauthenticated):
            anonymous.nodes()
    with _client(server, pki, "visitor", world.tokens["globex"]) as globex:
        assert PRIVATE not in _ids(globex)


def _get(server, pki, who: str, path: str, token: str | None = None) -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki[who].cert), str(pki[who].key))
    port = server.server.http_port
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_the_openai_api_maps_certificates_the_same_way(server, pki, world):
    status, body = _get(server, pki, "hospital", "/v1/models")
    assert status == 200 and PRIVATE in {m["id"] for m in body["data"]}
    status, body = _get(server, pki, "hospital", "/v1/models", world.tokens["acme"])
    assert status == 200 and PRIVATE in {m["id"] for m in body["data"]}
    status, body = _get(server, pki, "lab", "/v1/models")
    assert status == 200 and PRIVATE not in {m["id"] for m in body["data"]}
    status, body = _get(server, pki, "hospital", "/v1/models", world.tokens["globex"])
    assert status == 401 and "another tenant" in body["error"]["message"]
    status, body = _get(server, pki, "visitor", "/v1/models")
    assert status == 401
    status, body = _get(server, pki, "visitor", "/v1/models", world.tokens["acme"])
    assert status == 200 and PRIVATE in {m["id"] for m in body["data"]}


def test_a_bad_mapping_is_refused_at_start(world, pki, tmp_path):
    tls = {"tls_cert": pki["server"].cert, "tls_key": pki["server"].key}
    with pytest.raises(ServeError, match="needs --tls-client-ca"):
        ServerConfig(tls_client_tenants=pki["tenants"], **tls)
    for text, message in (
        ("- a list\n", "expected a mapping"),
        ("hospital: [acme]\n", "non-empty strings"),
        ('"CN=lab,=x": acme\n', "not an RFC 4514 subject"),
        ("a: [unclosed\n", "cannot read"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ServeError, match=message):
            ClientTenants.load(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("hospital: nobody-we-know\n")
    config = ServerConfig(port=0, tls_client_ca=pki["ca"], tls_client_tenants=unknown, **tls)
    with pytest.raises(ServeError, match="no such tenant in the registry: nobody-we-know"):
        TreeServer([], world.catalog(), config)
