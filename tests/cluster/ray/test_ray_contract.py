"""The single-process server's SDK tests, unchanged, against the Ray cluster's gRPC ingress.

The test functions are imported from tests/cluster/test_server*.py; only the
``world`` and ``server`` fixtures differ: here ``server.target`` is the ingress
in front of Serve replicas, and ``world.engine`` is a local engine over the
same tree that gives the expected tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import treelm
from tests.cluster.test_server import (  # noqa: F401  (collected here against the Ray ingress)
    test_64_concurrent_streams_complete_with_nothing_lost_or_mixed_up,
    test_chat_messages_and_sampling_match_the_engine,
    test_health_and_reflection_answer_stock_clients_without_a_token,
    test_unary_and_streams_for_several_nodes_at_once_match_the_engine,
)
from tests.cluster.test_server_errors import (  # noqa: F401
    NO_RETRY,
    test_a_private_node_is_invisible_and_unusable_for_another_tenant,
    test_bad_match_inputs_are_invalid_argument_naming_the_field,
    test_bad_parameters_are_invalid_argument_naming_the_field,
    test_unknown_node_is_not_found,
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@dataclass(frozen=True)
class IngressTarget:
    target: str


@pytest.fixture(scope="module")
def world(ray_world):
    return ray_world.world


@pytest.fixture(scope="module")
def server(ray_world):
    return IngressTarget(ray_world.target)


@pytest.fixture
def acme(world, server):
    with treelm.Client(server.target, token=world.tokens["acme"], retries=NO_RETRY) as c:
        yield c


@pytest.fixture
def globex(world, server):
    with treelm.Client(server.target, token=world.tokens["globex"], retries=NO_RETRY) as c:
        yield c
