"""A served tree that takes fine-tuning jobs, for the transports' tests: the gRPC harness's world
(tree ``rt``, tenants acme and globex, an operator token) and a TreeServer whose FineTuningCalls
have a customize policy with a real signing key for ``rt``. No job runner runs here: jobs stay
queued unless a test moves them through the registry functions a runner calls (claim, events,
finish), which is what the watchers and the CLI's progress read.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import text

from cluster.jobs.data import MIN_TEXT_CHARS
from cluster.service.access import NodeAccess
from cluster.service.fine_tuning import FineTuningCalls
from cluster.service.quota import QuotaPolicy, Quotas, TenantQuota
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.updates.keys import PRIVATE_KEY_FILE, write_key_files
from cluster.updates.policy import CustomizePolicy
from registry.jobs import add_event, claim_job, finish_job, list_jobs
from tests.cluster.grpc_harness import ServerThread, World

TREE = "rt"
PARENT = "rt/en/medical"
PRIVATE_PARENT = "rt/en/legal/contracts"  # acme's private node (a sub-domain: no room below it)
QUOTA = 3  # every tenant's queued and running jobs, unless a test's server says otherwise
_STORED = ("training_files", "fine_tuning_jobs", "fine_tuning_events", "nodes")


def chat_jsonl(records: int = 12, words: int = 30) -> bytes:
    """Chat records of clinical notes, comfortably over the minimum amount of text."""
    lines = []
    for i in range(records):
        answer = " ".join(f"finding{i}-{w}" for w in range(words))
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "You are a clinic's assistant."},
                        {"role": "user", "content": f"Summarise case {i}."},
                        {"role": "assistant", "content": f"Case {i}: {answer}."},
                    ]
                }
            )
        )
    data = ("\n".join(lines) + "\n").encode()
    assert len(data) > 2 * MIN_TEXT_CHARS
    return data


def plain_text(documents: int = 8) -> bytes:
    docs = [" ".join(f"Ward note {d}, line {w}: the patient rested well." for w in range(5)) for d in range(documents)]
    data = "\n\n".join(docs).encode()
    assert len(data) > MIN_TEXT_CHARS
    return data


def fine_tuning_calls(
    world: World,
    key_dir: Path,
    *,
    quota: int = QUOTA,
    trees: tuple[str, ...] = (TREE,),
    limits: TenantQuota | None = None,
):
    """FineTuningCalls over the world's registry; ``trees`` take jobs (a real key signs their nodes)."""
    if not (key_dir / PRIVATE_KEY_FILE).exists():
        write_key_files(key_dir)
    policies = {tree: CustomizePolicy(key=str(key_dir)) for tree in trees}
    access = NodeAccess(world.catalog().node_visibility, ttl_s=0.0)
    quotas = Quotas(QuotaPolicy(limits or TenantQuota(fine_tuning_jobs=quota)))
    return FineTuningCalls(world.registry, access, policies, quotas)


def serve_fine_tuning(world: World, calls: FineTuningCalls | None, **config: Any) -> ServerThread:
    config.setdefault("port", 0)
    config.setdefault("http_port", 0)
    return ServerThread(
        lambda: TreeServer([EngineTrunk(world.engine)], world.catalog(), ServerConfig(**config), fine_tuning=calls)
    )


def stored(world: World) -> Mapping[str, list[tuple]]:
    """Every row of the tables a job or an upload could write (to prove a refusal wrote nothing)."""
    out = {}
    with world.registry.engine.connect() as conn:
        for table in _STORED:
            out[table] = sorted(tuple(map(repr, r)) for r in conn.execute(text(f'SELECT * FROM "{table}"')))
    return out


def move_job(
    world: World,
    job_id: str,
    *,
    steps: int = 3,
    status: str = "succeeded",
    result: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
    pause_s: float = 0.0,
) -> None:
    """What a job runner writes while it works (there is none here): claim the job, report each step,
    end it. The transports under test only read these rows."""
    claimed = claim_job(world.registry, TREE, "test-runner")
    assert claimed is not None and claimed.job_id == job_id, "another queued job was claimed first"
    for step in range(1, steps + 1):
        add_event(
            world.registry, job_id, f"step {step}/{steps}", {"step": step, "total_steps": steps, "loss": 3.0 / step}
        )
        time.sleep(pause_s)
    if status == "succeeded":
        add_event(world.registry, job_id, "held-out perplexity", {"perplexity": 12.0, "parent_perplexity": 18.0})
    finish_job(world.registry, job_id, status, result=result, error=error)


def move_job_later(world: World, job_id: str, **kwargs: Any) -> threading.Thread:
    """``move_job`` in a thread, a step every 0.2 s, so that a watcher sees the events arrive."""
    kwargs.setdefault("pause_s", 0.2)
    thread = threading.Thread(target=move_job, args=(world, job_id), kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def move_next_job_later(world: World, node: str, **kwargs: Any) -> threading.Thread:
    """``move_job`` for the job that will make ``node``, once a client has created it (the CLI
    creates and follows a job in one command, so the test cannot know its id before)."""

    def run() -> None:
        for _ in range(600):
            queued = [j for j in list_jobs(world.registry, None, statuses=("queued",)) if j.node == node]
            if queued:
                move_job(world, queued[0].job_id, **kwargs)
                return
            time.sleep(0.05)
        raise AssertionError(f"no job for {node} was created")

    kwargs.setdefault("pause_s", 0.2)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
