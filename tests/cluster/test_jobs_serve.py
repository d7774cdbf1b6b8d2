"""`treelm serve` runs fine-tuning jobs when the tree's policy names customize.key: the job's node is
answered over gRPC without a restart (to its owner only), and a key the registry does not trust
stops the command before it loads anything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

import treelm
from cluster.cli import main
from cluster.updates.keys import write_key_files
from hierarchy.updates.keys import SigningKey
from registry.access import create_tenant, issue_token
from registry.jobs import get_job
from registry.trees import get_node
from tests.cluster.jobs_world import CUSTOMIZE, TENANT, chat_file, jobs_world, queue_job, upload, wait_for
from tests.cluster.update_world import REPO, built_tree

NEW = "en/medical/clinic-b"


def _policy(world, key_dir) -> None:
    body = {"customize": CUSTOMIZE | {"key": str(key_dir)}}
    (world.tree / "update-policy.yaml").write_text(yaml.safe_dump(body))


def _serve(world) -> tuple[subprocess.Popen, str, str]:
    """`treelm serve` over the world's tree: (process, gRPC target, what it printed until ready)."""
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    serve = ["serve", str(world.tree), "--db", world.url, "--port", "0", "--threads", "1", "--job-threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *serve, "--grace", "5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"serving ut on (127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1), "".join(lines)
    proc.kill()
    raise AssertionError("".join(lines) + (proc.stderr.read() if proc.stderr else ""))


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


def test_serve_trains_registers_and_answers_a_new_node_and_serves_it_after_a_restart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-jobs")
    world, _ = jobs_world(folder, built_tree(tmp_path_factory))
    _policy(world, folder / "service-key")
    create_tenant(world.registry, "northside")
    owner, other = issue_token(world.registry, TENANT).token, issue_token(world.registry, "northside").token
    proc, target, printed = _serve(world)
    try:
        assert "fine-tuning jobs on" in printed
        node = world.node_id(NEW)
        with treelm.Client(target, token=owner) as client, treelm.Client(target, token=other) as stranger:
            with pytest.raises(treelm.NotFound):  # not yet (and this answer is cached for a second only)
                client.generate(node, "x", max_new_tokens=1)
            content = chat_file(world.local("en/medical/oncology"))
            job = queue_job(world, "clinic-b", upload(world.registry, content, "notes.jsonl"))
            ended = wait_for(lambda: (j := get_job(world.registry, job.job_id)).finished and j, "the job to end")
            assert ended.status == "succeeded", ended.error

            def answered():
                try:
                    return client.generate(node, "The patient", max_new_tokens=2, temperature=0)
                except treelm.NotFound:
                    return None

            reply = wait_for(answered, "the new node to answer", timeout=30)
            assert reply.node == node and reply.node_version == 1
            with pytest.raises(treelm.NotFound):  # another tenant: exactly an unknown node
                stranger.generate(node, "x", max_new_tokens=1)
            # Listed and matched for its owner only (the registry knows it from the job's end).
            assert node in {n.id for n in client.nodes()} and node not in {n.id for n in stranger.nodes()}
            picked = {c.node for c in client.match(NEW, memory="8GiB", tree="ut").candidates}
            assert node in picked
            try:
                foreign = {c.node for c in stranger.match(NEW, memory="8GiB", tree="ut").candidates}
            except treelm.TreeLMError:  # another tenant: no such task in its view of the tree
                foreign = set()
            assert node not in foreign
            # This server is recorded as serving it (match's "remote" suggestions read that).
            deployed = get_node(world.registry, node, include_private=True).deployments
            assert [(d.endpoint, d.status) for d in deployed] == [(target, "active")]
        _stop(proc)
        # A restart: the new node is a node of the tree like any other, served with the same tokens.
        proc, target, _ = _serve(world)
        with treelm.Client(target, token=owner) as client:
            again = client.generate(node, "The patient", max_new_tokens=2, temperature=0)
            assert again.node_version == 1 and again.token_ids == reply.token_ids
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        world.close()


def test_serve_refuses_a_signing_key_the_registry_does_not_trust(tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("serve-untrusted")
    world, _ = jobs_world(folder, built_tree(tmp_path_factory))
    stranger = SigningKey.generate()
    write_key_files(folder / "stranger", stranger)
    _policy(world, folder / "stranger")
    try:
        code = main(["serve", str(world.tree), "--db", world.url, "--port", "0"])
    finally:
        world.close()
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "fine-tuning jobs" in err and stranger.keyid[:16] in err and "Traceback" not in err
