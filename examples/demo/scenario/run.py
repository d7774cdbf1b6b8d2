"""Run the whole scenario: prepare state, serve, the five steps, the report; stop everything."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from examples.demo.scenario import report, steps
from examples.demo.scenario.server import RayCluster, ServeProcess, interrupt_as_keyboard, restore_sigterm
from examples.demo.scenario.setup import HOSPITAL, prepare


@dataclass(frozen=True)
class DemoConfig:
    tree: Path  # a built tree dir (never written to)
    state: Path  # keys, registry, working copy (re-made each run except keys)
    report: Path  # demo-report/
    notes: Path  # the hospital's local notes for its fine-tune
    cluster: Path | None = None  # a cluster.yaml to bring up a Ray cluster for the status step
    max_new_tokens: int = 24
    update_steps: int = 8
    update_lr: float = 0.003
    policy: Path | None = None  # copied to the served tree as update-policy.yaml


def run(config: DemoConfig, console: Console | None = None) -> dict[str, steps.Table]:
    """The scenario end to end; returns the tables by name (also written under ``config.report``)."""
    console = console or Console()
    started = time.monotonic()
    console.rule("TreeLM demo: a hospital on a tree of models")
    state = prepare(config.tree, config.state)
    if config.policy is not None:
        shutil.copyfile(config.policy, state.tree / "update-policy.yaml")
    console.print(f"state in {state.dir}: registry, keys, tokens for st-marys and globex")
    previous = interrupt_as_keyboard()
    server = ServeProcess(state)
    cluster = None
    tables: list[steps.Table] = []
    try:
        server.wait_ready(state.tokens[HOSPITAL])
        console.print(f"treelm serve {state.tree} on {server.address}")
        from treelm import Client

        with Client(server.address, token=state.tokens[HOSPITAL], timeout=600) as client:
            base = json.loads((state.tree / "base" / "config.json").read_text())
            tables.append(steps.match_profiles(client, state.tree_name, int(base.get("max_position_embeddings", 2048))))
            report.show(console, tables[-1])
            console.rule("2. streaming")

            def echo(text: str, end: str = "\n") -> None:
                console.print(text, end=end, markup=False, highlight=False)

            table = steps.ask_the_chain(client, state.tree_name, echo, config.max_new_tokens)
            tables.append(table)
            report.show(console, table)
            tables.append(steps.tenants(server.address, state, config.max_new_tokens))
            report.show(console, tables[-1])
            console.rule("4. update (fine-tune, sign, submit, screen, gate, approve)")
            tables.append(steps.update_story(server.address, state, config.notes, config.update_steps, config.update_lr))
            report.show(console, tables[-1])
            versions = {n.id: n.stable_version for n in client.nodes()}
            status = None
            if config.cluster is not None:
                server.stop()  # free the cores for Ray
                cluster = RayCluster(state, config.cluster)
                console.print(f"treelm cluster up {cluster.config}")
                cluster.up()
                with Client(cluster.address, token=state.tokens[HOSPITAL], timeout=600) as ray_client:
                    node = f"{state.tree_name}/en/medical/cardiology"
                    r = ray_client.generate(node, messages=[{"role": "user", "content": steps.QUESTION}],
                                            max_new_tokens=config.max_new_tokens, temperature=0)  # fmt: skip
                    console.print(f"through the Ray cluster: {node} v{r.node_version}: {r.text.strip()!r}",
                                  markup=False, highlight=False)  # fmt: skip
                    tables.append(steps.server_status(ray_client, cluster.status()))
            else:
                tables.append(steps.server_status(client, None))
            report.show(console, tables[-1])
    finally:
        try:
            if cluster is not None:
                cluster.down()
        finally:
            server.stop()
            restore_sigterm(previous)
    chain = next(t for t in tables if t.name == "chain")
    rates = {row[0]: float(row[3]) for row in chain.rows}
    written = report.write(config.report, tables, report.tree_nodes(state.tree, versions), rates)
    console.print(f"report: {', '.join(str(p) for p in written)}")
    console.print(f"done in {time.monotonic() - started:.0f} s")
    return {t.name: t for t in tables}
