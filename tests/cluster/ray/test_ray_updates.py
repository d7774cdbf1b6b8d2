"""The Updates service of a Ray cluster: the ingress forwards to the one update desk actor on the
head, and the desk's typed errors come back as the same gRPC status codes as from `treelm serve`.

The whole update story through the Ray ingress (submit, gate, approve, re-pin, the replicas
serving the new versions, a tampered copy refused) is test_demo_scenario_ray.py.
"""

from __future__ import annotations

import json

import grpc
import pytest

import treelm
from cluster import errors as cluster_errors
from cluster.ray.desk import DESK_NAME
from cluster.service.status import wire_status
from cluster.updates.package import write_package
from hierarchy import errors as hierarchy_errors
from hierarchy.updates.envelope import sign_envelope
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import UPDATE_PAYLOAD_TYPE
from nodes import errors as nodes_errors
from registry import errors as registry_errors
from tests.cluster.test_server_errors import NO_RETRY

S = grpc.StatusCode


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_ingress_answers_updates_through_the_desk_with_precise_codes(ray_world, tmp_path):
    import ray

    from cluster.ray.config import load_cluster_config

    assert ray.get_actor(DESK_NAME, namespace=load_cluster_config(ray_world.config).ray.namespace)  # from `up`
    w = ray_world.world
    with treelm.Client(ray_world.target, token=w.tokens["acme"], retries=NO_RETRY, timeout=120) as acme:
        with pytest.raises(treelm.NotFound) as info:  # routed to the desk, UpdateNotFound rebuilt there
            acme.update_status("0" * 32)
        assert info.value.code == S.NOT_FOUND
        with pytest.raises(treelm.NotFound):
            acme.approve("f" * 32, SigningKey.generate())
        with pytest.raises(treelm.InvalidRequest) as bad:  # the servicer's own checks run in the ingress
            acme.update_status("")
        assert bad.value.code == S.INVALID_ARGUMENT
        node = f"{w.tree.name}/{w.tree.nodes[0].path}"
        before = acme.node(node).stable_version
        with pytest.raises(treelm.PermissionDenied) as denied:  # a rollback signed by no known key
            acme.rollback(node, 1, [SigningKey.generate()])
        assert denied.value.code == S.PERMISSION_DENIED
        assert acme.node(node).stable_version == before
        # Submit's first chunk is checked by the desk (check_envelope) before the payload is taken.
        envelope = sign_envelope(UPDATE_PAYLOAD_TYPE, json.dumps({"node": node}).encode(), [SigningKey.generate()])
        package = write_package(tmp_path / "pkg", envelope, {"adapter_model.safetensors": b"\0" * 4096})
        with pytest.raises(treelm.PermissionDenied) as unknown:
            acme.submit_update(package)
        assert unknown.value.code == S.PERMISSION_DENIED and unknown.value.kind == "unknown-key"


@pytest.mark.ray
def test_an_error_raised_in_a_ray_task_comes_back_typed(ray_world):
    """No wrapper types: a typed error crosses Ray as it is (hierarchy.errors.PicklableError)."""
    import ray

    from cluster.ray.wire import remote_cause

    @ray.remote
    def fails(error: Exception) -> None:
        raise error

    for error in (
        nodes_errors.InvalidRequest("params.n", "must be at least 1, got 0"),
        registry_errors.UpdateNotFound.for_id("0" * 32),
        cluster_errors.PackageError("no adapter_config.json", field="files"),
        hierarchy_errors.ThresholdError("0 valid signatures, 1 required", field="signatures", seen=0),
    ):
        with pytest.raises(ray.exceptions.RayTaskError) as info:
            ray.get(fails.remote(error))
        again = remote_cause(info.value)
        assert type(again) is type(error) and str(again) == str(error) and vars(again) == vars(error)
        assert wire_status(again) == wire_status(error)
