"""Run the whole scenario: prepare state, serve, the steps, the report; stop everything."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from examples.demo.scenario import customize, laptop, learning, report, steps
from examples.demo.scenario.server import RayCluster, ServeProcess, interrupt_as_keyboard, restore_sigterm
from examples.demo.scenario.setup import HOSPITAL, prepare


@dataclass(frozen=True)
class DemoConfig:
    tree: Path  # a built tree dir (never written to)
    state: Path  # keys, registry, working copy (re-made each run except keys)
    report: Path  # demo-report/
    notes: Path  # the hospital's local notes for its fine-tune
    cluster: Path | None = None  # a cluster.yaml: serve on a Ray cluster (else one `treelm serve` process)
    max_new_tokens: int = 24
    update_steps: int = 8
    update_lr: float = 0.003
    policy: Path | None = None  # copied to the served tree as update-policy.yaml
    threads: int = 1  # torch threads of the hospital's local fine-tune (a child process)
    clinic_answers: int = 0  # step 5: cardiology answers the clinicians rate and correct (0: skip it)
    clinic_notes: Path | None = None  # step 6: a second clinic's notes for its own node (None: skip it)


class _Clock:
    """Wall time per step, for the closing "where the time went" table."""

    def __init__(self) -> None:
        self.rows: list[list] = []
        self._last = time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self.rows.append([step, round(now - self._last, 1)])
        self._last = now


def run(config: DemoConfig, console: Console | None = None) -> dict[str, steps.Table]:
    """The scenario end to end; returns the tables by name (also written under ``config.report``)."""
    console = console or Console()
    started = time.monotonic()
    console.rule("TreeLM demo: a hospital on a tree of models")
    clock = _Clock()
    state = prepare(config.tree, config.state)
    if config.policy is not None:
        shutil.copyfile(config.policy, state.tree / "update-policy.yaml")
    console.print(f"state in {state.dir}: registry, keys, tokens for st-marys and globex")
    clock.lap("state: tree copy, registry, keys, tokens")
    previous = interrupt_as_keyboard()
    # The hospital fine-tunes on its own machine while the service starts (nothing waits for it until step 4).
    local = steps.LocalFineTune(state, config.notes, config.update_steps, config.update_lr, config.threads)
    server: ServeProcess | None = None
    cluster: RayCluster | None = None
    tables: list[steps.Table] = []
    try:
        if config.cluster is not None:  # every step through the Ray cluster's gRPC ingress
            cluster = RayCluster(state, config.cluster)
            console.print(f"treelm cluster up {cluster.config}")
            cluster.up()
            address, http_url = cluster.address, cluster.http_url
            console.print(f"serving through the Ray cluster: gRPC ingress on {address}, OpenAI API at {http_url}")
            clock.lap("treelm cluster up (Ray head, update desk, replica, ingress)")
        else:  # one process: `treelm serve`
            server = ServeProcess(state)
            server.wait_ready(state.operator_token)
            address, http_url = server.address, server.http_url
            console.print(f"treelm serve {state.tree} on {address} (OpenAI API at {http_url})")
            clock.lap("treelm serve (loading the base)")
        from treelm import Client

        with Client(address, token=state.tokens[HOSPITAL], timeout=600) as client:
            base = json.loads((state.tree / "base" / "config.json").read_text())
            tables.append(steps.match_profiles(client, state.tree_name, int(base.get("max_position_embeddings", 2048))))
            report.show(console, tables[-1])
            clock.lap("1. match")
            console.rule("2. streaming")

            def echo(text: str, end: str = "\n") -> None:
                console.print(text, end=end, markup=False, highlight=False)

            table = steps.ask_the_chain(client, state.tree_name, echo, config.max_new_tokens)
            tables.append(table)
            report.show(console, table)
            clock.lap("2. the question down the chain")
            if http_url is not None:
                tables.append(
                    steps.openai_answer(http_url, state.tokens[HOSPITAL], state.tree_name, echo, config.max_new_tokens)
                )
                report.show(console, tables[-1])
                clock.lap("2b. the same question through the openai client")
            tables.append(steps.tenants(address, state, config.max_new_tokens))
            report.show(console, tables[-1])
            clock.lap("3. tenants")
            console.rule("3b. the clinician's laptop pulls cardiology (treelm pull) and runs it offline")
            device = laptop.pull_and_run(address, state, state.dir / "laptop", config.max_new_tokens, echo)
            tables.append(device.table)
            report.show(console, device.table)
            clock.lap("3b. pull onto the laptop (build, signed download, verify) + offline runs")
            console.rule("4. update (fine-tune, sign, submit, screen, gate, approve)")
            tables.append(steps.update_story(address, state, local, lap=clock.lap))
            report.show(console, tables[-1])
            laptop.check_after_update(address, state, device)
            report.show(console, device.table)
            clock.lap("4e. treelm pull --check on the laptop")
            if config.clinic_answers:
                console.rule("5. learning from use (feedback, the update policy, a signed update)")
                tables.append(
                    learning.learning_story(
                        address,
                        state,
                        answers=config.clinic_answers,
                        on_cluster=cluster is not None,
                        max_new_tokens=config.max_new_tokens,
                        lap=clock.lap,
                    )
                )
                report.show(console, tables[-1])
            if config.clinic_notes is not None and http_url is not None:
                console.rule("6. a second clinic grows the tree (a fine-tuning job through the openai client)")
                tables.append(
                    customize.customize_story(
                        http_url, state, config.clinic_notes, echo, clock.lap, max_new_tokens=config.max_new_tokens
                    )
                )
                report.show(console, tables[-1])
                clock.lap("6b. the new node's first answer, another tenant refused")
            versions = {n.id: n.stable_version for n in client.nodes()}
            with Client(address, token=state.operator_token, timeout=60) as operator:
                tables.append(steps.server_status(operator, cluster.status() if cluster is not None else None))
            report.show(console, tables[-1])
            clock.lap("7. status")
    finally:
        local.stop()
        try:
            if cluster is not None:
                cluster.down()
        finally:
            if server is not None:
                server.stop()
            restore_sigterm(previous)
    clock.lap("treelm cluster down" if cluster is not None else "stop the server")
    chain = next(t for t in tables if t.name == "chain")
    rates = {row[0]: float(row[3]) for row in chain.rows}
    total = round(time.monotonic() - started, 1)
    tables.append(
        steps.Table("timings", "Where the time went (wall seconds)", ["step", "s"], [*clock.rows, ["total", total]])
    )
    report.show(console, tables[-1])
    written = report.write(
        config.report, tables, report.tree_nodes(state.tree, versions), rates, report.forgetting(state.url)
    )
    console.print(f"report: {', '.join(str(p) for p in written)}")
    console.print(f"done in {time.monotonic() - started:.0f} s")
    return {t.name: t for t in tables}
