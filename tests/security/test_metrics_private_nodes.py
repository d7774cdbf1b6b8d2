"""Side channels about private nodes, against real servers: version metrics and update statuses
of a public parent name no private child to another tenant, /metrics (open, no token) never names
a private node nor tells whether one exists, and it listens on 127.0.0.1 by default."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

import treelm
from cluster.service.catalog import Catalog
from cluster.service.redact import PRIVATE_NODE, Redactor
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.updates.package import write_package
from nodes.runtime.engine import Engine, EngineConfig
from registry.access import create_tenant, issue_token
from tests.cluster import grpc_harness
from tests.cluster.grpc_harness import PRIVATE, ServerThread, serve
from tests.cluster.update_world import TREE, built_tree, honest_adapter, make_world, package_of

pytestmark = pytest.mark.timeout(300)

ONC, MED = f"{TREE}/en/medical/oncology", f"{TREE}/en/medical"  # oncology: private to st-marys


def test_the_redactor_hides_ids_and_paths_in_keys_and_values_but_not_lookalikes():
    r = Redactor(["ut/en/medical/oncology"])
    record = {
        "gate": {
            "checks": [{"name": "probe ut/en/medical/oncology", "text": "en/medical/oncology/probe.txt", "after": 1.5}]
        },
        "probe en/medical/oncology.ppl": 2.0,
        "en/medical/oncology-2 stays": "ut/en/medical/oncologyx stays too",
    }
    out = r.value(record)
    check = out["gate"]["checks"][0]
    assert check == {"name": f"probe {PRIVATE_NODE}", "text": f"{PRIVATE_NODE}/probe.txt", "after": 1.5}
    assert out[f"probe {PRIVATE_NODE}.ppl"] == 2.0
    assert out["en/medical/oncology-2 stays"] == "ut/en/medical/oncologyx stays too"
    assert Redactor([]).value(record) is record


@pytest.fixture(scope="module")
def updated(tmp_path_factory):
    """St Mary's submitted an update of its private oncology node: en/medical has a candidate."""
    w = make_world(tmp_path_factory.mktemp("sec-redact"), built_tree(tmp_path_factory))
    create_tenant(w.registry, "globex")
    tokens = {t: issue_token(w.registry, t).token for t in ("st-marys", "globex")}
    engine = Engine(w.coordinator.tree.base_dir, w.tree, EngineConfig(max_batch_size=4))
    w.coordinator.on_snapshot(engine.use_tree)
    server = ServerThread(
        lambda: TreeServer([EngineTrunk(engine)], Catalog(w.registry), ServerConfig(port=0), updates=w.coordinator)
    )
    clients = {t: treelm.Client(server.target, token=tok, retries=0, timeout=300) for t, tok in tokens.items()}
    folder = tmp_path_factory.mktemp("sec-redact-packages")
    made, _ = package_of(w, "en/medical/oncology", honest_adapter(w, "en/medical/oncology"))
    package = write_package(folder / "onc", made.envelope, made.files)
    status = clients["st-marys"].submit_update(package)
    assert status.candidate_id
    yield w, clients, status
    for c in clients.values():
        c.close()
    server.stop()
    engine.close()
    w.close()


def _mentions_oncology(value) -> bool:
    return "oncology" in json.dumps(value, default=str)


def test_another_tenant_sees_the_public_parents_versions_and_candidate_without_the_private_child(updated):
    _, clients, status = updated
    owner, other = clients["st-marys"], clients["globex"]
    theirs = other.versions(MED)
    assert [v.version for v in theirs] == [1, 2]  # the candidate is there, figures and all
    assert theirs[1].metrics["gate"]["checks"] and not _mentions_oncology([v.metrics for v in theirs])
    assert PRIVATE_NODE in json.dumps([v.metrics for v in theirs])
    assert _mentions_oncology([v.metrics for v in owner.versions(MED)])  # the owner still sees its node

    candidate = other.update_status(status.candidate_id)
    assert candidate.node == MED and candidate.figures and candidate.state == "awaiting-approval"
    assert not _mentions_oncology([candidate.figures, candidate.reasons, candidate.parent])
    mine = owner.update_status(status.candidate_id)
    assert _mentions_oncology(mine.figures) and sorted(mine.figures.values()) == sorted(candidate.figures.values())
    with pytest.raises(treelm.NotFound):  # the private child's own update stays invisible
        other.update_status(status.update_id)


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = grpc_harness.make_world(tiny_base_dir, tmp_path_factory.mktemp("sec-metrics"))
    yield w
    w.engine.close()
    w.registry.close()


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_metrics_name_no_private_node_and_do_not_tell_whether_one_exists(world):
    server = serve(world, metrics_port=0, host="0.0.0.0")  # gRPC on every address; /metrics not
    try:
        assert server.server.metrics._http is not None
        assert server.server.metrics._http.server_address[0] == "127.0.0.1"  # /metrics stays local by default
        port, target = server.server.metrics_port, f"127.0.0.1:{server.server.port}"
        with treelm.Client(target, token=world.tokens["acme"], retries=0) as owner:
            owner.generate(PRIVATE, "owner's own call", max_new_tokens=3)
            owner.generate("rt/en", "public", max_new_tokens=3)
        before = _scrape(port)
        with treelm.Client(target, token=world.tokens["globex"], retries=0) as other:
            for node in (PRIVATE, "rt/en/legal/nothing-here"):  # a private node and a made-up one
                with pytest.raises(treelm.NodeNotFound):
                    other.generate(node, "probe", max_new_tokens=1)
        expected = 'treelm_requests_total{code="NOT_FOUND",method="Inference/Generate",node="other"} 2.0'
        for _ in range(50):  # a call is counted after its status is sent: poll
            text = _scrape(port)
            if expected in text:
                break
            time.sleep(0.1)
    finally:
        server.stop()
    assert expected in text  # both refusals look the same
    assert "contracts" not in before + text and "nothing-here" not in text
    assert 'treelm_requests_total{code="OK",method="Inference/Generate",node="rt/en"} 1.0' in text
    assert 'treelm_requests_total{code="OK",method="Inference/Generate",node="other"} 1.0' in text  # the owner's


def test_metrics_listen_where_the_operator_says(world):
    server = serve(world, metrics_port=0, metrics_host="0.0.0.0")
    try:
        assert server.server.metrics._http is not None
        assert server.server.metrics._http.server_address[0] == "0.0.0.0"
        assert "treelm_in_flight_requests" in _scrape(server.server.metrics_port)
    finally:
        server.stop()
