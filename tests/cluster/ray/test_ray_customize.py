"""A tenant grows the tree on a real Ray cluster while it serves (issue 16's end-to-end must-show).

Tenant acme uploads its notes and creates a job through the official `openai` client; meanwhile a
thread keeps generating with other nodes. The update desk's runner trains the node in a Ray task of
its own (one CPU, cluster.yaml's ``job_cpus``), gates it on held-out text, registers, signs and
serves it; the trunk replica picks the node up from the snapshot without a restart.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest

from cluster.ray.priority import BACKGROUND_NICENESS
from tests.cluster.http_harness import openai_client
from tests.cluster.jobs_world import chat_file
from tests.cluster.ray.cluster_harness import wait_until
from tests.cluster.update_world import DATA

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

PARENT = "rt/en/medical"
OTHERS = ("rt/en", "rt/en/legal", "rt/fr/medical", "rt/en/medical/radiology")


class Traffic:
    """Keeps generating with other nodes (the SDK's openai twin) until stopped; counts what failed."""

    def __init__(self, base_url: str, token: str):
        self.client = openai_client(base_url, token)
        self.ok, self.failed = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            model = OTHERS[i % len(OTHERS)]
            i += 1
            try:
                self.client.completions.create(model=model, prompt="The patient", max_tokens=4, temperature=0)
                self.ok += 1
            except openai.OpenAIError as exc:
                self.failed.append(f"{model}: {exc}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def test_a_tenant_grows_the_tree_through_the_openai_client_while_the_cluster_serves(ray_world):
    w = ray_world.world
    owner = openai_client(ray_world.http_url, w.tokens["acme"])
    other = openai_client(ray_world.http_url, w.tokens["globex"])
    notes = chat_file(DATA / "en" / "medical" / "oncology" / "train.txt")
    with Traffic(ray_world.http_url, w.tokens["globex"]) as traffic:
        uploaded = owner.files.create(file=("notes.jsonl", notes), purpose="fine-tune")
        job = owner.fine_tuning.jobs.create(model=PARENT, training_file=uploaded.id, suffix="acme-oncology")
        assert job.status == "queued"
        job = wait_until(
            lambda: (j := owner.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
            timeout=400,
            what=f"job {job.id} to end",
            every=0.5,
        )
        ended = time.monotonic()
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"{PARENT}/acme-oncology"
        # Served within a bounded time of the job's end, by the replica that was running all along.
        answer = wait_until(
            lambda: _answer(owner, job.fine_tuned_model), timeout=30, what="the new node's first answer"
        )
        answered_after = time.monotonic() - ended
        assert answer.model == f"{job.fine_tuned_model}@1" and answer.choices[0].text  # version 1 answered
    assert traffic.failed == [] and traffic.ok > 0, traffic.failed[:3]
    assert answered_after < 30
    result = job.model_extra["result"]
    assert result["held_out_ppl"] < result["parent_held_out_ppl"]
    # Another tenant: the very answer of an unknown model, on every route.
    with pytest.raises(openai.NotFoundError) as refused:
        other.completions.create(model=job.fine_tuned_model, prompt="The patient", max_tokens=2)
    assert refused.value.body["code"] == "model_not_found"
    assert job.fine_tuned_model not in {m.id for m in other.models.list()}
    assert job.fine_tuned_model in {m.id for m in owner.models.list()}
    # The job ran as a Ray task with its own CPU request (anywhere in the cluster), not in the desk.
    assert result["ran_on"]["resources"].get("CPU") == 1.0 and result["ran_on"]["ray_node"]
    assert result["ran_on"]["niceness"] == BACKGROUND_NICENESS  # below the replica that kept answering


def _answer(client, model: str):
    try:
        return client.completions.create(model=model, prompt="The patient", max_tokens=4, temperature=0)
    except openai.NotFoundError:
        return None
