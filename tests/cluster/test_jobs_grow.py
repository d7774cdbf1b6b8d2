"""Growing and pruning a serving tree in-process: a job's node trained by cluster/jobs/train.py and
registered by the update desk (``add_node``), its refusals (taken ids, an untrusted key) that store
nothing, and ``retire_node`` while a request is in flight; the trunk and node-access caches follow."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from cluster.errors import JobError, UpdateStateError
from cluster.jobs.runner import _new_node
from cluster.jobs.train import TrainedNode, render_records, train_job
from cluster.service.access import NodeAccess
from cluster.service.catalog import Catalog
from cluster.service.trunk import EngineTrunk
from cluster.updates.coordinator import Coordinator
from cluster.updates.keys import write_key_files
from cluster.updates.policy import CustomizePolicy
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import parse_manifest
from nodes.base.model import load_base
from nodes.errors import UnknownNode
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, SamplingParams
from nodes.store.versions import VersionStore
from registry.errors import Conflict, NodeExists, NodeNotFound
from registry.jobs import JobRecord, get_file
from registry.trees import list_nodes
from registry.updates import list_updates
from tests.cluster.jobs_world import TENANT, chat_file, jobs_world, queue_job, upload
from tests.cluster.update_world import TREE, built_tree, honest_adapter, package_of, stored_state

NEW = "en/medical/st-marys-onc"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w, _ = jobs_world(tmp_path_factory.mktemp("grow"), built_tree(tmp_path_factory))
    yield w
    w.close()


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> tuple[JobRecord, TrainedNode]:
    """A job's node trained in-process (what the worker process runs), staged, not registered yet."""
    content = chat_file(world.local("en/medical/oncology"))
    job = queue_job(world, "st-marys-onc", upload(world.registry, content, "notes.jsonl"))
    out = tmp_path_factory.mktemp("staged")
    return job, train_job(world.tree, job, content, None, world.coordinator.policy.customize, out)


def _more_text(world) -> str:
    return upload(world.registry, world.local("en/medical/oncology").read_bytes(), "again.txt")


def test_chats_render_through_the_template_or_as_role_lines(tiny_base_dir):
    from cluster.jobs.data import parse_training_file

    records = parse_training_file(
        b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
        b'{"text": "A plain document."}\n' + b'{"text": "' + b"x" * 1000 + b'"}\n'
    ).records
    tokenizer = load_base(tiny_base_dir).tokenizer
    chat, text, _ = render_records(tokenizer, records)
    assert "<|im_start|>assistant\nHello<|im_end|>" in chat and text == "A plain document."
    tokenizer.chat_template = None  # a base without a template: role lines
    assert render_records(tokenizer, records)[0] == "user: Hi\nassistant: Hello"


def test_a_parent_the_tree_does_not_serve_is_a_job_error(world, tmp_path):
    content = world.local("en/legal").read_bytes()
    job = queue_job(world, "x", upload(world.registry, content, "legal.txt"), parent="en/legal")
    job = replace(job, parent=f"{TREE}/en/tax")  # as if its parent vanished meanwhile
    with pytest.raises(JobError) as failed:
        train_job(world.tree, job, content, None, world.coordinator.policy.customize, tmp_path / "out")
    assert failed.value.code == "parent" and not (tmp_path / "out").exists()


def test_add_node_refuses_a_taken_id_and_an_untrusted_key_storing_nothing(world, trained, tmp_path):
    new = _new_node(*trained)
    (world.tree / "nodes" / "en/medical/stray").mkdir()  # a folder someone left: its name is not free
    before = stored_state(world)
    for taken in ("en/medical/oncology", "en/medical/stray"):
        with pytest.raises(NodeExists):
            world.coordinator.add_node(replace(new, node=world.node_id(taken)))
    other = SigningKey.generate()  # never registered: nodes it signs would not verify anywhere
    write_key_files(tmp_path / "other", other)
    coordinator = world.coordinator
    policy = coordinator.policy
    coordinator.policy = policy.with_(customize=CustomizePolicy(key=str(tmp_path / "other")))
    try:
        with pytest.raises(JobError) as refused:
            coordinator.add_node(new)
        assert refused.value.code == "registration" and other.keyid[:16] in str(refused.value)
    finally:
        coordinator.policy = policy
    with pytest.raises(UpdateStateError):  # trained over another chain than its parent's lineage
        coordinator.add_node(replace(new, over=new.over[:1]))
    assert stored_state(world) == before
    (world.tree / "nodes" / "en/medical/stray").rmdir()


def test_add_node_serves_it_and_the_trunk_and_access_follow(world, trained):
    engine = Engine(world.coordinator.tree.base_dir, world.tree, EngineConfig(max_batch_size=2))
    world.coordinator.on_snapshot(engine.use_tree)
    trunk = EngineTrunk(engine)
    now = [0.0]
    access = NodeAccess(Catalog(world.registry).node_visibility, ttl_s=5.0, clock=lambda: now[0])
    node = world.node_id(NEW)
    new = _new_node(*trained)
    try:
        assert not trunk.serves(node)
        assert asyncio.run(access.visibility(node)) is None  # "no such node", cached briefly
        added = world.coordinator.add_node(new)
        assert (added.node, added.version, added.pin_status) == (node, 1, "pinned")
        assert trunk.serves(node)  # the engine's tree moved on at the switch
        assert asyncio.run(access.visibility(node)) is None  # still the cached answer ...
        now[0] += 1.01
        seen = asyncio.run(access.visibility(node))  # ... for a second, not for the whole TTL
        assert seen is not None and (seen.visibility, seen.owner) == ("private", TENANT)
        result = asyncio.run(engine.generate(GenerationRequest(node=node, prompt="The", params=SamplingParams())))
        assert result.node_version == 1
        with pytest.raises(NodeExists):  # now taken
            world.coordinator.add_node(new)
    finally:
        engine.close()


def test_a_node_trained_over_a_parent_version_that_moved_is_held_over_it(world, trained):
    # en/medical gets version 2 while the job trained over version 1 (a hospital's signed update).
    world.coordinator.submit(package_of(world, "en/medical", honest_adapter(world, "en/medical"))[0])
    served = world.coordinator.served_tree()
    assert [n.version for n in served.chain(world.node_id("en/medical"))] == [1, 2]
    node = world.node_id("en/medical/st-marys-onc-b")
    added = world.coordinator.add_node(replace(_new_node(*trained), node=node))
    assert added.pin_status == "held"  # served over the chain it was gated on, never over one it was not
    assert [(x["path"], x["version"]) for x in added.chain] == [("en", 1), ("en/medical", 1), (str(node[3:]), 1)]
    snapshot = VersionStore(world.tree).read_snapshot()
    assert snapshot.nodes["en/medical/st-marys-onc-b"].status == "held"
    (record,) = list_updates(world.registry, node=node, kind="create")
    assert parse_manifest(Envelope.from_bytes(record.envelope.encode()).payload).parent_version == 1


def _request(node: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(
        node=node, prompt="The scan showed", params=SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    )


def test_a_job_made_nodes_own_update_is_screened_gated_and_climbs_to_its_parent(world, tmp_path):
    # A node a job made under en/legal, then its own signed update (the service key is a role-wide
    # node key, so it may sign it): verified, screened, gated, stored and aggregated into en/legal.
    content = chat_file(world.local("en/legal"))
    job = queue_job(world, "clinic-law", upload(world.registry, content, "law.jsonl"), parent="en/legal")
    trained = train_job(world.tree, job, content, None, world.coordinator.policy.customize, tmp_path / "staged")
    added = world.coordinator.add_node(_new_node(job, trained))
    path = "en/legal/clinic-law"
    adapter = honest_adapter(world, path, text=world.local("en/legal"))
    status = world.coordinator.submit(package_of(world, path, adapter, [world.coordinator.growth_key()])[0])
    assert (status.node, status.version, status.parent) == (added.node, 2, world.node_id("en/legal"))
    assert status.state != "rejected", status.reasons
    assert status.candidate_id is not None  # its increment went into a candidate of en/legal: it climbs
    served = world.coordinator.served_tree()
    assert served.chain(added.node)[-1].version == 2


def test_retire_refuses_a_parent_then_drains_a_leaf(world):
    before = stored_state(world)
    with pytest.raises(Conflict, match="nodes below it"):
        world.coordinator.retire_node(world.node_id("en/medical"))
    with pytest.raises(NodeNotFound):
        world.coordinator.retire_node(world.node_id("en/tax"))
    with pytest.raises(UpdateStateError):
        world.coordinator.retire_node(TREE)
    assert stored_state(world) == before

    engine = Engine(world.coordinator.tree.base_dir, world.tree, EngineConfig(max_batch_size=2))
    world.coordinator.on_snapshot(engine.use_tree)
    node = world.node_id("en/medical/radiology")

    async def scenario() -> list:
        stream = engine.stream(_request(node, 200))
        chunks = [await stream.__anext__()]  # admitted: it holds its chain
        hold = threading.Event()
        engine._scheduler.call(hold.wait)  # pause the model thread so the request is surely in flight
        try:
            retired = await asyncio.to_thread(world.coordinator.retire_node, node)
            assert retired == (node,)
            assert engine.stats().active_requests == 1
            with pytest.raises(UnknownNode):  # new requests: not served any more
                await engine.generate(_request(node, 2))
        finally:
            hold.set()
        chunks += [c async for c in stream]
        return chunks

    try:
        chunks = asyncio.run(scenario())
    finally:
        engine.close()
    assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 200
    assert node not in {n.node_id for n in list_nodes(world.registry, include_private=True)}
    assert Catalog(world.registry).node_visibility(node) is None
    with pytest.raises(NodeExists):  # its id stays taken
        queue_job(world, "radiology", _more_text(world))
    # Its files and versions stay; a new desk over the dir opens without it.
    assert (world.tree / "nodes" / "en/medical/radiology" / "node.json").is_file()
    reopened = Coordinator.open(world.registry, world.tree, world.coordinator.policy)
    assert not reopened.served_tree().has(node) and reopened.served_tree().has(world.node_id("en/medical"))


def test_retire_with_force_takes_the_subtree(world):
    ids = world.coordinator.retire_node(world.node_id("en/medical"), force=True)
    assert ids[0] == world.node_id("en/medical") and world.node_id("en/medical/oncology") in ids
    served = VersionStore(world.tree).read_snapshot()
    assert not any(p.startswith("en/medical") for p in served.nodes) and "en/legal" in served.nodes
    left = {n.node_id for n in list_nodes(world.registry, include_private=True)}
    assert left == {TREE, world.node_id("en"), world.node_id("en/legal"), world.node_id("en/legal/clinic-law")}
    assert get_file(world.registry, TENANT, _more_text(world))  # the tenant's files are untouched
