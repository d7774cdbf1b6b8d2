"""Updates over gRPC through the SDK: Submit (streamed), GetStatus, Approve, Rollback, each refusal
with its precise status code and `treelm-error-kind`, private nodes invisible to other tenants,
and the server's engine serving the new snapshot as soon as a version becomes stable."""

from __future__ import annotations

import json

import grpc
import pytest

import treelm
from cluster.service.catalog import Catalog
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.updates.package import Package, write_package
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import SigningKey
from nodes.runtime.engine import Engine, EngineConfig
from registry.access import create_tenant, issue_token
from tests.cluster.grpc_harness import ServerThread
from tests.cluster.update_world import (
    TREE,
    built_tree,
    combine,
    honest_adapter,
    make_world,
    package_of,
    served,
    stored_state,
)

S = grpc.StatusCode
RAD, ONC, MED = "en/medical/radiology", "en/medical/oncology", "en/medical"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("grpc-updates"), built_tree(tmp_path_factory))
    create_tenant(w.registry, "globex")
    tokens = {t: issue_token(w.registry, t).token for t in ("st-marys", "globex")}
    engine = Engine(w.coordinator.tree.base_dir, w.tree, EngineConfig(max_batch_size=4))
    w.coordinator.on_snapshot(engine.use_tree)
    server = ServerThread(
        lambda: TreeServer([EngineTrunk(engine)], Catalog(w.registry), ServerConfig(port=0), updates=w.coordinator)
    )
    clients = {t: treelm.Client(server.target, token=tok, retries=0, timeout=300) for t, tok in tokens.items()}
    yield w, server, clients, tmp_path_factory.mktemp("grpc-packages")
    for c in clients.values():
        c.close()
    server.stop()
    engine.close()
    w.close()


def _write(folder, name: str, package: Package):
    return write_package(folder / name, package.envelope, package.files)


def test_submit_status_approve_and_the_engine_serves_the_new_version(setup):
    w, _, clients, folder = setup
    hospital = clients["st-marys"]
    before = hospital.generate(f"{TREE}/{ONC}", "The tumour", max_new_tokens=2, temperature=0)
    assert before.node_version == 1
    package = _write(folder, "onc", package_of(w, ONC, honest_adapter(w, ONC))[0])
    status = hospital.submit_update(package)
    assert (status.kind, status.node, status.version, status.state) == ("package", f"{TREE}/{ONC}", 2, "aggregated")
    assert status.figures["gate.passed"] == 1.0 and status.candidate_id
    # The node's own new version is served at once (its key signed it; it passed screening and the gate).
    assert hospital.generate(f"{TREE}/{ONC}", "The tumour", max_new_tokens=2, temperature=0).node_version == 2

    candidate = hospital.update_status(status.candidate_id)
    manifest = candidate.manifest()
    assert (candidate.kind, candidate.state, candidate.approvals_needed) == ("candidate", "awaiting-approval", 2)
    assert manifest["node"] == f"{TREE}/{MED}" and manifest["version"] == 2 and manifest["parent_version"] == 1
    with pytest.raises(treelm.PermissionDenied) as info:  # a node key may not approve
        hospital.approve(status.candidate_id, w.keys.nodes[ONC])
    assert info.value.code == S.PERMISSION_DENIED and info.value.kind == "approval-rejected"
    assert hospital.approve(status.candidate_id, w.keys.evaluators[MED]).approvals == 1
    done = hospital.approve(status.candidate_id, w.keys.operator)
    assert done.state == "stable" and done.approvals == 2
    assert hospital.node(f"{TREE}/{MED}").stable_version == 2
    # The engine switched snapshot: radiology is now served over en/medical v2.
    chain = [n.version for n in setup[0].coordinator.served_tree().chain(f"{TREE}/{RAD}")]
    assert chain == [1, 2, 1]
    with pytest.raises(treelm.FailedPrecondition) as info:  # approving twice: no longer awaiting approval
        hospital.approve(status.candidate_id, w.keys.operator)
    assert info.value.code == S.FAILED_PRECONDITION and info.value.kind == "not-awaiting-approval"


def test_private_nodes_and_their_updates_do_not_exist_for_other_tenants(setup):
    w, _, clients, folder = setup
    package = _write(folder, "onc-other", package_of(w, ONC, honest_adapter(w, ONC, seed=5))[0])
    before = stored_state(w)
    with pytest.raises(treelm.NodeNotFound):
        clients["globex"].submit_update(package)
    some_update = w.coordinator.updates(node=f"{TREE}/{ONC}")[0].update_id
    with pytest.raises(treelm.NotFound) as info:
        clients["globex"].update_status(some_update)
    with pytest.raises(treelm.NotFound) as made_up:
        clients["globex"].update_status("0" * 32)
    assert info.value.details.replace(some_update, "X") == made_up.value.details.replace("0" * 32, "X")
    assert stored_state(w) == before


def _tampered(p: Package) -> Package:
    files = dict(p.files)
    data = bytearray(files["adapter_model.safetensors"])
    data[-3] ^= 0x10
    return Package(p.envelope, files | {"adapter_model.safetensors": bytes(data)})


def _forged(p: Package) -> Package:
    body = json.loads(p.envelope.payload)
    body["training_data_digest"] = "sha256:" + "1" * 64
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return Package(Envelope(p.envelope.payload_type, payload, p.envelope.signatures), p.files)


REFUSALS = [
    (
        "tampered payload byte",
        lambda w: _tampered(package_of(w, RAD, honest_adapter(w, RAD))[0]),
        treelm.InvalidRequest,
        S.INVALID_ARGUMENT,
        "hash-mismatch",
    ),
    (
        "bad signature (tampered manifest)",
        lambda w: _forged(package_of(w, RAD, honest_adapter(w, RAD))[0]),
        treelm.PermissionDenied,
        S.PERMISSION_DENIED,
        "threshold",
    ),
    (
        "wrong key",
        lambda w: package_of(w, RAD, honest_adapter(w, RAD), signers=[SigningKey.generate()])[0],
        treelm.PermissionDenied,
        S.PERMISSION_DENIED,
        "unknown-key",
    ),
    (
        "stale parent version",
        lambda w: package_of(w, RAD, honest_adapter(w, RAD), parent_version=1)[0],
        treelm.FailedPrecondition,
        S.FAILED_PRECONDITION,
        "stale-parent",
    ),
    (
        "skipped version",
        lambda w: package_of(w, RAD, honest_adapter(w, RAD), version=7)[0],
        treelm.FailedPrecondition,
        S.FAILED_PRECONDITION,
        "skipped-version",
    ),
    (
        "x100 norm",
        lambda w: package_of(w, RAD, combine(served(w, RAD)[1], [(100.0, honest_adapter(w, RAD))]))[0],
        treelm.FailedPrecondition,
        S.FAILED_PRECONDITION,
        "screening-too-large",
    ),
]


@pytest.mark.parametrize(("name", "build", "error", "code", "kind"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_have_precise_codes_and_change_nothing(setup, name, build, error, code, kind):
    w, _, clients, folder = setup
    package = _write(folder, name.replace(" ", "-"), build(w))
    before = stored_state(w)
    with pytest.raises(error) as info:
        clients["st-marys"].submit_update(package)
    assert (info.value.code, info.value.kind) == (code, kind), info.value
    assert stored_state(w) == before


def test_replay_is_already_exists_and_rollback_needs_an_operator(setup):
    w, _, clients, folder = setup
    hospital = clients["st-marys"]
    onc = folder / "onc"  # applied in the first test
    with pytest.raises(treelm.FailedPrecondition) as info:
        hospital.submit_update(onc)
    assert (info.value.code, info.value.kind) == (S.ALREADY_EXISTS, "replay")
    with pytest.raises(treelm.NotFound):
        hospital.update_status("f" * 32)
    before = stored_state(w)
    with pytest.raises(treelm.PermissionDenied) as denied:
        hospital.rollback(f"{TREE}/{MED}", 1, w.keys.nodes[ONC])
    assert denied.value.kind == "threshold" and stored_state(w) == before
    with pytest.raises(treelm.FailedPrecondition):
        hospital.rollback(f"{TREE}/{MED}", 9, w.keys.operator)  # no such accepted version
    result = hospital.rollback(f"{TREE}/{MED}", 1, w.keys.operator)
    assert (result.version, result.previous_version, result.held) == (1, 2, ())
    assert hospital.node(f"{TREE}/{MED}").stable_version == 1
    assert [n.version for n in w.coordinator.served_tree().chain(f"{TREE}/{RAD}")] == [1, 1, 1]
    assert hospital.generate(f"{TREE}/{RAD}", "The scan", max_new_tokens=2, temperature=0).node_version == 1
