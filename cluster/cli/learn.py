"""The feedback side of `treelm update`: `make --from-feedback`, the policy's pass in `tick`, its `log`.

Kept apart from cluster/cli/updates.py (the protocol's commands), which calls these.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from cluster.updates.coordinator import Coordinator
    from hierarchy.updates.keys import SigningKey
    from registry.feedback import DecisionRecord

__all__ = ["decision_rows", "feedback_tick", "make_from_feedback_command", "print_decisions"]


def make_from_feedback_command(
    tree_dir: Path,
    node_id: str,
    tenant: str | None,
    db: str | None,
    signer: SigningKey,
    out: Path,
    policy_file: Path | None,
    steps: int | None,
    lr: float | None,
    seed: int,
    as_json: bool,
) -> None:
    """`update make TREE --from-feedback NODE`: the tenant's waiting feedback as a signed package."""
    from dataclasses import replace

    from cluster.updates.learn import make_from_feedback
    from cluster.updates.policy import UpdatePolicy
    from hierarchy.ids import NodeId
    from registry.db import open_registry
    from registry.feedback import mark_used

    policy = UpdatePolicy.for_tree(tree_dir, policy_file).feedback.for_node(str(NodeId.parse(node_id).path))
    policy = replace(policy, steps=steps or policy.steps, lr=lr or policy.lr)
    with open_registry(db) as reg:
        with Console(stderr=True).status(f"fine-tuning {escape(node_id)} on feedback for {policy.steps} steps ..."):
            made = make_from_feedback(reg, tree_dir, node_id, tenant, signer, out, policy, seed=seed)
        # The records are spoken for: the policy will not train on them again (the package carries them).
        mark_used(reg, [*made.trained, *made.held_out], f"package-{made.made.manifest.digest[7:23]}")
    m, metrics = made.made.manifest, made.made.metrics
    if as_json:
        print(
            json.dumps(
                {
                    "package": str(made.made.path),
                    "node": str(m.node),
                    "version": m.version,
                    "trained": len(made.trained),
                    "held_out": len(made.held_out),
                    "eval_file": str(made.eval_file),
                    "metrics": dict(metrics),
                },
                indent=2,
            )
        )
        return
    Console().print(
        f"[green]wrote[/green] {escape(str(made.made.path))}: {escape(str(m.node))} v{m.version} from "
        f"{len(made.trained)} feedback record(s) ({len(made.held_out)} held out in {escape(str(made.eval_file))}); "
        f"held-out perplexity {metrics['eval_ppl_before']:.2f} -> {metrics['eval_ppl']:.2f}"
    )


def feedback_tick(coordinator: Coordinator, load_key: Callable[[str], SigningKey]) -> Sequence[DecisionRecord]:
    from cluster.updates.learn import FeedbackLearner

    return FeedbackLearner(coordinator, load_key).tick()


def decision_rows(decisions: Sequence[DecisionRecord]) -> list[dict[str, Any]]:
    return [
        {"at": d.at.isoformat(), "node": d.node, "action": d.action, "reason": d.reason, "update_id": d.update_id}
        for d in decisions
    ]


def print_decisions(decisions: Sequence[DecisionRecord], title: str = "update policy decisions") -> None:
    table = Table(title=title)
    for col in ("at", "node", "action", "reason", "update"):
        table.add_column(col, overflow="fold")
    for d in decisions:
        table.add_row(
            d.at.strftime("%Y-%m-%d %H:%M:%S"), escape(d.node), d.action, escape(d.reason), (d.update_id or "-")[:12]
        )
    Console().print(table)
