"""Fine-tuning jobs end to end on the tiny tree: the runner claims a job, a real worker process trains
and gates the node, the update desk registers, signs and serves it, and an in-process engine
answers with it. Then the refusals that store nothing: the gate, a cancellation, a restart."""

from __future__ import annotations

import asyncio
import json
import stat

import pytest

from cluster.jobs.runner import JOBS_DIR, JobRunner, ProcessLauncher
from cluster.updates.coordinator import Coordinator
from cluster.updates.grow import node_texts_dir
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.manifest import parse_manifest
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, SamplingParams
from nodes.store.versions import VersionStore
from registry.jobs import claim_job, get_job, list_events, request_cancel
from registry.trees import list_nodes
from registry.updates import current_pins, list_updates
from tests.cluster.jobs_world import (
    MEDICAL_EVAL,
    TENANT,
    chat_file,
    gibberish,
    jobs_world,
    queue_job,
    upload,
    wait_for,
    wait_for_end,
)
from tests.cluster.update_world import TREE, built_tree, semantic_state, tree_files

NEW = "en/medical/st-marys-onc"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jobs")
    world, key = jobs_world(folder, built_tree(tmp_path_factory))
    engine = Engine(world.coordinator.tree.base_dir, world.tree, EngineConfig(max_batch_size=4))
    world.coordinator.on_snapshot(engine.use_tree)  # as `treelm serve` wires it
    runner = JobRunner(
        world.registry,
        world.coordinator,
        world.coordinator.policy.customize,
        ProcessLauncher(threads=1),
        worker_name="test-runner",
        poll_s=0.2,
    )
    runner.start()
    yield world, key, engine, runner
    runner.stop()
    engine.close()
    world.close()


def _generate(engine: Engine, node: str) -> object:
    request = GenerationRequest(node=node, prompt="The patient", params=SamplingParams(max_new_tokens=4))
    return asyncio.run(engine.generate(request))


def _fingerprint(world) -> tuple:
    files = {k: v for k, v in tree_files(world.tree).items() if not k.startswith(f"{JOBS_DIR}/")}
    nodes = {n.node_id for n in list_nodes(world.registry, include_private=True, include_retired=True)}
    return files, semantic_state(world.registry), nodes


@pytest.fixture(scope="module")
def succeeded(setup):
    world, _, _, runner = setup
    training = upload(world.registry, chat_file(world.local("en/medical/oncology")), "oncology-notes.jsonl")
    job = queue_job(world, "st-marys-onc", training)
    runner.wake()
    return wait_for_end(world.registry, job.job_id)


def test_a_job_makes_a_private_signed_node_that_is_served(setup, succeeded):
    world, key, engine, _ = setup
    job, node = succeeded, world.node_id(NEW)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == node
    result = job.result
    assert result["held_out_ppl"] < result["parent_held_out_ppl"]  # the gate
    assert result["version"] == 1 and result["pin"] == "pinned"
    assert {"queue_s", "worker_s", "train_s", "gate_s", "register_s"} <= set(result)
    # Progress: step events with the figures a client plots, then the evaluation.
    events = list_events(world.registry, job.job_id, TENANT, limit=100)
    steps = [e.data for e in events if e.data.get("phase") == "training" and e.data.get("step")]
    assert steps and {"step", "total_steps", "loss"} <= set(steps[0])
    assert max(s["step"] for s in steps) == steps[0]["total_steps"] == result["steps"]
    evaluated = next(e.data for e in events if e.data.get("phase") == "evaluated")
    assert evaluated["held_out_ppl"] == result["held_out_ppl"]
    # In tree.json, in the snapshot over its parent's served chain, with its texts kept private.
    tree_json = json.loads((world.tree / "tree.json").read_text())
    assert NEW in tree_json["nodes"]
    snapshot = VersionStore(world.tree).read_snapshot()
    pins = current_pins(world.registry, TREE)
    chain = [(x.path, x.version) for x in snapshot.nodes[NEW].chain]
    assert chain == [("en", 1), ("en/medical", 1), (NEW, 1)]
    assert [x["path"] for x in pins[node].chain] == [x for x, _ in chain]
    for kind in ("train", "eval"):
        text = node_texts_dir(world.tree, NEW) / f"{kind}.txt"
        assert stat.S_IMODE(text.stat().st_mode) == 0o600
    assert not (world.tree / JOBS_DIR / job.job_id).exists()  # the staged dir is gone
    # In the registry: private to its tenant, version 1 stable, with lineage.
    mine = {n.node_id: n for n in list_nodes(world.registry, tenant=TENANT)}
    assert mine[node].visibility == "private" and mine[node].owner == TENANT
    assert mine[node].stable_version == 1 and mine[node].parent == world.node_id("en/medical")
    assert node not in {n.node_id for n in list_nodes(world.registry, tenant="northside")}
    assert node not in {n.node_id for n in list_nodes(world.registry)}
    # Its version 1 manifest, signed by the service key, names exactly the stored adapter.
    (record,) = list_updates(world.registry, node=node, kind="create")
    assert record.state == "stable" and record.version == 1 and record.figures["job"] == job.job_id
    envelope = Envelope.from_bytes(record.envelope.encode())
    assert [s.keyid for s in envelope.signatures] == [key.keyid]
    assert key.public.verify(envelope.signatures[0].sig, envelope.pae())
    manifest = parse_manifest(envelope.payload)
    assert (str(manifest.node), manifest.version, manifest.parent_version) == (node, 1, 1)
    stored = VersionStore(world.tree).node(snapshot.nodes[NEW].link)
    assert {f.name: f.sha256 for f in manifest.files} == dict(stored.sha256)
    # The engine serves it since the snapshot switch (no restart), at version 1.
    assert _generate(engine, node).node_version == 1


def test_a_node_that_does_not_beat_its_parent_is_neither_served_nor_stored(setup, succeeded):
    world, _, engine, runner = setup
    before = _fingerprint(world)
    training = upload(world.registry, gibberish(), "noise.txt")
    validation = upload(world.registry, MEDICAL_EVAL.read_bytes(), "medical.txt")
    job = queue_job(world, "noise", training, validation_file=validation)
    runner.wake()
    ended = wait_for_end(world.registry, job.job_id)
    assert ended.status == "failed" and ended.error["code"] == "gate"
    assert ended.result["held_out_ppl"] >= ended.result["parent_held_out_ppl"]
    for figure in ("held_out_ppl", "parent_held_out_ppl"):
        assert f"{ended.result[figure]:.4f}" in ended.error["message"]
    assert ended.fine_tuned_model is None
    assert _fingerprint(world) == before
    assert not (world.tree / JOBS_DIR / job.job_id).exists()
    with pytest.raises(Exception, match="not served"):
        _generate(engine, world.node_id("en/medical/noise"))


def test_a_job_cancelled_while_it_trains_leaves_nothing(setup, succeeded):
    world, _, _, runner = setup
    before = _fingerprint(world)
    training = upload(world.registry, world.local("en/medical/cardiology").read_bytes(), "cardiology.txt")
    job = queue_job(world, "long", training, n_epochs=20)  # hundreds of steps: it is cancelled long before
    runner.wake()

    def training_started() -> bool:
        events = list_events(world.registry, job.job_id, TENANT, limit=100)
        return any(e.data.get("phase") == "training" and e.data.get("step", 0) >= 1 for e in events)

    wait_for(training_started, "the first step event")
    request_cancel(world.registry, job.job_id, TENANT)
    runner.wake()  # what FineTuningCalls.cancel does
    ended = wait_for_end(world.registry, job.job_id)
    assert ended.status == "cancelled" and ended.error is None
    assert _fingerprint(world) == before  # nothing served, nothing stored as a version
    assert not (world.tree / JOBS_DIR / job.job_id).exists()


def test_a_restart_fails_the_running_job_and_keeps_serving_the_new_node(setup, succeeded):
    world, _, _, runner = setup
    runner.stop()
    # A job a dead server was running, with what its worker had staged.
    training = upload(world.registry, world.local("en/legal").read_bytes(), "legal.txt")
    left = queue_job(world, "orphan", training)
    assert claim_job(world.registry, TREE, "dead-server").job_id == left.job_id
    staged = world.tree / JOBS_DIR / left.job_id
    staged.mkdir(parents=True)
    (staged / "partial").write_bytes(b"half an adapter")
    again = JobRunner(
        world.registry,
        world.coordinator,
        world.coordinator.policy.customize,
        ProcessLauncher(threads=1),
        worker_name="restarted",
        poll_s=0.2,
    )
    again.start()
    try:
        failed = get_job(world.registry, left.job_id)
        assert failed.status == "failed" and failed.error["code"] == "interrupted"
        assert not staged.exists()
    finally:
        again.stop()
    # A new desk and a new engine over the same tree dir serve the node the job made.
    coordinator = Coordinator.open(world.registry, world.tree, world.coordinator.policy)
    assert coordinator.served_tree().has(world.node_id(NEW))
    engine = Engine(coordinator.tree.base_dir, world.tree, EngineConfig(max_batch_size=2))
    try:
        assert _generate(engine, world.node_id(NEW)).node_version == 1
    finally:
        engine.close()
