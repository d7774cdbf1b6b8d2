"""The Updates service of a Ray cluster: the ingress forwards to the one update desk actor on the
head, and the desk's typed errors come back as the same gRPC status codes as from `treelm serve`.

The whole update story through the Ray ingress (submit, gate, approve, re-pin, the replicas
serving the new versions, a tampered copy refused) is test_demo_scenario_ray.py.
"""

from __future__ import annotations

import grpc
import pytest

import treelm
from cluster.ray.desk import DESK_NAME, PortableError
from cluster.updates.errors import NotAwaitingApproval, PackageError
from cluster.updates.wire import update_wire_status
from hierarchy.updates import errors as e
from hierarchy.updates.keys import SigningKey
from registry.updates import UpdateNotFound
from tests.cluster.test_server_errors import NO_RETRY

S = grpc.StatusCode


class _Unportable(Exception):
    def __init__(self, a, b):  # not re-creatable from args, like most typed errors here
        super().__init__(f"{a}/{b}")
        self.lock = __import__("threading").Lock()  # an attribute that does not pickle


@pytest.mark.parametrize(
    "exc",
    [
        e.ThresholdError("1 valid signature of 2 needed"),
        e.StaleParentError("parent version 1 is not the stable 2"),
        PackageError("no adapter_config.json", field="files"),
        NotAwaitingApproval("update 1234 is stable"),
        UpdateNotFound.for_id("0" * 32),
    ],
    ids=lambda x: type(x).__name__,
)
def test_desk_errors_come_back_with_their_type_message_and_status(exc):
    back = PortableError.of(exc).rebuild()
    assert type(back) is type(exc) and str(back) == str(exc)
    assert getattr(back, "field", None) == getattr(exc, "field", None)
    assert update_wire_status(back) == update_wire_status(exc)


def test_an_error_whose_attributes_do_not_pickle_keeps_type_and_message():
    back = PortableError.of(_Unportable(1, 2)).rebuild()
    assert type(back) is _Unportable and str(back) == "1/2"
    lost = PortableError("nowhere.module", "Gone", "it went", b"").rebuild()
    assert isinstance(lost, RuntimeError) and str(lost) == "Gone: it went"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_ingress_answers_updates_through_the_desk_with_precise_codes(ray_world):
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
