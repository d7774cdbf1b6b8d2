"""`treelm node` against a real TreeServer (gRPC on a real socket), run in-process through the CLI's
entry point (``cluster.cli.main``: exit codes and the error lines users see). No job runner runs:
a test moves a job with the registry calls a runner makes while the command follows it."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from registry.jobs import ACTIVE_JOB_STATUSES, list_jobs, request_cancel
from tests.cluster.fine_tuning_world import (
    PARENT,
    chat_jsonl,
    fine_tuning_calls,
    move_next_job_later,
    plain_text,
    serve_fine_tuning,
    stored,
)
from tests.cluster.grpc_harness import make_world

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("ft-cli"))
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    s = serve_fine_tuning(world, fine_tuning_calls(world, tmp_path_factory.mktemp("keys") / "service"), http_port=None)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def env(monkeypatch, server, world):
    monkeypatch.setenv("TREELM_SERVER", server.target)
    monkeypatch.setenv("TREELM_TOKEN", world.tokens["acme"])
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at the terminal's width
    yield
    for job in list_jobs(world.registry, None, limit=100, statuses=ACTIVE_JOB_STATUSES):
        request_cancel(world.registry, job.job_id, None)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "St Marys Oncology.jsonl"
    path.write_bytes(chat_jsonl())
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_without_waiting_then_jobs_job_and_cancel(capsys, data):
    code, out, err = run(
        capsys, "node", "create", "--parent", PARENT, "--data", str(data), "--epochs", "2", "--no-wait", "--json"
    )
    assert code == 0, err
    job = json.loads(out)
    assert job["status"] == "queued" and job["node"] == f"{PARENT}/st-marys-oncology"  # the suffix from the file
    assert job["hyperparameters"]["n_epochs"] == 2 and job["visibility"] == "private"

    code, out, _ = run(capsys, "node", "jobs", "--json")
    assert code == 0 and job["id"] in [j["id"] for j in json.loads(out)["jobs"]]
    code, out, _ = run(capsys, "node", "jobs")
    assert code == 0 and job["id"] in out and "queued" in out
    code, out, _ = run(capsys, "node", "job", job["id"], "--json")
    assert code == 0 and [e["message"] for e in json.loads(out)["events"]] == ["job queued"]
    code, out, _ = run(capsys, "node", "job", job["id"])
    assert code == 0 and "job queued" in out and "st-marys-oncology (not made)" in out

    code, out, _ = run(capsys, "node", "cancel", job["id"])
    assert code == 0 and out.strip() == f"job {job['id']} cancelled"
    code, _, err = run(capsys, "node", "cancel", job["id"])
    assert code == 2 and "already ended (cancelled)" in err


def test_create_follows_the_job_with_progress_and_prints_both_perplexities(capsys, world, data):
    node = f"{PARENT}/oncology-two"
    result = {"perplexity": 12.0, "parent_perplexity": 18.0, "version": 1, "timings": {"training_s": 4.2}}
    runner = move_next_job_later(world, node, steps=3, result=result)
    code, out, err = run(capsys, "node", "create", "--parent", PARENT, "--data", str(data), "--suffix", "oncology-two")
    runner.join(10)
    assert code == 0, err
    assert "job started on test-runner" in out and "3/3" in out and "loss 1.0000" in out  # the bar's last state
    assert node in out and "12 (parent 18, -33.3%)" in out and "timings.training_s" in out and "4.2" in out


def test_a_job_that_made_no_node_prints_why_and_exits_2(capsys, world, data):
    node = f"{PARENT}/oncology-three"
    error = {"code": "gate", "message": "held-out perplexity 19.5 is not below the parent's 18.0"}
    runner = move_next_job_later(world, node, steps=1, status="failed", error=error, result={"perplexity": 19.5})
    code, out, err = run(
        capsys, "node", "create", "--parent", PARENT, "--data", str(data), "--suffix", "oncology-three", "--json"
    )
    runner.join(10)
    assert code == 2 and "failed (gate)" in err and "19.5" in err
    printed = json.loads(out)
    assert printed["status"] == "failed" and printed["error"]["code"] == "gate" and printed["fine_tuned_model"] is None


def test_refusals_say_what_to_do_and_store_nothing(capsys, world, data, tmp_path):
    before_jobs = stored(world)["fine_tuning_jobs"]
    code, _, err = run(capsys, "node", "create", "--parent", "rt/en/nowhere", "--data", str(data))
    assert code == 2 and "unknown node 'rt/en/nowhere'" in err
    code, _, err = run(capsys, "node", "create", "--parent", PARENT, "--data", str(data), "--suffix", "radiology")
    assert code == 2 and "exists already: choose another suffix" in err
    small = tmp_path / "small.txt"
    small.write_text("too little")
    code, _, err = run(capsys, "node", "create", "--parent", PARENT, "--data", str(small))
    assert code == 2 and "characters of training text" in err
    code, _, err = run(capsys, "node", "create", "--parent", PARENT, "--data", str(data), "--public")
    assert code == 2 and "operator" in err
    code, _, err = run(capsys, "node", "create", "--parent", PARENT, "--data", str(tmp_path / "absent.jsonl"))
    assert code == 2 and "absent.jsonl" in err  # typer's usage error, before any call
    code, _, err = run(capsys, "node", "job", "ftjob-nope")
    assert code == 2 and "no fine-tuning job 'ftjob-nope'" in err
    assert stored(world)["fine_tuning_jobs"] == before_jobs


def fragment(tmp_path, **changes) -> str:
    (tmp_path / "onc.txt").write_bytes(plain_text())
    (tmp_path / "onc-eval.txt").write_bytes(plain_text(6))
    body = {
        "name": "oncology-public",
        "description": "Oncology notes.",
        "data": {"train": "onc.txt", "eval": "onc-eval.txt"},
        "lora": {"r": 4},
        "training": {"epochs": 2, "lr": 0.001},
    } | changes
    path = tmp_path / "oncology.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return str(path)


def test_an_operator_adds_a_public_node_from_a_spec_fragment(capsys, monkeypatch, world, tmp_path):
    path = fragment(tmp_path)
    monkeypatch.setenv("TREELM_TOKEN", world.operator_token)
    code, out, err = run(capsys, "node", "add", path, "--parent", PARENT, "--no-wait", "--json")
    assert code == 0, err
    job = json.loads(out)
    assert job["node"] == f"{PARENT}/oncology-public" and job["visibility"] == "public"
    assert (job["hyperparameters"]["n_epochs"], job["hyperparameters"]["lora_rank"]) == (2, 4)
    assert job["hyperparameters"]["learning_rate"] == pytest.approx(0.001) and job["validation_file"]
    assert "keeps no description" in err


def test_a_tenant_cannot_add_a_public_node_and_a_bad_fragment_is_refused_before_any_call(capsys, world, tmp_path):
    before = stored(world)
    code, _, err = run(capsys, "node", "add", fragment(tmp_path, name="oncology-tenant"), "--parent", PARENT)
    assert code == 2 and "only an operator token may create a public node" in err
    for changes, words in (
        ({"level": "subdomain"}, "unknown key 'level'"),
        ({"training": {"steps": 30}}, "a job trains in epochs"),
        ({"data": {"train": "missing.txt"}}, "is not a file"),
        ({"name": None}, "'name' must name the new node"),
    ):
        code, _, err = run(capsys, "node", "add", fragment(tmp_path, **changes), "--parent", PARENT)
        assert code == 2 and words in err, err
    assert stored(world)["fine_tuning_jobs"] == before["fine_tuning_jobs"]


def test_retire_is_for_operators_and_says_when_the_server_cannot(capsys, monkeypatch, world):
    code, _, err = run(capsys, "node", "retire", "rt/en/legal")
    assert code == 2 and "operator token" in err
    monkeypatch.setenv("TREELM_TOKEN", world.operator_token)
    code, _, err = run(capsys, "node", "retire", "rt/en/legal", "--force")
    assert code == 2 and "update coordinator" in err
