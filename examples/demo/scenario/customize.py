"""(6) A second clinic grows the tree: it uploads its notes and gets its own private node while the
other tenants keep being served.

Northfield's paediatric clinic uses the official `openai` client only: ``files.create`` with its
notes (examples/demo/northfield-notes.txt), ``fine_tuning.jobs.create`` under demo/en/medical. The
service trains the node (a worker process next to `treelm serve`; a Ray task on the cluster), keeps
it only because it beats its parent on the held-out notes, signs and registers it as version 1,
private to northfield, and serves it without a restart. All the while another thread asks
cardiology, radiology and en (St Mary's token): none of those requests may fail. Then the new
node answers its owner, and globex gets the same 404 as for a model that does not exist.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from examples.demo.scenario.setup import CLINIC, HOSPITAL, OTHER, DemoError, DemoState
from examples.demo.scenario.steps import Table

__all__ = ["SUFFIX", "customize_story"]

SUFFIX = "northfield-paediatrics"
QUESTION = "Write the plan for a 3-year-old boy with wheeze and a barking cough at night."


class _Traffic:
    """Other tenants' requests, one after another, until stopped: how many, how many failed."""

    def __init__(self, base_url: str, token: str, nodes: list[str], max_new_tokens: int):
        import openai

        self._client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=600)
        self._nodes, self._tokens = nodes, max_new_tokens
        self.ok, self.failed = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def _run(self) -> None:
        import openai

        i = 0
        while not self._stop.is_set():
            node = self._nodes[i % len(self._nodes)]
            i += 1
            try:
                self._client.completions.create(
                    model=node, prompt="Clinical note:", max_tokens=self._tokens, temperature=0
                )
                self.ok += 1
            except openai.OpenAIError as exc:
                self.failed.append(f"{node}: {exc}")

    def __enter__(self) -> _Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(600)


def customize_story(
    base_url: str,
    state: DemoState,
    notes: Path,
    echo: Callable[[str], None],
    lap: Callable[[str], None],
    max_new_tokens: int = 24,
    timeout_s: float = 1800.0,
) -> Table:
    import openai

    tree = state.tree_name
    parent = f"{tree}/en/medical"
    clinic = openai.OpenAI(base_url=base_url, api_key=state.tokens[CLINIC], max_retries=0, timeout=600)
    other = openai.OpenAI(base_url=base_url, api_key=state.tokens[OTHER], max_retries=0, timeout=600)
    others = [f"{tree}/en/medical/cardiology", f"{tree}/en/medical/radiology", f"{tree}/en"]
    table = Table(
        "customize",
        "6. A second clinic grows the tree (openai client: files.create, fine_tuning.jobs.create)",
        ["what", "value"],
    )
    with _Traffic(base_url, state.tokens[HOSPITAL], others, 8) as traffic:
        submitted = time.monotonic()
        with notes.open("rb") as fh:
            uploaded = clinic.files.create(file=(notes.name, fh), purpose="fine-tune")
        job = clinic.fine_tuning.jobs.create(model=parent, training_file=uploaded.id, suffix=SUFFIX)
        echo(f"northfield: files.create -> {uploaded.id} ({uploaded.bytes} bytes); jobs.create -> {job.id}")
        seen: set[str] = set()
        while job.status in ("queued", "running"):
            if time.monotonic() - submitted > timeout_s:
                clinic.fine_tuning.jobs.cancel(job.id)
                raise DemoError(f"job {job.id} did not end within {timeout_s:.0f} s (cancelled)")
            time.sleep(1.0)
            for event in reversed(list(clinic.fine_tuning.jobs.list_events(job.id, limit=20))):
                if event.id not in seen:
                    seen.add(event.id)
                    echo(f"  {job.id}: {event.message}")
            job = clinic.fine_tuning.jobs.retrieve(job.id)
        ended = time.monotonic()
        lap("6a. the clinic's job: upload, queue, train, gate, register")
        if job.status != "succeeded":
            raise DemoError(f"job {job.id} ended {job.status}: {job.error}")
        node = job.fine_tuned_model
        stream = clinic.chat.completions.create(
            model=node,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=max_new_tokens,
            temperature=0,
            stream=True,
        )
        first, answer = None, ""
        for chunk in stream:
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                first = first if first is not None else time.monotonic() - ended
                answer += text
        echo(f"northfield -> {node}: {answer.strip()}")
    try:
        other.completions.create(model=node, prompt="Clinical note:", max_tokens=2)
        foreign = "answered (wrong: the node is private)"
    except openai.NotFoundError as exc:
        foreign = f"404 {exc.body.get('code') if isinstance(exc.body, dict) else ''}".strip()
    result = dict((job.model_extra or {}).get("result") or {})
    table.rows += [
        ["job", f"{job.id}: {job.status}, fine_tuned_model {node}"],
        [
            "held-out perplexity",
            f"parent {result.get('parent_held_out_ppl', 0):.2f} -> node {result.get('held_out_ppl', 0):.2f}",
        ],
        ["training", f"{result.get('steps')} steps, {job.trained_tokens or result.get('trained_tokens')} tokens"],
        [
            "seconds: queue / train / gate / register",
            " / ".join(f"{float(result.get(k, 0)):.1f}" for k in ("queue_s", "train_s", "gate_s", "register_s")),
        ],
        ["first token after the job's end", f"{first:.2f} s" if first is not None else "none"],
        ["submission -> first token", f"{(ended - submitted) + (first or 0):.1f} s"],
        ["other tenants' requests meanwhile", f"{traffic.ok} answered, {len(traffic.failed)} failed"],
        [f"{OTHER} asks {node}", foreign],
        ["northfield's answer", answer.strip()],
    ]
    if traffic.failed:
        raise DemoError(f"{len(traffic.failed)} requests failed while the node was made: {traffic.failed[:3]}")
    table.notes.append("private to northfield: /v1/models lists it for northfield only; signed by the service key")
    return table
