"""Update uploads as an attacker sends them, against a real server: refused from the first chunk
when the envelope is bad or declares too much, never past the sizes it declares, one tenant's
concurrent uploads bounded, idle streams aborted, and nothing left in the spool afterwards; a
valid package still goes through the whole update flow from the spool."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

import treelm
from cluster.service.catalog import Catalog
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.service.uploads import UploadLimits
from cluster.updates.make import adapter_files
from cluster.updates.package import Package, write_package
from hierarchy.updates.envelope import Envelope, Signature
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import sign_manifest
from nodes.runtime.engine import Engine, EngineConfig
from protos.treelm.v1 import updates_pb2, updates_pb2_grpc
from registry.access import create_tenant, issue_token
from tests.cluster.grpc_harness import ServerThread
from tests.cluster.update_world import TREE, built_tree, honest_adapter, make_world, manifest_for, stored_state

pytestmark = pytest.mark.timeout(300)

S = grpc.StatusCode
ONC = "en/medical/oncology"  # private to st-marys
MIB = 1 << 20
LIMITS = UploadLimits(max_file_bytes=8 * MIB, max_spool_bytes=64 * MIB, per_tenant=2, idle_s=3.0)
CHUNKS = 64  # what a hostile stream offers: 64 x 1 MiB after the envelope


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("upload-spool"), built_tree(tmp_path_factory))
    create_tenant(w.registry, "globex")
    tokens = {t: issue_token(w.registry, t).token for t in ("st-marys", "globex")}
    engine = Engine(w.coordinator.tree.base_dir, w.tree, EngineConfig(max_batch_size=4))
    w.coordinator.on_snapshot(engine.use_tree)
    spool = w.folder / "spool"
    config = ServerConfig(port=0, uploads=LIMITS, spool_dir=spool)
    server = ServerThread(lambda: TreeServer([EngineTrunk(engine)], Catalog(w.registry), config, updates=w.coordinator))
    channel = grpc.insecure_channel(server.target)
    stub = updates_pb2_grpc.UpdatesStub(channel)
    yield w, server, stub, tokens, spool
    channel.close()
    server.stop()
    engine.close()
    w.close()


class Stream:
    """A Submit stream that counts what the server took from it (the client sends only what gRPC pulls)."""

    def __init__(self, first: updates_pb2.SubmitChunk, rest: Iterator[updates_pb2.SubmitChunk]):
        self.first, self.rest, self.sent = first, rest, 0

    def __iter__(self) -> Iterator[updates_pb2.SubmitChunk]:
        yield self.first
        for chunk in self.rest:
            self.sent += 1
            yield chunk


def _junk(file: str = "adapter_model.safetensors", n: int = CHUNKS) -> Iterator[updates_pb2.SubmitChunk]:
    piece = b"\0" * MIB
    for _ in range(n):
        yield updates_pb2.SubmitChunk(file=file, data=piece)


@pytest.fixture(scope="module")
def adapter(setup):
    """One honest oncology adapter (training one takes seconds; every refusal reuses it)."""
    return honest_adapter(setup[0], ONC)


def _meta(tokens, tenant: str = "st-marys"):
    return [("authorization", f"Bearer {tokens[tenant]}")]


def _first(envelope: Envelope, node: str = f"{TREE}/{ONC}") -> updates_pb2.SubmitChunk:
    return updates_pb2.SubmitChunk(node=node, envelope=envelope.to_bytes())


def _kind(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("treelm-error-kind")


def _refused(stub, tokens, stream, tenant: str = "st-marys") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Submit(iter(stream), metadata=_meta(tokens, tenant), timeout=60)
    return info.value


def _signed(w, adapter, files: dict[str, bytes], signers: list[SigningKey] | None = None) -> Envelope:
    manifest = manifest_for(w, ONC, adapter, files)
    return sign_manifest(manifest, signers if signers is not None else [w.keys.nodes[ONC]])


def _spool_is_empty(spool) -> bool:
    deadline = time.monotonic() + 5  # the handler's cleanup runs as its call ends
    while any(spool.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(spool.iterdir())


def test_the_spool_is_private_to_the_server(setup):
    _, _, _, _, spool = setup
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700


def test_an_unknown_key_is_refused_on_the_first_chunk_without_taking_the_payload(setup, adapter):
    w, _, stub, tokens, spool = setup
    before = stored_state(w)
    stranger = SigningKey.generate()
    stream = Stream(_first(_signed(w, adapter, adapter_files(adapter), [stranger])), _junk())
    error = _refused(stub, tokens, stream)
    assert error.code() == S.PERMISSION_DENIED and _kind(error) == "unknown-key"
    assert stream.sent < CHUNKS // 4, f"the server took {stream.sent} MiB of a payload it had refused"
    assert _spool_is_empty(spool) and stored_state(w) == before


def test_a_forged_signature_is_refused_on_the_first_chunk(setup, adapter):
    w, _, stub, tokens, spool = setup
    before = stored_state(w)
    envelope = _signed(w, adapter, adapter_files(adapter))
    forged = Envelope(envelope.payload_type, envelope.payload, (Signature(envelope.signatures[0].keyid, b"\1" * 64),))
    stream = Stream(_first(forged), _junk())
    error = _refused(stub, tokens, stream)
    assert error.code() == S.PERMISSION_DENIED and _kind(error) == "threshold"
    assert stream.sent < CHUNKS // 4
    assert _spool_is_empty(spool) and stored_state(w) == before


def test_a_package_declaring_more_than_the_file_limit_is_refused_before_its_payload(setup, adapter):
    w, _, stub, tokens, spool = setup
    before = stored_state(w)
    files = {**adapter_files(adapter), "padding.bin": b"\0" * (LIMITS.max_file_bytes + 1)}
    stream = Stream(_first(_signed(w, adapter, files)), _junk("padding.bin"))
    error = _refused(stub, tokens, stream)
    assert error.code() == S.INVALID_ARGUMENT and _kind(error) == "package"
    assert "padding.bin" in error.details() and f"at most {LIMITS.max_file_bytes}" in error.details()
    assert stream.sent < CHUNKS // 4
    assert _spool_is_empty(spool) and stored_state(w) == before


def test_bytes_past_a_declared_length_or_an_unsigned_file_are_refused_at_once(setup, adapter):
    w, _, stub, tokens, spool = setup
    before = stored_state(w)
    envelope = _signed(w, adapter, adapter_files(adapter))
    longer = Stream(_first(envelope), _junk())  # the manifest signs a few KiB; 64 MiB follow
    error = _refused(stub, tokens, longer)
    assert error.code() == S.INVALID_ARGUMENT and _kind(error) == "length-mismatch"
    assert longer.sent < CHUNKS // 4
    unsigned = Stream(_first(envelope), _junk("extra.bin"))
    error = _refused(stub, tokens, unsigned)
    assert error.code() == S.INVALID_ARGUMENT and _kind(error) == "unexpected-file"
    assert unsigned.sent < CHUNKS // 4
    assert _spool_is_empty(spool) and stored_state(w) == before


def _held(stub, tokens, tenant: str, release: threading.Event):
    """A Submit of ``tenant`` that sends nothing until ``release`` is set (then ends empty)."""

    def chunks():
        release.wait(30)
        yield from ()

    return stub.Submit.future(chunks(), metadata=_meta(tokens, tenant), timeout=60)


def _wait_for(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_one_tenant_has_at_most_its_concurrent_uploads_and_another_tenant_is_not_held_up(setup, adapter):
    w, _, stub, tokens, spool = setup
    bad = _signed(w, adapter, adapter_files(adapter), [SigningKey.generate()])  # before the idle clock runs
    release = threading.Event()
    held = [_held(stub, tokens, "st-marys", release) for _ in range(LIMITS.per_tenant)]
    try:
        _wait_for(lambda: len(list(spool.iterdir())) == LIMITS.per_tenant)
        error = _refused(stub, tokens, Stream(_first(bad), _junk(n=1)))
        assert error.code() == S.RESOURCE_EXHAUSTED and _kind(error) == "upload-refused"
        assert f"{LIMITS.per_tenant} upload(s) of this tenant" in error.details()
        # globex is not counted against st-marys: its stream gets as far as the envelope check
        # (oncology is private to st-marys, so globex's answer is the private node's NOT_FOUND).
        error = _refused(stub, tokens, Stream(_first(bad), _junk(n=1)), tenant="globex")
        assert error.code() == S.NOT_FOUND
    finally:
        release.set()
    for call in held:
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == S.INVALID_ARGUMENT and "stream was empty" in info.value.details()
    # the slots are free again
    error = _refused(stub, tokens, Stream(_first(bad), _junk(n=1)))
    assert error.code() == S.PERMISSION_DENIED
    assert _spool_is_empty(spool)


def test_a_stream_that_goes_idle_is_aborted_and_its_spool_removed(setup, adapter):
    w, _, stub, tokens, spool = setup
    before = stored_state(w)
    files = adapter_files(adapter)
    envelope = _signed(w, adapter, files)
    name, data = "adapter_model.safetensors", files["adapter_model.safetensors"]
    release = threading.Event()

    def stalls():
        yield _first(envelope)
        yield updates_pb2.SubmitChunk(file=name, data=data[: len(data) // 2])  # half a file, then nothing
        release.wait(30)

    start = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(stalls(), metadata=_meta(tokens), timeout=60)
    finally:
        release.set()
    took = time.monotonic() - start
    assert info.value.code() == S.DEADLINE_EXCEEDED and _kind(info.value) == "upload-idle"
    assert LIMITS.idle_s <= took < LIMITS.idle_s + 10
    assert _spool_is_empty(spool) and stored_state(w) == before


def test_a_stream_that_never_sends_is_aborted_at_the_idle_deadline(setup):
    _, _, stub, tokens, spool = setup
    release = threading.Event()
    call = _held(stub, tokens, "globex", release)
    try:
        with pytest.raises(grpc.RpcError) as info:
            call.result(timeout=LIMITS.idle_s + 10)
    finally:
        release.set()
    assert info.value.code() == S.DEADLINE_EXCEEDED
    assert _spool_is_empty(spool)


def test_a_valid_package_goes_through_the_whole_flow_from_the_spool(setup, adapter, tmp_path):
    w, _, _, tokens, spool = setup
    files = adapter_files(adapter)
    envelope = _signed(w, adapter, files)
    package = write_package(tmp_path / "onc", envelope, Package(envelope, files).files)
    client = treelm.Client(setup[1].target, token=tokens["st-marys"], retries=0, timeout=300)
    try:
        status = client.submit_update(package)
        assert (status.kind, status.node, status.version, status.state) == ("package", f"{TREE}/{ONC}", 2, "aggregated")
        assert status.figures["gate.passed"] == 1.0 and status.candidate_id
        assert client.generate(f"{TREE}/{ONC}", "The tumour", max_new_tokens=2, temperature=0).node_version == 2
    finally:
        client.close()
    assert _spool_is_empty(spool)


def test_a_crashed_servers_leftovers_are_removed_at_start_and_a_live_ones_kept(tmp_path):
    from cluster.service.uploads import UploadSpool

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"{dead.pid}-crashed").mkdir()
    (tmp_path / f"{dead.pid}-crashed" / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / f"{os.getppid()}-live").mkdir()  # another server sharing the directory, still running
    (tmp_path / "stray.tmp").write_bytes(b"")
    spool = UploadSpool(tmp_path, LIMITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{os.getppid()}-live"]
    assert spool.entries() == []
