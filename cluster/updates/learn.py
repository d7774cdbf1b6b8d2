"""From users' feedback to signed updates: the update-timing policy and `update make --from-feedback`.

A tenant's feedback on a node (registry/feedback.py) becomes training documents: each retained
prompt rendered through the base's chat template, followed by the answer to learn (a correction,
or an answer rated +1), mixed with documents of the node's own training text (``replay``: the
rehearsal that keeps the node what it was). The newest ``held_out`` share is not trained on; it is appended to the
node's held-out feedback file (``TREE_DIR/feedback-eval/PATH.txt``), which the gate measures every
later update of the node on, so an update must improve on what users said (GateBounds.feedback).
The package is made by the same `update make` code and submitted like any other: screened, gated,
aggregated upward, approved.

When: :func:`decide` reads one (node, tenant)'s feedback figures against the policy (enough
new corrections, a rise of the negative-rating rate over the last update's, a maximum age) and
says make or wait, with the reason; :class:`FeedbackLearner` runs it for every node of a tree
(`treelm update tick`, and the Ray desk's timer), records every decision in the registry
(`treelm update log`) and makes the updates. Training data are one tenant's records only.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cluster.errors import PackageError
from cluster.updates.make import MadePackage, make_package
from cluster.updates.package import read_package
from cluster.updates.policy import FeedbackPolicy
from cluster.updates.workbench import feedback_eval_file
from hierarchy.errors import UpdateError
from hierarchy.ids import NodeId
from hierarchy.updates.keys import SigningKey
from nodes.build.gate import node_text
from nodes.errors import GateTextMissing
from registry.db import Registry
from registry.feedback import (
    DecisionRecord,
    FeedbackStats,
    TrainingExample,
    feedback_stats,
    list_decisions,
    mark_used,
    record_decision,
    training_examples,
)

__all__ = [
    "Decision",
    "FeedbackLearner",
    "FeedbackMade",
    "decide",
    "make_from_feedback",
    "render_examples",
]

log = logging.getLogger("treelm.updates.learn")


@dataclass(frozen=True)
class Decision:
    make: bool
    reason: str


def decide(stats: FeedbackStats, policy: FeedbackPolicy, now: datetime | None = None) -> Decision:
    """Make an update from this feedback now, or wait; the reason names the rule and its figures."""
    now = now or datetime.now(UTC)
    enough = f"{stats.trainable_waiting} trainable record(s)"
    if stats.corrections_waiting >= policy.min_corrections:
        return Decision(True, f"{stats.corrections_waiting} new corrections >= {policy.min_corrections}")
    waiting = stats.positive_waiting + stats.negative_waiting
    baseline = stats.baseline_negative_rate
    if policy.negative_rate_rise is not None and baseline is not None and waiting >= policy.min_ratings:
        rise = stats.negative_rate - baseline
        if rise >= policy.negative_rate_rise:
            if stats.trainable_waiting >= policy.min_trainable:
                return Decision(
                    True,
                    f"negative rate {stats.negative_rate:.0%} over {waiting} ratings rose {rise:.0%} >= "
                    f"{policy.negative_rate_rise:.0%} over the last update's {baseline:.0%}",
                )
            return Decision(False, f"negative rate rose {rise:.0%} but only {enough} < {policy.min_trainable}")
    if policy.max_age_s is not None and stats.oldest_waiting is not None:
        age = (now - stats.oldest_waiting).total_seconds()
        if age >= policy.max_age_s:
            if stats.trainable_waiting >= policy.min_trainable:
                return Decision(True, f"oldest waiting feedback is {age:.0f} s old >= {policy.max_age_s:.0f} s")
            return Decision(False, f"oldest feedback is {age:.0f} s old but only {enough} < {policy.min_trainable}")
    return Decision(False, f"{stats.corrections_waiting} new corrections < {policy.min_corrections}")


def _one_paragraph(text: str) -> str:
    # Training splits documents at blank lines (nodes/build/training.py): keep each example whole.
    while "\n\n" in text:
        text = text.replace("\n\n", "\n")
    return text.strip()


def render_examples(tokenizer: Any, examples: Sequence[TrainingExample]) -> str:
    """Each example as one document: the prompt as the server rendered it, then the target answer."""
    docs = []
    for e in examples:
        if "messages" in e.prompt and getattr(tokenizer, "chat_template", None):
            messages = [{"role": m["role"], "content": _one_paragraph(m["content"])} for m in e.prompt["messages"]]
            messages.append({"role": "assistant", "content": _one_paragraph(e.target)})
            docs.append(_one_paragraph(tokenizer.apply_chat_template(messages, tokenize=False)))
        else:
            prompt = e.prompt.get("prompt") or " ".join(m["content"] for m in e.prompt.get("messages", []))
            docs.append(_one_paragraph(f"{prompt}{e.target}"))
    return "\n\n".join(d for d in docs if d)


def _replay_docs(tree: Any, node_id: NodeId, examples: int, share: float, seed: int) -> list[str]:
    """Documents of the node's own training text, so that ``share`` of what it trains on is them.

    Rehearsal against forgetting: on the demo tree (10 steps, lr 2e-3), corrections alone raised
    the cardiology node's own eval perplexity by 114%; with half its own text it fell by 40%, while
    the held-out feedback's fell by 86% (91% alone). A tree that records no training text gets none."""
    if share <= 0:
        return []
    try:
        text = node_text(tree, tree.node(node_id), "train").text
    except GateTextMissing:
        log.warning("%s records no training text: its feedback update replays none", node_id)
        return []
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    rng = random.Random(seed)
    return [rng.choice(docs) for _ in range(round(examples * share / (1 - share)))] if docs else []


@dataclass(frozen=True)
class FeedbackMade:
    """A package made from feedback, and which records it trained on and held out."""

    made: MadePackage
    trained: tuple[int, ...]
    held_out: tuple[int, ...]
    eval_file: Path
    eval_before: str | None  # the held-out file's previous content (None: it did not exist)

    def restore_eval(self) -> None:
        """Undo the held-out append (the update was refused: nothing of it stays)."""
        _restore(self.eval_file, self.eval_before)


def _restore(eval_file: Path, before: str | None) -> None:
    if before is None:
        eval_file.unlink(missing_ok=True)
    else:
        eval_file.write_text(before)


def make_from_feedback(
    reg: Registry,
    tree_dir: str | Path,
    node: str,
    tenant: str | None,
    key: SigningKey,
    out: str | Path,
    policy: FeedbackPolicy,
    *,
    seed: int = 0,
) -> FeedbackMade:
    """Fine-tune ``node`` on ``tenant``'s waiting feedback and write a signed package to ``out``."""
    from transformers import AutoTokenizer

    from nodes.store.versions import open_served_tree

    node_id = NodeId.parse(node)
    examples = training_examples(reg, str(node_id), tenant)
    if len(examples) < 2:
        raise PackageError(
            f"{len(examples)} usable feedback record(s) of {tenant or 'anonymous'!r} on {node_id}: an update "
            "needs corrections or positive ratings on responses whose texts were retained (see `treelm feedback`)",
            field="from_feedback",
        )
    cut = max(1, round(len(examples) * policy.held_out))
    train, held = examples[:-cut], examples[-cut:]  # the newest are held out
    tree = open_served_tree(tree_dir)
    tokenizer = AutoTokenizer.from_pretrained(tree.base_dir, local_files_only=True)
    replay = _replay_docs(tree, node_id, len(train), policy.replay, seed)
    eval_file = feedback_eval_file(tree_dir, str(node_id.path))
    before = eval_file.read_text() if eval_file.is_file() else None
    held_text = render_examples(tokenizer, held)
    eval_file.parent.mkdir(parents=True, exist_ok=True)
    eval_file.write_text(f"{before.rstrip()}\n\n{held_text}\n" if before else f"{held_text}\n")
    try:
        with tempfile.TemporaryDirectory(prefix="treelm-feedback-") as scratch:
            train_file = Path(scratch) / "train.txt"
            train_file.write_text("\n\n".join([render_examples(tokenizer, train), *replay]))
            made = make_package(
                tree_dir,
                str(node_id),
                train_file,
                key,
                out,
                eval_file=eval_file,
                steps=policy.steps,
                lr=policy.lr,
                seed=seed,
            )
    except BaseException:
        _restore(eval_file, before)
        raise
    return FeedbackMade(
        made, tuple(e.feedback_id for e in train), tuple(e.feedback_id for e in held), eval_file, before
    )


class FeedbackLearner:
    """Evaluates the feedback policy for every node of one coordinator's tree and makes the updates."""

    def __init__(self, coordinator: Any, load_key: Callable[[str], SigningKey], clock: Callable[[], float] = time.time):
        self.coordinator = coordinator
        self._load_key = load_key
        self.clock = clock

    @property
    def policy(self) -> FeedbackPolicy:
        return self.coordinator.policy.feedback

    def tick(self) -> list[DecisionRecord]:
        """One pass over the tree's nodes with feedback; returns the decisions it recorded."""
        reg: Registry = self.coordinator.registry
        tree = self.coordinator.tree
        now = datetime.fromtimestamp(self.clock(), tz=UTC)
        recorded = []
        for stats in feedback_stats(reg):
            node_id = NodeId.parse(stats.node)
            if node_id.tree != tree.name or not tree.has(node_id):
                continue
            policy = self.policy.for_node(str(node_id.path))
            decision = decide(stats, policy, now)
            subject = f"{stats.node} ({stats.tenant or 'anonymous'})"
            if not decision.make:
                if self._changed(stats.node, "wait", f"{subject}: {decision.reason}"):
                    recorded.append(record_decision(reg, stats.node, "wait", f"{subject}: {decision.reason}"))
                continue
            if policy.key is None:
                reason = f"{subject}: {decision.reason}, but the policy names no feedback.key to sign with"
                if self._changed(stats.node, "wait", reason):
                    recorded.append(record_decision(reg, stats.node, "wait", reason))
                continue
            recorded.append(self._make(stats, policy, decision, subject))
        return recorded

    def _changed(self, node: str, action: str, reason: str) -> bool:
        """A wait is logged only when its reason differs from the node's last decision (cron runs often)."""
        last = list_decisions(self.coordinator.registry, node, limit=1)
        return not last or (last[0].action, last[0].reason) != (action, reason)

    def _make(self, stats: FeedbackStats, policy: FeedbackPolicy, decision: Decision, subject: str) -> DecisionRecord:
        reg: Registry = self.coordinator.registry
        detail: dict[str, Any] = {"tenant": stats.tenant, "corrections": stats.corrections_waiting}
        with tempfile.TemporaryDirectory(prefix="treelm-feedback-pkg-") as scratch:
            out = Path(scratch) / "package"
            try:
                made = make_from_feedback(
                    reg,
                    self.coordinator.store.root,
                    stats.node,
                    stats.tenant,
                    self._load_key(str(policy.key)),
                    out,
                    policy,
                )
            except (PackageError, UpdateError) as exc:
                return record_decision(reg, stats.node, "failed", f"{subject}: {decision.reason}; {exc}", detail=detail)
            detail |= {"trained": len(made.trained), "held_out": len(made.held_out), **dict(made.made.metrics)}
            try:
                status = self.coordinator.submit(read_package(out))
            except UpdateError as exc:  # screening or the gate refused it: nothing of it stays
                made.restore_eval()
                # These records taught nothing acceptable; they stop triggering updates (the tenant keeps them).
                mark_used(reg, [*made.trained, *made.held_out], f"refused-{int(self.clock())}")
                return record_decision(
                    reg, stats.node, "refused", f"{subject}: {decision.reason}; refused: {exc}", detail=detail
                )
        mark_used(reg, [*made.trained, *made.held_out], status.update_id)
        log.info("made update %s for %s because %s", status.update_id, stats.node, decision.reason)
        return record_decision(
            reg,
            stats.node,
            "make",
            f"made update for {subject} because {decision.reason}",
            update_id=status.update_id,
            detail=detail | {"state": status.state},
        )
