"""The healthcare story, step by step, through the SDK. Each step returns a table (a ``Table``)
that run_demo prints with rich and writes as JSON under demo-report/."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from examples.demo.scenario.setup import HOSPITAL, OTHER, DemoState
from treelm import Client, TreeLMError

QUESTION = "A patient with chest pain and shortness of breath has an abnormal ECG. What should the clinician check?"


@dataclass
class Table:
    """One printed table: a title, column names, rows of plain values, and notes printed under it."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def match_profiles(client: Client, tree: str, max_context: int) -> Table:
    """(1) The registry picks a node and a variant per device profile, with its reasons.

    ``max_context``: the base's own limit (the tiny test base has 512 positions)."""
    profiles = {
        "clinician laptop (cpu, 2 GiB)": dict(
            device="cpu", memory="2GiB", context=min(1024, max_context), bandwidth="20GB/s"
        ),
        "GPU workstation (cuda, 24 GiB)": dict(
            device="cuda", memory="24GiB", context=min(4096, max_context), bandwidth="900GB/s", compute="80TFLOPS"
        ),
    }
    table = Table(
        "match",
        "1. Which model for English cardiology?",
        ["profile", "node", "version", "variant", "fit", "memory", "tokens/s", "score"],
    )
    for name, hw in profiles.items():
        result = client.match("en/medical/cardiology", tree=tree, top=3, **hw)
        if not result.candidates:
            table.rows.append([name, "-", "-", "-", "no fit", "-", "-", "-"])
            table.notes.append(f"{name}: " + "; ".join(s.message for s in result.suggestions))
            continue
        for rank, c in enumerate(result.candidates[:2], 1):  # the choice, and the runner-up for contrast
            tps = f"{c.tokens_per_s:.1f}" if c.tokens_per_s else "-"
            table.rows.append(
                [
                    name if rank == 1 else f"  (#{rank})",
                    c.node,
                    c.version,
                    c.variant,
                    c.fit,
                    _mib(c.memory_bytes),
                    tps,
                    round(c.score, 3),
                ]
            )
            if rank == 1:
                table.notes.append(f"{name}, because: " + "; ".join(c.reasons))
    return table


def ask_the_chain(client: Client, tree: str, echo: Callable[[str], None], max_new_tokens: int) -> Table:
    """(2) The same question to every level on the cardiology path, streamed."""
    table = Table(
        "chain",
        "2. The same clinical question, base -> cardiology (streamed, greedy)",
        ["node", "version", "tokens", "tokens/s", "ttft (s)", "answer"],
    )
    table.notes.append(
        "One request at a time, streamed through the gRPC ingress (and, on a cluster, a Ray replica "
        "with one thread); the hospital's local fine-tune may be running beside it (step 4)."
    )
    for path in ("", "en", "en/medical", "en/medical/cardiology"):
        node = f"{tree}/{path}" if path else tree
        echo(f"{node}: ", end="")
        started, pieces, last = time.monotonic(), [], None
        with _ask(client, node, max_new_tokens) as chunks:
            for chunk in chunks:
                pieces.append(chunk.text)
                echo(chunk.text, end="")
                last = chunk
        echo("")
        wall = time.monotonic() - started
        tokens = last.usage.completion_tokens if last and last.usage else 0
        ttft = last.timings.ttft_s if last and last.timings else 0.0
        rate = tokens / max(wall - ttft, 1e-6) if tokens > 1 else tokens / max(wall, 1e-6)
        table.rows.append(
            [node, last.node_version if last else None, tokens, round(rate, 1), round(ttft, 3), "".join(pieces).strip()]
        )
    return table


def _ask(client: Client, node: str, max_new_tokens: int):
    """The question as a chat turn (instruct bases); as plain text where the base has no chat template."""
    from treelm import InvalidRequest

    params = dict(max_new_tokens=max_new_tokens, temperature=0)
    try:
        stream = client.stream(node, messages=[{"role": "user", "content": QUESTION}], **params)
        first = next(stream)
    except (InvalidRequest, StopIteration):
        return client.stream(node, f"Question: {QUESTION}\nAnswer:", **params)
    return _Prepend(first, stream)


class _Prepend:
    """A stream with its first chunk already read (to learn whether chat worked)."""

    def __init__(self, first, stream):
        self._first, self._stream = first, stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.cancel()

    def __iter__(self):
        yield self._first
        yield from self._stream


def openai_answer(base_url: str, token: str, tree: str, echo: Callable[..., None], max_new_tokens: int) -> Table:
    """(2b) The cardiology answer again, through the OpenAI-compatible HTTP API and the official
    openai client: the same engine, so the same greedy text as the gRPC stream above."""
    import openai

    node = f"{tree}/en/medical/cardiology"
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=600)
    params = dict(model=node, max_tokens=max_new_tokens, temperature=0)
    try:
        reply = client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}], **params)
        call, answer = "chat.completions.create", reply.choices[0].message.content or ""
    except openai.BadRequestError:  # a base without a chat template: the plain prompt, as step 2 did
        reply = client.completions.create(prompt=f"Question: {QUESTION}\nAnswer:", **params)
        call, answer = "completions.create", reply.choices[0].text
    echo(f"openai client -> {base_url} {call}(model={node!r}): {answer.strip()}")
    table = Table(
        "openai", "2b. The same question through the OpenAI API (openai client)", ["client", "call", "model", "answer"]
    )
    table.rows.append([f"openai.OpenAI(base_url={base_url!r})", call, reply.model, answer.strip()])
    table.notes.append(f"response id {reply.id} (the engine's request id); model names the node version that answered")
    return table


def tenants(address: str, state: DemoState, max_new_tokens: int) -> Table:
    """(3) St Mary's uses its private oncology node; another tenant cannot even see it."""
    node = f"{state.tree_name}/en/medical/oncology"
    prompt = "Oncology note: the patient started a second cycle of chemotherapy and"
    table = Table(
        "tenants", "3. A private node: the owner uses it, another tenant is refused", ["tenant", "call", "outcome"]
    )
    for tenant in (HOSPITAL, OTHER):
        with Client(address, token=state.tokens[tenant], timeout=120) as client:
            visible = any(n.id == node for n in client.nodes())
            try:
                r = client.generate(node, prompt, max_new_tokens=max_new_tokens, temperature=0)
                outcome = f"v{r.node_version}: {r.text.strip()!r}"
            except TreeLMError as exc:  # printed the way a user sees it
                outcome = f"{type(exc).__name__}: {exc}"
            table.rows.append([tenant, f"nodes() lists it: {visible}", ""])
            table.rows.append([tenant, f"generate({node})", outcome])
    return table


def _forge(package: Path, out: Path) -> Path:
    """A copy whose signed manifest was edited after signing (the signature no longer covers it)."""
    from cluster.updates.package import read_package, write_package
    from hierarchy.updates import Envelope

    p = read_package(package)
    body = json.loads(p.envelope.payload)
    body["training_data_digest"] = "sha256:" + "1" * 64
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    if out.exists():
        shutil.rmtree(out)
    return write_package(out, Envelope(p.envelope.payload_type, payload, p.envelope.signatures), p.files)


class LocalFineTune:
    """`treelm update make` in a child process: the hospital fine-tunes its node on its own machine
    (here: beside the service, while the cluster starts), then signs the package with its key."""

    def __init__(self, state: DemoState, notes: Path, steps: int, lr: float, threads: int = 1):
        import subprocess
        import sys

        self.package = state.dir / "packages" / "onc-update"
        if self.package.exists():
            shutil.rmtree(self.package)
        self.package.parent.mkdir(parents=True, exist_ok=True)
        node = f"{state.tree_name}/en/medical/oncology"
        args = [
            "update",
            "make",
            state.tree,
            node,
            "--train",
            notes,
            "--key",
            state.keys / HOSPITAL,
            "--out",
            self.package,
            "--steps",
            steps,
            "--lr",
            lr,
            "--threads",
            threads,
            "--json",
        ]
        self._log = state.dir / "update-make.log"
        self._out = open(state.dir / "update-make.json", "w+b")  # noqa: SIM115 (read when the child exits)
        with open(self._log, "wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from cluster.cli import main; sys.exit(main())", *map(str, args)],
                stdout=self._out,
                stderr=err,
                cwd=Path(__file__).resolve().parents[3],
            )

    def result(self, timeout: float = 1800.0) -> dict:
        """Wait for the package; its `--json` summary (version, parent version, local metrics)."""
        from examples.demo.scenario.setup import DemoError

        code = self._proc.wait(timeout)
        self._out.seek(0)
        text = self._out.read().decode()
        self._out.close()
        if code != 0:
            raise DemoError(f"treelm update make exited {code}: {self._log.read_text()[-2000:]}")
        return json.loads(text)

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if not self._out.closed:
            self._out.close()


def served_version(client: Client, node: str, expected: int, timeout_s: float = 10.0) -> int:
    """The version that answers for ``node``, asked until it is ``expected`` (or ``timeout_s`` passed).

    A replica notices a new snapshot on a request at most once a second after it was written, so
    the first answer right after an update may still come from the old version."""
    deadline = time.monotonic() + timeout_s
    while True:
        served = client.generate(node, "The patient", max_new_tokens=2, temperature=0).node_version
        if served == expected or time.monotonic() >= deadline:
            return served
        time.sleep(0.25)


def update_story(
    address: str, state: DemoState, local: LocalFineTune, *, lap: Callable[[str], None] = lambda step: None
) -> Table:
    """(4) Fine-tune locally, sign, submit; screen, aggregate, gate; approve; re-pin; a tampered copy.

    ``local``: the hospital's fine-tune, started earlier; ``lap(step)`` is called after each timed
    part (the demo's "where the time went" table)."""
    tree = state.tree_name
    onc, med = f"{tree}/en/medical/oncology", f"{tree}/en/medical"
    table = Table("update", "4. St Mary's updates its private node; the tree follows", ["step", "who", "result"])
    made = local.result()
    package = local.package
    lap("4a. wait for the local fine-tune + signature (treelm update make, started beside the service)")
    m = made.get("metrics", {})
    table.rows.append(
        [
            "fine-tune on local notes + sign (treelm update make)",
            HOSPITAL,
            f"v{made['version']} over parent v{made['parent_version']}; local eval ppl "
            f"{m.get('eval_ppl_before', float('nan')):.2f} -> {m.get('eval_ppl', float('nan')):.2f}",
        ]
    )
    with Client(address, token=state.tokens[HOSPITAL], timeout=600) as hospital:
        try:
            status = hospital.submit_update(package)
        except TreeLMError as exc:
            table.rows.append(["submit the signed package", HOSPITAL, f"refused: {type(exc).__name__}: {exc}"])
            return table
        lap("4b. submit: verify, screen, gate, aggregate a candidate")
        figures = ", ".join(
            f"{k}={v:.4g}"
            for k, v in sorted(status.figures.items())
            if k.startswith(("screen.norm", "screen.cosine", "gate.passed"))
        )
        table.rows.append(
            [
                "submit: verify, screen, gate, aggregate",
                "parent en/medical",
                f"{status.state}; {figures}; reasons: {'; '.join(status.reasons) or '-'}",
            ]
        )
        served = served_version(hospital, onc, made["version"])
        table.rows.append(["the hospital's node is served at its new version", "engine", f"{onc} v{served}"])
        if status.candidate_id:
            cand = hospital.update_status(status.candidate_id)
            table.rows.append(
                [
                    "candidate parent awaits approvals",
                    "registry",
                    f"{med} v{cand.manifest()['version']}: {cand.state}, "
                    f"{cand.approvals}/{cand.approvals_needed} approvals",
                ]
            )
            for key in ("medical-eval", "operator"):
                done = hospital.approve(status.candidate_id, state.keys / key)
                table.rows.append(
                    [
                        f"approve (signed with keys/{key})",
                        key,
                        f"{done.state}, {done.approvals}/{done.approvals_needed}",
                    ]
                )
            lap("4c. approvals: stable, re-pins, the increment offered one level up")
            table.rows.append(["new stable parent", "registry", f"{med} stable = v{hospital.node(med).stable_version}"])
            for path, chain in _pins(state, med).items():
                table.rows.append(["re-pinned over the new parent", path, chain])
        forged = _forge(package, state.dir / "packages" / "onc-update-tampered")
        try:
            hospital.submit_update(forged)
            table.rows.append(["submit a tampered copy", "attacker", "ACCEPTED (this is a bug)"])
        except TreeLMError as exc:
            kind = getattr(exc, "kind", "")
            table.rows.append(["submit a tampered copy", "attacker", f"refused: {type(exc).__name__} [{kind}]: {exc}"])
        lap("4d. the tampered copy")
    return table


def _pins(state: DemoState, parent: str) -> dict[str, str]:
    """Each child of ``parent``: the chain it is pinned to now (from the registry)."""
    from registry.db import open_registry
    from registry.updates import current_pins

    with open_registry(state.url) as reg:
        pins = current_pins(reg, state.tree_name)
    return {
        node: " -> ".join(f"{x['path'] or 'base'}@v{x['version']}" for x in pin.chain)
        for node, pin in sorted(pins.items())
        if node.startswith(parent + "/")
    }


def server_status(client: Client, cluster: dict | None) -> Table:
    """(5) What the server (or the Ray cluster) is doing."""
    table = Table("status", "6. Cluster status", ["where", "what", "value"])
    s = client.status()
    table.rows.append(["server", "version / uptime", f"{s.version} / {s.uptime_s:.0f} s"])
    for t in s.trunks:
        table.rows.append([f"trunk {t.tree}", "loaded adapters", ", ".join(t.loaded_adapters) or "-"])
        table.rows.append(
            [f"trunk {t.tree}", "queue / running / max batch", f"{t.queue_depth} / {t.running} / {t.max_batch}"]
        )
        table.rows.append(
            [
                f"trunk {t.tree}",
                "adapter cache hits / misses / loads",
                f"{t.cache.hits} / {t.cache.misses} / {t.cache.loads}",
            ]
        )
    if cluster is not None:
        table.rows.extend(cluster_rows(cluster))
    return table


def cluster_rows(status: dict) -> list[list[Any]]:
    """`treelm cluster status --json` as table rows: the ingress, each trunk and replica, each machine."""
    rows: list[list[Any]] = [
        [
            "ray cluster",
            "name / ingress / endpoints",
            f"{status.get('name')} / {status.get('ingress')} / {', '.join(status.get('endpoints', []))}",
        ]
    ]
    for trunk in status.get("trunks", []):
        name = trunk.get("name") or trunk.get("tree") or trunk.get("app", "trunk")
        rows.append(
            [
                f"ray trunk {name}",
                "status / replicas (min..max)",
                f"{trunk.get('status', '?')} / {len(trunk.get('replicas', []))} "
                f"({trunk.get('min_replicas')}..{trunk.get('max_replicas')})",
            ]
        )
        for r in trunk.get("replicas", []):
            p50 = f"{r['p50_ms']:.0f} ms" if isinstance(r.get("p50_ms"), (int, float)) else "-"
            rows.append(
                [
                    f"  replica {r.get('replica')}",
                    f"on {r.get('machine_ip')} pid {r.get('pid')}",
                    f"loaded: {', '.join(r.get('loaded', [])) or '-'}; queue {r.get('queue_depth')}, "
                    f"ongoing {r.get('ongoing')}, completed {r.get('completed')}, p50 {p50}",
                ]
            )
    for n in status.get("machines", []):
        rows.append(
            [
                f"machine {n.get('address')}",
                "head" if n.get("head") else "worker",
                f"alive {n.get('alive')}, {n.get('cpus')} CPUs, {n.get('gpus')} GPUs, {n.get('replicas')} replicas",
            ]
        )
    return rows
