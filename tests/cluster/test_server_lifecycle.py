"""Serving lifecycle: TLS, graceful shutdown, and the `treelm serve` command in a real process."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import treelm
from cluster.cli import main
from nodes.base.model import TinyBaseConfig, make_tiny_base
from nodes.runtime.engine import EngineConfig
from registry.access import list_deployments
from tests.cluster.grpc_harness import make_world, serve

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A long-context tiny base so that one stream can run for seconds."""
    root = tmp_path_factory.mktemp("grpc-lifecycle")
    base = make_tiny_base(
        root / "base", TinyBaseConfig(hidden=64, layers=2, vocab=400, heads=4, kv_heads=2, max_position=8192)
    )
    w = make_world(base, root, EngineConfig(max_batch_size=4, max_new_tokens_limit=8000))
    yield w
    w.engine.close()
    w.registry.close()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "server.crt", tmp / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)  # the server refuses a key others may read
    return cert_file, key_file


def test_tls_serves_tls_clients_only(world, tmp_path):
    cert, key = self_signed(tmp_path)
    server = serve(world, tls_cert=cert, tls_key=key)
    try:
        with treelm.Client(server.target, token=world.tokens["acme"], tls=cert.read_bytes()) as client:
            assert client.generate("rt/en", "secure", max_new_tokens=3).node == "rt/en"
        with treelm.Client(server.target, token=world.operator_token, tls=str(cert), retries=0) as client:
            assert client.status().auth_enabled
        with treelm.Client(server.target, token=world.tokens["acme"], retries=0, timeout=5) as plaintext:
            with pytest.raises(treelm.Unavailable):
                plaintext.nodes()
    finally:
        server.stop()


def test_graceful_shutdown_finishes_in_flight_streams_and_refuses_new_calls(world):
    server = serve(world, grace_s=60)
    with (
        treelm.Client(server.target, token=world.tokens["acme"], retries=0, timeout=120) as client,
        grpc.insecure_channel(server.target) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stream = client.stream("rt/en/medical", "long", max_new_tokens=3000)
        chunks = [next(stream)]
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 60})
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert list(watch) == []  # the watch ends instead of holding the grace period
        refused = None
        end = time.monotonic() + 20
        while refused is None and time.monotonic() < end:  # the listener closes right after the drain starts
            try:
                client.generate("rt/en", "too late", max_new_tokens=1)
            except treelm.Unavailable as exc:
                refused = exc
        assert refused is not None, "new calls were still accepted while draining"
        chunks.extend(stream)  # the in-flight stream runs to its end
        stopping.join(60)
    assert not stopping.is_alive()
    assert chunks[-1].finish_reason is treelm.FinishReason.LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 3000 and [c.index for c in chunks] == list(range(len(chunks)))


def _serve_process(world, *args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            str(world.tree.root),
            "--db",
            world.db_url,
            "--port",
            "0",
            "--threads",
            "1",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_treelm_serve_runs_imports_records_and_drains_on_sigterm(world):
    proc = _serve_process(world, "--metrics-port", "0", "--grace", "5")
    try:
        target = None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"serving rt on (127\.0\.0\.1:\d+)", line)
            if found:
                target = found.group(1)
                break
        assert target, "".join(lines) + proc.stderr.read()
        assert "already in" in "".join(lines)  # the harness imported the tree before
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with treelm.Client(target, token=world.tokens["globex"]) as client:
            assert client.generate("rt/fr", "x", max_new_tokens=2).node == "rt/fr"
        deployments = {d.node_id: d for d in list_deployments(world.registry) if d.endpoint == target}
        assert deployments["rt/fr"].status == "active" and len(deployments) == len(world.tree.nodes) + 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "draining" in out and "stopped" in out and "Traceback" not in err
    assert {d.status for d in list_deployments(world.registry) if d.endpoint == target} == {"stopped"}


def test_treelm_serve_warns_loudly_without_auth_and_explains_a_busy_port(world, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", str(world.tree.root), "--db", world.db_url, "--port", str(port), "--insecure-no-auth"])
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert code == 2 and "WARNING" in err and "authentication is OFF" in err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls-cert", "/nonexistent.crt"], "both --tls-cert and --tls-key"),
        (["--tls-cert", "/nonexistent.crt", "--tls-key", "/nonexistent.key"], "is not a file"),
        (["--port", "70000"], "port must be a port number"),
        (["--threads", "0"], "--threads"),
        (["--max-batch", "0"], "max_batch_size"),
        (["--db", "sqlite:////nonexistent-dir/none.db"], "treelm registry init"),
    ],
)
def test_treelm_serve_rejects_bad_options_with_exit_2(world, capsys, args, message):
    code = main(["serve", str(world.tree.root), "--db", world.db_url, *args])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and message in err and "Traceback" not in err


def test_treelm_serve_needs_a_built_tree(world, tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--db", world.db_url]) == 2
    assert "not a built tree" in " ".join(capsys.readouterr().err.split())
