"""Feedback becomes a signed update when the policy says so; the node learns what users corrected.

Scripted clinicians rate and correct 240 cardiology answers against a truth set; `update tick`
(here: the learner the CLI and the Ray desk run) decides with a recorded reason, fine-tunes on the
one tenant's retained records, holds out the newest, and submits the package through the real
protocol (screening, gate with the held-out feedback check, aggregation into en/medical). The
node's perplexity on the truth set's eval part falls. Deleted records never reach training.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from cluster.updates.keys import load_signing_key, write_key_files
from cluster.updates.learn import FeedbackLearner, decide, render_examples
from cluster.updates.policy import FeedbackPolicy, UpdatePolicy
from cluster.updates.workbench import feedback_eval_file
from nodes.build.finetune import chain_perplexity
from nodes.build.gate import GateBounds
from nodes.build.training import tokenize_text
from registry.feedback import (
    FeedbackStats,
    ResponseEntry,
    TrainingExample,
    add_feedback,
    delete_feedback,
    feedback_stats,
    list_decisions,
    record_responses,
    training_examples,
)
from registry.updates import list_updates
from tests.cluster.update_world import TREE, built_tree, make_world, served

CARD = "en/medical/cardiology"
NODE = f"{TREE}/{CARD}"
DRUGS = ["aspirin", "heparin", "warfarin", "atenolol", "digoxin", "amiodarone", "statin", "nitrate"]
CONDITIONS = ["angina", "atrial fibrillation", "heart failure", "hypertension", "stroke", "infarction"]
DOSES = ["low", "high", "daily", "weekly"]


def truth_set(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        c, d, s = rng.choice(CONDITIONS), rng.choice(DRUGS), rng.choice(DOSES)
        pairs.append((f"Case {i}: what treats {c}?", f"For {c}, give {d} at a {s} dose and review the patient."))
    return pairs


def _messages(question: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}]})


def _policy(key_dir, **feedback) -> UpdatePolicy:
    settings = {"key": str(key_dir), "min_corrections": 150, "steps": 30, "lr": 3e-3, **feedback}
    # A new subject on a tiny model moves its neighbours a little more than the 2% default allows.
    return UpdatePolicy(feedback=FeedbackPolicy(**settings), gate=GateBounds(parent=0.1, probe=0.1, canary=0.1))


def _clinicians(reg, pairs, tenant="st-marys", *, corrected_every=1):
    """Each pair: a served (wrong) answer recorded, rated -1 and corrected with the truth."""
    record_responses(
        reg,
        [
            ResponseEntry(tenant, f"{tenant}-r{i}", NODE, 1, _messages(q), "I do not know.")
            for i, (q, _) in enumerate(pairs)
        ],
    )
    for i, (_, truth) in enumerate(pairs):
        correction = truth if i % corrected_every == 0 else None
        add_feedback(reg, tenant, f"{tenant}-r{i}", -1, correction, ("scripted",))


def _ppl(world, pairs) -> float:
    bench = world.coordinator.bench
    tokenizer = bench.evaluator.base.tokenizer
    text = render_examples(tokenizer, [TrainingExample(0, json.loads(_messages(q)), a) for q, a in pairs])
    ancestors, own, _ = served(world, CARD)
    with bench.evaluator.lock, torch.no_grad():
        return chain_perplexity(bench.evaluator.base.model, [*ancestors, own], tokenize_text(tokenizer, text), 32)


@pytest.fixture
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feedback")
    w = make_world(folder, built_tree(tmp_path_factory))
    write_key_files(folder / "card-key", w.keys.nodes[CARD])
    w.reopen(_policy(folder / "card-key"))
    yield w
    w.close()


def _learner(world) -> FeedbackLearner:
    return FeedbackLearner(world.coordinator, lambda path: load_signing_key(path))


def test_corrections_become_an_accepted_update_that_lowers_truth_perplexity(world):
    pairs = truth_set(300)
    train_pairs, eval_pairs = pairs[:240], pairs[240:]
    learner = _learner(world)
    _clinicians(world.registry, train_pairs[:100])
    first = learner.tick()
    assert [d.action for d in first] == ["wait"] and "100 new corrections < 150" in first[0].reason
    assert learner.tick() == []  # the same reason is not logged again
    before = _ppl(world, eval_pairs)
    _clinicians(world.registry, train_pairs[100:], tenant="st-marys-2")  # another tenant: its own count
    record_responses(
        world.registry,
        [ResponseEntry("st-marys", f"st-marys-r{i}", NODE, 1, _messages(q), "no") for i, (q, _) in enumerate(pairs)],
    )
    for i in range(100, 240):
        add_feedback(world.registry, "st-marys", f"st-marys-r{i}", -1, pairs[i][1])
    decided = learner.tick()
    made = [d for d in decided if d.action == "make"]
    assert len(made) == 1 and made[0].node == NODE, [d.reason for d in decided]
    assert made[0].reason == "made update for ut/en/medical/cardiology (st-marys) because 240 new corrections >= 150"
    update = next(u for u in list_updates(world.registry, tree=TREE) if u.update_id == made[0].update_id)
    assert update.kind == "package" and update.node_id == NODE and update.version == 2
    gate = {c["kind"]: c for c in update.figures["gate"]["checks"]}
    assert gate["feedback"]["passed"] and gate["feedback"]["change"] < 0
    after = _ppl(world, eval_pairs)
    assert after < before * 0.9, (before, after)
    # Used records stop counting; the held-out part is now the node's feedback eval set.
    stats = {s.tenant: s for s in feedback_stats(world.registry, NODE)}
    assert stats["st-marys"].corrections_waiting == 0 and stats["st-marys-2"].corrections_waiting == 140
    assert feedback_eval_file(world.tree, CARD).read_text().count("<|im_start|>assistant") == 48
    assert [d.action for d in list_decisions(world.registry, NODE)] == ["wait", "make", "wait"]


def test_records_deleted_before_the_update_are_not_trained_on(world):
    pairs = truth_set(200, seed=1)
    _clinicians(world.registry, pairs)
    assert delete_feedback(world.registry, "st-marys", response_ids=[f"st-marys-r{i}" for i in range(50)]) == 50
    examples = training_examples(world.registry, NODE, "st-marys")
    questions = {e.prompt["messages"][0]["content"] for e in examples}
    assert len(examples) == 150 and questions == {q for q, _ in pairs[50:]}
    made = [d for d in _learner(world).tick() if d.action == "make"]
    assert len(made) == 1 and made[0].detail["trained"] + made[0].detail["held_out"] == 150


def test_a_refused_update_leaves_no_version_and_no_eval_text(world, tmp_path):
    # Corrections far from anything the node knows, trained hard: screening (or the gate) refuses them.
    world.reopen(
        UpdatePolicy(
            feedback=FeedbackPolicy(key=str(world.folder / "card-key"), min_corrections=20, steps=60, lr=0.05),
            gate=GateBounds(probe=0.0001),
        )
    )
    pairs = [(f"Q{i}", "zzzz qqqq xxxx " * 8) for i in range(40)]
    _clinicians(world.registry, pairs)
    versions = list_updates(world.registry, tree=TREE)
    decisions = _learner(world).tick()
    assert [d.action for d in decisions] == ["refused"] and "refused: update rejected" in decisions[0].reason
    assert list_updates(world.registry, tree=TREE) == versions
    assert not feedback_eval_file(world.tree, CARD).exists()
    assert feedback_stats(world.registry, NODE)[0].corrections_waiting == 0  # it does not retrigger


@pytest.mark.parametrize(
    ("stats", "policy", "make", "reason"),
    [
        (FeedbackStats(NODE, "t", corrections_waiting=57, trainable_waiting=57), {}, True, "57 new corrections >= 50"),
        (FeedbackStats(NODE, "t", corrections_waiting=3, trainable_waiting=3), {}, False, "3 new corrections < 50"),
        (
            FeedbackStats(NODE, "t", 5, 25, 40, 10, corrections_waiting=9, trainable_waiting=12),
            {},
            True,
            "negative rate 83% over 30 ratings rose 63% >= 10% over the last update's 20%",
        ),
        (
            FeedbackStats(NODE, "t", 5, 25, 40, 10, corrections_waiting=2, trainable_waiting=2),
            {},
            False,
            "negative rate rose 63% but only 2 trainable record(s) < 8",
        ),
    ],
)
def test_the_policy_says_why(stats, policy, make, reason):
    decision = decide(stats, FeedbackPolicy(**policy))
    assert (decision.make, decision.reason) == (make, reason)


@pytest.mark.parametrize(
    ("feedback", "named"),
    [
        ({"min_corrections": 0}, "feedback.min_corrections"),
        ({"negative_rate_rise": 1.5}, "feedback.negative_rate_rise"),
        ({"held_out": 0.95}, "feedback.held_out"),
        ({"every": 5}, "unknown feedback field(s) every"),
        ({"nodes": {"en/medical": {"steps": "many"}}}, "feedback.steps"),
        ({"nodes": {"en/medical": {"key": "x"}}}, "feedback.nodes['en/medical']"),
        ("often", "feedback must be a mapping"),
    ],
)
def test_a_bad_feedback_policy_is_refused_naming_the_field(tmp_path, feedback, named):
    from cluster.errors import PolicyError

    (tmp_path / "update-policy.yaml").write_text(json.dumps({"feedback": feedback}))
    with pytest.raises(PolicyError) as err:
        UpdatePolicy.for_tree(tmp_path)
    assert named in str(err.value)


def test_the_cli_makes_ticks_and_logs(world, tmp_path, capsys):
    from cluster.cli import main

    pairs = truth_set(60, seed=2)
    _clinicians(world.registry, pairs)
    key = str(world.folder / "card-key")
    # `update make --from-feedback`: a package from st-marys's records (another tenant has none).
    args = ["update", "make", str(world.tree), "--from-feedback", NODE, "--key", key, "--db", world.url]
    assert main([*args, "--tenant", "other", "--out", str(tmp_path / "none")]) == 2
    assert "0 usable feedback record(s)" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main([*args, "--tenant", "st-marys", "--out", str(tmp_path / "pkg"), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert (made["trained"], made["held_out"]) == (48, 12) and (tmp_path / "pkg" / "envelope.json").is_file()
    assert made["metrics"]["eval_ppl"] < made["metrics"]["eval_ppl_before"]
    assert feedback_stats(world.registry, NODE)[0].trainable_waiting == 0  # spoken for by the package
    # `update tick`: more corrections, the tree's policy file, a decision with its reason; `update log` shows it.
    record_responses(
        world.registry,
        [ResponseEntry("st-marys", f"x{i}", NODE, 1, _messages(q), "?") for i, (q, _) in enumerate(pairs)],
    )
    for i, (_, truth) in enumerate(pairs):
        add_feedback(world.registry, "st-marys", f"x{i}", -1, truth)
    (world.tree / "update-policy.yaml").write_text(
        json.dumps(
            {
                "feedback": {"key": key, "min_corrections": 50, "steps": 30, "lr": 3e-3},
                "gate": {"parent": 0.1, "probe": 0.1, "canary": 0.1},
            }
        )
    )
    assert main(["update", "tick", "--tree", str(world.tree), "--db", world.url, "--json"]) == 0
    ticked = json.loads(capsys.readouterr().out)["decisions"]
    assert [d["action"] for d in ticked] == ["make"] and ticked[0]["update_id"]
    assert main(["update", "log", "--node", NODE, "--db", world.url, "--json"]) == 0
    log = json.loads(capsys.readouterr().out)["decisions"]
    assert log[0]["reason"] == "made update for ut/en/medical/cardiology (st-marys) because 60 new corrections >= 50"
    assert main(["update", "log", "--node", NODE, "--db", world.url]) == 0
    assert "update policy decisions" in capsys.readouterr().out
