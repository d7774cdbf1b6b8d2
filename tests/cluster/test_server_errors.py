"""Every status code the server promises, from real calls; private nodes stay private."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest

import treelm
from cluster.service.catalog import Catalog
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.tree_import import import_tree
from nodes.base.model import TinyBaseConfig, make_tiny_base
from nodes.runtime.engine import Engine, EngineConfig
from protos.treelm.v1 import updates_pb2, updates_pb2_grpc
from tests.cluster.grpc_harness import PRIVATE, ServerThread, make_world, serve
from tests.nodes.treefactory import RandomTreeSpec, make_random_tree

pytestmark = pytest.mark.timeout(180)
NO_RETRY = treelm.RetryPolicy(retries=0)


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-errors")
    w = make_world(tiny_base_dir, root)
    # A second tree that the registry knows but this server does not serve.
    import_tree(w.registry, make_random_tree(root / "other", tiny_base_dir, RandomTreeSpec(name="zz")).root)
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def server(world):
    s = serve(world, max_receive_message_bytes=64 * 1024)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def open_server(world):
    """The same tree with --insecure-no-auth."""
    s = serve(world, auth=False)
    yield s
    s.stop()


@pytest.fixture
def acme(world, server):
    with treelm.Client(server.target, token=world.tokens["acme"], retries=NO_RETRY) as c:
        yield c


@pytest.fixture
def globex(world, server):
    with treelm.Client(server.target, token=world.tokens["globex"], retries=NO_RETRY) as c:
        yield c


def _message_without(err: treelm.TreeLMError, node: str) -> str:
    return err.details.replace(repr(node), "<node>")


def test_unknown_node_is_not_found(globex):
    with pytest.raises(treelm.NodeNotFound) as info:
        globex.generate("rt/en/astrology", "x")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "rt/en/astrology" in info.value.details
    with pytest.raises(treelm.NodeNotFound):
        globex.node("rt/en/astrology")
    with pytest.raises(treelm.NodeNotFound):
        globex.generate("other-tree/en", "x")
    assert globex.node("zz/en").tree == "zz"
    with pytest.raises(treelm.NodeNotFound, match="registered but not served here"):
        globex.generate("zz/en", "x")


def test_a_private_node_is_invisible_and_unusable_for_another_tenant(acme, globex):
    assert PRIVATE in [n.id for n in acme.nodes()]
    assert acme.node(PRIVATE).owner == "acme" and acme.generate(PRIVATE, "x", max_new_tokens=2).node == PRIVATE
    assert [v.version for v in acme.versions(PRIVATE)] == [1]

    assert PRIVATE not in [n.id for n in globex.nodes()]
    assert PRIVATE not in [n.id for n in globex.nodes(prefix="rt/en/legal")]
    calls = {
        "generate": lambda c, n: c.generate(n, "x"),
        "stream": lambda c, n: list(c.stream(n, "x")),
        "node": lambda c, n: c.node(n),
        "versions": lambda c, n: c.versions(n),
    }
    for name, call in calls.items():
        with pytest.raises(treelm.NodeNotFound) as private:
            call(globex, PRIVATE)
        with pytest.raises(treelm.NodeNotFound) as absent:
            call(globex, "rt/en/legal/nda")
        # Exactly the answer for a node that does not exist: nothing tells them apart.
        assert _message_without(private.value, PRIVATE) == _message_without(absent.value, "rt/en/legal/nda"), name
        assert "acme" not in private.value.details
    for client, sees_private in ((acme, True), (globex, False)):
        found = client.match("en/legal/contracts", memory="8GiB", context=256)
        assert (PRIVATE in [c.node for c in found.candidates]) is sees_private
        assert all(s.node != PRIVATE for s in found.suggestions) or sees_private


def test_without_a_token_auth_on_is_unauthenticated_and_auth_off_sees_public_only(world, server, open_server):
    with treelm.Client(server.target, retries=NO_RETRY) as anonymous:
        for call in (anonymous.nodes, anonymous.status, lambda: anonymous.generate("rt/en", "x")):
            with pytest.raises(treelm.Unauthenticated, match="bearer token"):
                call()
    with treelm.Client(server.target, token="tlm_0123_not-a-real-secret", retries=NO_RETRY) as forged:
        with pytest.raises(treelm.Unauthenticated, match="not valid"):
            forged.nodes()
    with grpc.insecure_channel(server.target) as channel:  # a malformed header, as a stock tool could send
        stub = updates_pb2_grpc.UpdatesStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetStatus(updates_pb2.GetStatusRequest(update_id="u"), metadata=[("authorization", "Basic eA==")])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with treelm.Client(open_server.target, retries=NO_RETRY) as anonymous:
        ids = [n.id for n in anonymous.nodes()]
        assert "rt/en/legal" in ids and PRIVATE not in ids
        assert anonymous.generate("rt/en/legal", "x", max_new_tokens=2).node == "rt/en/legal"
        with pytest.raises(treelm.NodeNotFound):
            anonymous.generate(PRIVATE, "x")
        assert anonymous.status().tenant is None and not anonymous.status().auth_enabled
    with treelm.Client(open_server.target, token=world.tokens["acme"]) as acme_on_open:
        assert acme_on_open.generate(PRIVATE, "x", max_new_tokens=2).node == PRIVATE  # a sent token still counts


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 100_000}, "max_new_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.role"),
        ({"messages": [{"role": "user", "content": "hi"}], "prompt": "and a prompt"}, "prompt"),
        ({"prompt": "word " * 2000}, "prompt"),  # longer than the tiny base's context
        ({"node": "Not A Node!"}, "node"),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_the_field(world, acme, kwargs, field):
    before = world.engine.stats().submitted
    args = {"node": "rt/en", "prompt": None if "messages" in kwargs else "x", **kwargs}
    node = args.pop("node")
    with pytest.raises(treelm.InvalidRequest) as info:
        acme.generate(node, **args)
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == field and field.split(".")[0] in err.details
    assert world.engine.stats().submitted == before  # nothing was queued


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"memory": "eight gigs"}, "memory"),
        ({"memory": "-1GiB"}, "memory"),
        ({"memory": "8GiB", "device": "tpu"}, "device"),
        ({"memory": "8GiB", "bandwidth": "fast"}, "bandwidth"),
        ({"memory": "8GiB", "task": "en/Bad Path"}, "task"),
        ({"memory": "8GiB", "task": "xx/nothing"}, "task"),
    ],
)
def test_bad_match_inputs_are_invalid_argument_naming_the_field(acme, kwargs, field):
    kwargs = dict(kwargs)  # the parametrize dict is shared with the Ray contract run: never mutate it
    task = kwargs.pop("task", "en/medical")
    with pytest.raises(treelm.InvalidRequest) as info:
        acme.match(task, **kwargs)
    assert info.value.field == field


def test_a_request_over_the_size_limit_is_refused_and_not_retried(world, server):
    with treelm.Client(server.target, token=world.tokens["acme"], retries=3) as client:
        with pytest.raises(treelm.InvalidRequest) as info:
            client.generate("rt/en", "x" * 100_000)  # the server takes 64 KiB here
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.field == "message"


def test_updates_are_unimplemented_until_the_update_protocol_lands(acme, world, server):
    with grpc.insecure_channel(server.target) as channel:
        stub = updates_pb2_grpc.UpdatesStub(channel)
        meta = [("authorization", f"Bearer {world.tokens['acme']}")]
        calls = [
            lambda: stub.GetStatus(updates_pb2.GetStatusRequest(update_id="u1"), metadata=meta),
            lambda: stub.Approve(updates_pb2.ApproveRequest(update_id="u1"), metadata=meta),
            lambda: stub.Rollback(
                updates_pb2.RollbackRequest(node="rt/en", alias="stable", to_version=1), metadata=meta
            ),
            lambda: stub.Submit(iter([updates_pb2.SubmitChunk(node="rt/en", data=b"x")]), metadata=meta),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "update protocol" in info.value.details()


# -- a small engine of its own: full queue, closed engine, a corrupted adapter ------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One batch slot, one queue place, and a long context so one request can hold the slot for seconds."""
    root = tmp_path_factory.mktemp("grpc-small")
    base = make_tiny_base(
        root / "base", TinyBaseConfig(hidden=64, layers=2, vocab=400, heads=4, kv_heads=2, max_position=8192)
    )
    config = EngineConfig(max_batch_size=1, max_queue=1, max_new_tokens_limit=8000)
    w = make_world(base, root, config)
    s = serve(w)
    yield w, s
    s.stop()
    w.engine.close()
    w.registry.close()


def hold_the_slot(client: treelm.Client) -> treelm.Stream:
    """A greedy generation of ~6000 tokens (seconds on the tiny base; this node emits no EOS early)."""
    running = client.stream("rt/en/medical", "long", max_new_tokens=6000)
    next(running)
    return running


def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_a_passed_deadline_is_deadline_exceeded_and_frees_its_queue_place(small):
    world, server = small
    with treelm.Client(server.target, token=world.tokens["globex"], retries=NO_RETRY, timeout=60) as client:
        running = hold_the_slot(client)
        with pytest.raises(treelm.DeadlineExceeded) as info:
            client.generate("rt/fr", "waits in the queue", max_new_tokens=2, timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: world.engine.stats().queue_depth == 0)  # the expired request left the queue
        assert world.engine.stats().active_requests == 1  # while the running one goes on
        running.cancel()
        wait_for(lambda: world.engine.stats().active_requests == 0)


def test_a_full_queue_is_resource_exhausted(small):
    world, server = small
    with treelm.Client(server.target, token=world.tokens["globex"], retries=NO_RETRY, timeout=60) as client:
        running = hold_the_slot(client)
        queued_done = threading.Event()
        errors = []

        def queued():
            try:
                client.generate("rt/fr", "queued", max_new_tokens=2)
            except treelm.TreeLMError as exc:
                errors.append(exc)
            queued_done.set()

        thread = threading.Thread(target=queued)
        thread.start()
        wait_for(lambda: world.engine.stats().queue_depth == 1)
        with pytest.raises(treelm.Overloaded) as info:
            client.generate("rt/fr/medical", "one too many", max_new_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retryable
        running.cancel()
        assert queued_done.wait(60) and not errors  # the queued request still completed
        thread.join()


def test_a_changed_adapter_file_is_data_loss_not_internal(small):
    world, server = small
    node = world.tree.node("rt/fr/medical")
    adapter = node.directory / "adapter_model.safetensors"
    backup = adapter.with_suffix(".bak")
    shutil.copy(adapter, backup)
    try:
        data = bytearray(adapter.read_bytes())
        data[-1] ^= 0xFF
        adapter.write_bytes(bytes(data))
        with treelm.Client(server.target, token=world.tokens["globex"], retries=NO_RETRY) as client:
            with pytest.raises(treelm.ServerError) as info:
                client.generate("rt/fr/medical", "x", max_new_tokens=2)
            assert info.value.code == grpc.StatusCode.DATA_LOSS and "changed" in info.value.details
            assert client.generate("rt/fr", "x", max_new_tokens=2).node == "rt/fr"  # others still served
    finally:
        shutil.move(backup, adapter)


def test_a_closed_engine_is_unavailable(world):
    engine = Engine(world.tree.base_dir, world.tree.root, EngineConfig(max_batch_size=2))
    server = ServerThread(lambda: TreeServer([EngineTrunk(engine)], Catalog(world.registry), ServerConfig(port=0)))
    try:
        engine.close()
        with treelm.Client(server.target, token=world.tokens["acme"], retries=NO_RETRY) as client:
            with pytest.raises(treelm.Unavailable, match="closed|shutting"):
                client.generate("rt/en", "x")
    finally:
        server.stop()
