"""The tiny healthcare tree (tests/cluster/update_world.py) with fine-tuning jobs switched on: a
service key the registry trusts as a node key, a ``customize`` policy sized for seconds of
training, uploaded files and queued jobs, and a bounded wait for a job's end."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cluster.jobs.data import parse_training_file
from cluster.updates.keys import register_key, write_key_files
from cluster.updates.policy import CustomizePolicy, UpdatePolicy
from hierarchy.updates.keys import SigningKey
from registry.db import Registry
from registry.jobs import JobRecord, JobRequest, add_file, create_job, get_job
from tests.cluster.update_world import DATA, World, make_world

__all__ = [
    "CUSTOMIZE",
    "MEDICAL_EVAL",
    "TENANT",
    "chat_file",
    "gibberish",
    "jobs_world",
    "queue_job",
    "upload",
    "wait_for",
    "wait_for_end",
]

T = TypeVar("T")
TENANT = "st-marys"
# Seconds of training on the tiny tree: a few dozen steps of 4 x 32 tokens.
CUSTOMIZE = dict(
    held_out=0.2,
    n_epochs=2,
    learning_rate=1e-2,
    lora_rank=4,
    batch_size=4,
    max_seq_len=32,
    max_steps=2000,
)


def jobs_world(folder: Path, built: Path, **customize) -> tuple[World, SigningKey]:
    """A world whose policy runs jobs, signed by a node key (for every node) the registry trusts."""
    key = SigningKey.generate()
    write_key_files(folder / "service-key", key)
    policy = UpdatePolicy(customize=CustomizePolicy(key=str(folder / "service-key"), **(CUSTOMIZE | customize)))
    world = make_world(folder, built, policy)
    register_key(world.registry, key, "node", None, [world.keys.root])
    return world, key


def chat_file(text_file: Path) -> bytes:
    """OpenAI-style chat records from a text file's documents (one clinical note each)."""
    docs = [d.strip() for d in text_file.read_text().split("\n\n") if d.strip()]
    lines = [
        {"messages": [{"role": "user", "content": "Write the next note."}, {"role": "assistant", "content": doc}]}
        for doc in docs
    ]
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def gibberish(chars: int = 6000, seed: int = 0) -> bytes:
    """Text of random letter strings: what no medical node should learn from."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("qxzjkvwy") for _ in range(rng.randint(3, 9))) for _ in range(chars // 6)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n\n".join(lines).encode()


def upload(registry: Registry, content: bytes, filename: str, tenant: str = TENANT) -> str:
    parsed = parse_training_file(content, filename)
    return add_file(
        registry,
        tenant,
        filename,
        "fine-tune",
        content,
        fmt=parsed.format,
        records=len(parsed.records),
        sha256=parsed.sha256,
    ).file_id


def queue_job(
    world: World,
    suffix: str,
    training_file: str,
    *,
    parent: str = "en/medical",
    validation_file: str | None = None,
    tenant: str = TENANT,
    visibility: str = "private",
    **hyper,
) -> JobRecord:
    policy = world.coordinator.policy.customize
    hyperparameters = {
        "n_epochs": policy.n_epochs,
        "learning_rate": policy.learning_rate,
        "lora_rank": policy.lora_rank,
        "batch_size": policy.batch_size,
    } | hyper
    request = JobRequest(
        tenant=tenant,
        parent=world.node_id(parent),
        node=world.node_id(f"{parent}/{suffix}"),
        training_file=training_file,
        validation_file=validation_file,
        visibility=visibility,
        hyperparameters=hyperparameters,
    )
    return create_job(world.registry, request, max_active=None)


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 240.0) -> T:
    """``check()``'s first true answer; AssertionError naming ``what`` if none comes in ``timeout``
    (a bound against hanging, not a measurement: nothing asserts how long it took)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def wait_for_end(registry: Registry, job_id: str) -> JobRecord:
    return wait_for(lambda: (job := get_job(registry, job_id)).finished and job, f"job {job_id} to end")


# The demo's own medical text: what a medical child is measured on.
MEDICAL_EVAL = DATA / "en" / "medical" / "eval.txt"
