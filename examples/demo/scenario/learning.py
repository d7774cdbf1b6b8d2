"""(5) Learning from use: clinicians rate and correct cardiology answers; the policy makes an update.

The hospital turns retention on for the cardiology node (off by default), its clinicians ask
questions from a truth set, rate each answer -1 and send the truth as the correction. The
update-timing policy (the tree's update-policy.yaml, ``feedback:``) decides: through
`treelm update tick` next to `treelm serve`, or by itself in the Ray cluster's update desk. The
update it makes is signed and goes through the protocol like the hospital's own: screened,
gated (it must also lower the perplexity of the held-out feedback), aggregated into
en/medical, approved. The node's answers to the corrected questions change.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from examples.demo.scenario.setup import HOSPITAL, DemoError, DemoState, cli
from examples.demo.scenario.steps import Table, served_version
from treelm import Client

__all__ = ["CARDIOLOGY_KEY", "learning_story", "truth_set"]

CARDIOLOGY_KEY = "cardiology"  # keys/cardiology: the node key the policy signs feedback updates with
_PLANS = {
    "atrial fibrillation": "Start apixaban 5 mg twice daily and review the CHA2DS2-VASc score in {n} months.",
    "heart failure with reduced ejection fraction": "Start sacubitril-valsartan and a beta blocker; repeat the echocardiogram in {n} months.",
    "stable angina": "Start aspirin 75 mg daily and a statin; arrange a stress test within {n} weeks.",
    "aortic stenosis": "Refer for valve assessment and repeat the echocardiogram in {n} months.",
    "hypertension": "Start amlodipine 5 mg daily and recheck the blood pressure in {n} weeks.",
    "ventricular tachycardia": "Admit to telemetry, correct potassium and magnesium, and consult electrophysiology within {n} hours.",
}


def truth_set(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """``n`` cardiology questions with the answer the clinic holds true (a plan per condition)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        condition = rng.choice(sorted(_PLANS))
        age, sex = rng.randint(40, 90), rng.choice(["man", "woman"])
        question = f"Case {i + 1}: a {age}-year-old {sex} with {condition}. What is the plan?"
        out.append((question, _PLANS[condition].format(n=rng.randint(2, 12))))
    return out


def _answer(client: Client, node: str, question: str, max_new_tokens: int):
    return client.generate(
        node, messages=[{"role": "user", "content": question}], max_new_tokens=max_new_tokens, temperature=0
    )


def _answer_all(client: Client, node: str, pairs: list[tuple[str, str]], max_new_tokens: int) -> list:
    """Every question of ``pairs``, eight clinicians at a time (the engine batches them)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda qa: _answer(client, node, qa[0], max_new_tokens), pairs))


def _wait_for_decision(state: DemoState, node: str, timeout_s: float) -> dict:
    """The Ray desk decides on its own timer: poll `treelm update log` until it has made (or refused) one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = json.loads(cli("update", "log", "--node", node, "--db", state.url, "--json"))["decisions"]
        done = [d for d in log if d["action"] in ("make", "refused", "failed")]
        if done:
            return done[0]
        time.sleep(2.0)
    raise DemoError(f"the update desk made no feedback decision for {node} within {timeout_s:.0f} s")


def learning_story(
    address: str,
    state: DemoState,
    *,
    answers: int,
    on_cluster: bool,
    max_new_tokens: int,
    lap: Callable[[str], None] = lambda step: None,
) -> Table:
    """Rate and correct ``answers`` cardiology answers; the policy makes an update; it climbs."""
    node = f"{state.tree_name}/en/medical/cardiology"
    med = f"{state.tree_name}/en/medical"
    table = Table("learning", "5. Clinicians correct cardiology; the tree learns from use", ["step", "who", "result"])
    pairs = truth_set(answers)
    shown = pairs[:3]
    with Client(address, token=state.tokens[HOSPITAL], timeout=600) as hospital:
        hospital.set_retention(node, True)
        table.rows.append(["retention on for the node (off by default)", HOSPITAL, node])
        results = _answer_all(hospital, node, pairs, max_new_tokens)
        before = {q: r.text for (q, _), r in zip(pairs, results, strict=True)}
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda item: hospital.feedback(item[1].request_id, -1, correction=item[0][1], tags=["demo"]),
                    zip(pairs, results, strict=True),
                )
            )
        table.rows.append(
            [
                "answers rated -1 and corrected with the clinic's truth",
                "clinicians",
                f"{len(pairs)} feedback records on {node} v{results[0].node_version}",
            ]
        )
        lap("5a. clinicians: answers, ratings, corrections")
        if on_cluster:
            decision = _wait_for_decision(state, node, timeout_s=900)
            who = "Ray update desk (its timer)"
        else:
            ticked = json.loads(cli("update", "tick", "--tree", state.tree, "--db", state.url, "--json"))
            decision = next((d for d in ticked["decisions"] if d["node"] == node), {"action": "none", "reason": "-"})
            who = "treelm update tick"
        table.rows.append(["the update policy decides", who, f"{decision['action']}: {decision['reason']}"])
        lap("5b. the policy: fine-tune on the feedback, sign, submit, gate")
        if decision["action"] != "make":
            return table
        status = hospital.update_status(decision["update_id"])
        checks = status.figures
        fb = [k for k in checks if "held-out feedback" in k and k.endswith(".change")]
        change = f"held-out feedback perplexity {checks[fb[0]]:+.1%}" if fb else "no held-out check"
        table.rows.append(["the update: screened, gated, served", "parent en/medical", f"{status.state}; {change}"])
        served = served_version(hospital, node, status.manifest()["version"])
        table.rows.append(["the node is served at its new version", "engine", f"{node} v{served}"])
        if status.candidate_id:
            for key in ("medical-eval", "operator"):
                done = hospital.approve(status.candidate_id, state.keys / key)
            table.rows.append(
                ["it climbs: en/medical's candidate approved", "evaluator + operator", f"{med} {done.state}"]
            )
        lap("5c. approvals")
        again = _answer_all(hospital, node, pairs, max_new_tokens)
        after = {q: r.text for (q, _), r in zip(pairs, again, strict=True)}
        changed = sum(after[q] != before[q] for q, _ in pairs)
        table.rows.append(["answers to the corrected questions changed", "clinicians", f"{changed}/{len(pairs)}"])
        for question, truth in shown:
            table.rows.append(
                [question, "before -> after", f"{before[question]!r} -> {after[question]!r} (truth: {truth!r})"]
            )
        lap("5d. the corrected questions again")
    return table
