"""nodes.build.gate: every check measured before and after, each against its own bound; a refusal
carries every figure; node eval texts are found beside the spec and checked against node.json."""

from __future__ import annotations

import pytest

from hierarchy.errors import GateRejected
from nodes.base.model import load_base
from nodes.build.gate import Comparison, Evaluator, GateBounds, canary_text, node_eval_text, read_eval_text
from nodes.errors import GateTextMissing
from nodes.store.adapters import read_adapter
from nodes.store.tree import open_tree
from tests.cluster.update_world import built_tree
from tests.nodes.treefactory import make_random_tree


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tree = open_tree(built_tree(tmp_path_factory) / "tree")
    chain = [read_adapter(n.directory, expected_sha256=n.sha256) for n in tree.chain("ut/en/medical")]
    return tree, Evaluator(load_base(tree.base_dir, digest=tree.base_digest), seq_len=32), chain


def test_same_chain_passes_and_forgetting_the_domain_is_refused_with_figures(setup):
    tree, evaluator, chain = setup
    medical = node_eval_text(tree, tree.node("ut/en/medical"))
    assert "ut/en/medical eval" in medical.label and medical.sha256 == tree.node("ut/en/medical").data["eval"]["sha256"]
    same = Comparison("parent held-out", "parent", medical, chain, list(chain))
    # Dropping en/medical's adapter forgets the domain: the builder measured that it helps (gain > 0).
    forgot = Comparison("probe ut/en/medical", "probe", medical, chain, chain[:1])
    canary = Comparison("canary", "canary", canary_text(tree), chain[:1], chain[:1])
    report = evaluator.run("candidate ut/en/medical v2", [same, forgot, canary], GateBounds(probe=0.02))
    checks = {c.name: c for c in report.checks}
    assert checks["parent held-out"].change == pytest.approx(0.0, abs=1e-9) and checks["parent held-out"].passed
    gain = tree.node("ut/en/medical").metrics["specialisation_gain"]
    assert checks["probe ut/en/medical"].change == pytest.approx(1 / (1 - gain) - 1, rel=1e-3)
    assert not report.passed and [c.name for c in report.failures] == ["probe ut/en/medical"]
    with pytest.raises(GateRejected) as info:
        report.raise_if_failed()
    bad = checks["probe ut/en/medical"]
    assert f"{bad.before:.3f} -> {bad.after:.3f}" in str(info.value) and info.value.details["report"] is report
    loose = evaluator.run("candidate", [forgot], GateBounds(probe=bad.change + 0.01))
    assert loose.passed and loose.checks[0].after == pytest.approx(bad.after)  # the bound decides, not the figure


def test_bounds_are_validated():
    for value in (-0.01, float("nan"), True, "2%"):
        with pytest.raises(ValueError, match="parent"):
            GateBounds(parent=value)


def test_texts_are_checked_against_their_recorded_digest(tmp_path, tiny_base_dir):
    path = tmp_path / "eval.txt"
    path.write_text("some clinical text")
    good = read_eval_text(path)
    assert read_eval_text(path, sha256=good.sha256).text == "some clinical text"
    with pytest.raises(GateTextMissing, match="changed since the build"):
        read_eval_text(path, sha256="1" * 64)
    with pytest.raises(GateTextMissing, match="cannot read"):
        read_eval_text(tmp_path / "missing.txt")
    random_tree = make_random_tree(tmp_path / "t", tiny_base_dir)  # built without data: nothing to gate on
    with pytest.raises(GateTextMissing, match="records no eval text"):
        node_eval_text(random_tree, random_tree.node("rt/en"))


def test_max_tokens_measures_the_prefix_of_each_text(setup):
    tree, evaluator, chain = setup
    medical = node_eval_text(tree, tree.node("ut/en/medical"))
    full = evaluator.tokens(medical)
    assert full.numel() > 100
    short = Evaluator(evaluator.base, seq_len=32, max_tokens=100)
    assert short.tokens(medical).tolist() == full[:100].tolist()
    # The same figure as measuring a text that holds only those tokens' worth: fewer windows, other value.
    assert short.perplexity(chain, medical) != pytest.approx(evaluator.perplexity(chain, medical), rel=1e-6)
    with pytest.raises(ValueError, match="max_tokens"):
        Evaluator(evaluator.base, max_tokens=1)


def test_a_stale_check_is_reported_against_the_repin_bound_but_never_rejects(setup):
    """The updating child's new adapter over the candidate counts its update twice and is never
    served so: its figure is in the report (against the re-pin bound), not among the failures."""
    tree, evaluator, chain = setup
    medical = node_eval_text(tree, tree.node("ut/en/medical"))
    stale = Comparison("probe ut/en/medical", "stale", medical, chain, chain[:1])  # far worse
    probe = Comparison("probe ut/en/medical", "probe", medical, chain, chain[:1])
    bounds = GateBounds(repin=0.03)
    report = evaluator.run("candidate", [stale], bounds)
    check = report.checks[0]
    assert check.change > 0.03 and check.bound == 0.03 and check.passed and report.passed
    assert "not gated" in check.describe() and check.to_dict()["kind"] == "stale"
    assert not evaluator.run("candidate", [probe], bounds).passed  # the same figure as a probe rejects
