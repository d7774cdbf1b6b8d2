"""Mutual TLS against real servers: `treelm serve --tls-client-ca` refuses clients without a
certificate its CA signed (gRPC and the OpenAI HTTP API), serves those with one, and the update
CLI reaches such a server with --ca/--client-cert/--client-key and a token from a file or the
environment."""

from __future__ import annotations

import json
import ssl

import openai
import pytest

import treelm
from cluster.cli import main
from cluster.errors import ServeError
from cluster.service.catalog import Catalog
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.updates.package import write_package
from nodes.runtime.engine import Engine, EngineConfig
from registry.access import issue_token
from tests.cluster import grpc_harness
from tests.cluster.grpc_harness import ServerThread, serve
from tests.cluster.update_world import built_tree, honest_adapter, make_world, package_of
from tests.security.certs import issue, make_ca

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = make_ca(folder / "ca"), make_ca(folder / "rogue", "someone else's CA")
    return {
        "ca": ca.cert,
        "server": issue(ca, folder, "server", server=True),
        "client": issue(ca, folder, "hospital", server=False),
        "rogue": issue(rogue, folder, "intruder", server=False),
    }


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = grpc_harness.make_world(tiny_base_dir, tmp_path_factory.mktemp("sec-tls"))
    yield w
    w.engine.close()
    w.registry.close()


def _mtls(pki) -> dict:
    return {"tls_cert": pki["server"].cert, "tls_key": pki["server"].key, "tls_client_ca": pki["ca"]}


def test_grpc_needs_a_client_certificate_signed_by_the_servers_ca(world, pki):
    server = serve(world, **_mtls(pki))
    token, ca = world.tokens["acme"], pki["ca"]
    try:
        with treelm.Client(server.target, token=token, tls=ca, retries=0, timeout=10) as anonymous_tls:
            with pytest.raises(treelm.Unavailable):
                anonymous_tls.nodes()
        rogue = pki["rogue"]
        with treelm.Client(
            server.target, token=token, tls=ca, client_cert=rogue.cert, client_key=rogue.key, retries=0, timeout=10
        ) as intruder:
            with pytest.raises(treelm.Unavailable):
                intruder.nodes()
        client = pki["client"]
        with treelm.Client(
            server.target, token=token, tls=str(ca), client_cert=client.cert, client_key=client.key.read_bytes()
        ) as hospital:
            assert hospital.generate("rt/en", "over mutual TLS", max_new_tokens=3).node == "rt/en"
        with treelm.Client(
            server.target, tls=ca, client_cert=client.cert, client_key=client.key, retries=0
        ) as no_token:  # the certificate opens the connection; the token still decides who calls
            with pytest.raises(treelm.Unauthenticated):
                no_token.nodes()
    finally:
        server.stop()


async def test_the_async_client_presents_a_client_certificate(world, pki):
    server = serve(world, **_mtls(pki))
    client = pki["client"]
    try:
        async with treelm.AsyncClient(
            server.target, token=world.tokens["acme"], tls=pki["ca"], client_cert=client.cert, client_key=client.key
        ) as hospital:
            assert (await hospital.generate("rt/en", "async over mutual TLS", max_new_tokens=2)).node == "rt/en"
    finally:
        server.stop()


def test_client_certificate_arguments_are_checked(pki):
    client = pki["client"]
    with pytest.raises(ValueError, match="both client_cert and client_key"):
        treelm.Client("127.0.0.1:1", tls=pki["ca"], client_cert=client.cert)
    with pytest.raises(TypeError, match="client_key"):
        treelm.Client("127.0.0.1:1", client_cert=client.cert, client_key=42)  # type: ignore[arg-type]


def _openai(url: str, token: str, ca, cert=None):
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return openai.OpenAI(
        base_url=url, api_key=token, max_retries=0, http_client=openai.DefaultHttpx2Client(verify=context)
    )


def test_the_openai_api_needs_a_client_certificate_too(world, pki):
    server = serve(world, http_port=0, **_mtls(pki))
    url, token = server.server.http_url, world.tokens["acme"]
    try:
        assert url is not None and url.startswith("https://")
        with pytest.raises(openai.APIConnectionError):
            _openai(url, token, pki["ca"]).models.list()
        with pytest.raises(openai.APIConnectionError):
            _openai(url, token, pki["ca"], pki["rogue"]).models.list()
        assert "rt/en" in {m.id for m in _openai(url, token, pki["ca"], pki["client"]).models.list()}
    finally:
        server.stop()


def test_a_client_ca_without_tls_or_that_is_missing_is_refused_at_start(pki, tmp_path):
    with pytest.raises(ServeError, match="needs TLS"):
        ServerConfig(tls_client_ca=pki["ca"])
    with pytest.raises(ServeError, match="is not a file"):
        ServerConfig(tls_cert=pki["server"].cert, tls_key=pki["server"].key, tls_client_ca=tmp_path / "none.pem")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_update_cli_submits_and_reads_status_over_mutual_tls(pki, tmp_path_factory, tmp_path, capsys, monkeypatch):
    w = make_world(tmp_path_factory.mktemp("sec-tls-updates"), built_tree(tmp_path_factory))
    engine = Engine(w.coordinator.tree.base_dir, w.tree, EngineConfig(max_batch_size=4))
    w.coordinator.on_snapshot(engine.use_tree)
    config = ServerConfig(port=0, **_mtls(pki))
    server = ServerThread(lambda: TreeServer([EngineTrunk(engine)], Catalog(w.registry), config, updates=w.coordinator))
    made, _ = package_of(w, "en/medical/radiology", honest_adapter(w, "en/medical/radiology"))
    package = write_package(tmp_path / "rad", made.envelope, made.files)
    token = issue_token(w.registry, "st-marys").token
    client = pki["client"]
    tls = ["--ca", str(pki["ca"]), "--client-cert", str(client.cert), "--client-key", str(client.key)]
    remote = ["--server", f"127.0.0.1:{server.server.port}"]
    try:
        monkeypatch.setenv("TREELM_TOKEN", token)  # the token from the environment: not in argv
        code, out, err = _cli(capsys, "update", "submit", str(package), *remote, *tls, "--json")
        assert code == 0, err
        submitted = json.loads(out)
        assert submitted["node"] == "ut/en/medical/radiology" and submitted["version"] == 2
        monkeypatch.delenv("TREELM_TOKEN")
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        status = ["update", "status", submitted["update_id"], *remote, "--token-file", str(token_file), "--json"]
        code, out, err = _cli(capsys, *status, *tls)
        assert code == 0 and json.loads(out)["update_id"] == submitted["update_id"], err
        code, _, err = _cli(capsys, *status, "--ca", str(pki["ca"]))  # TLS, but no client certificate
        assert code == 2 and "UNAVAILABLE" in err
        code, _, err = _cli(capsys, *status)  # plaintext to a TLS server
        assert code == 2 and "UNAVAILABLE" in err
        code, _, err = _cli(capsys, *status, *tls, "--token", token)
        assert code == 2 and "not both" in err
        (tmp_path / "empty").write_text("")
        code, _, err = _cli(capsys, *status[:-3], "--token-file", str(tmp_path / "empty"), *tls)
        assert code == 2 and "one token on one line" in err
    finally:
        server.stop()
        engine.close()
        w.close()
