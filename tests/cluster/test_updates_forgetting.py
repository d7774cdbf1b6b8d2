"""Forgetting: the merge method is chosen in the update policy (refused with the field named when
wrong), and measure_update says what one child's update does to its parent, siblings, ancestors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from prometheus_client import generate_latest

from cluster.cli import main
from cluster.errors import PolicyError
from cluster.service.metrics import ServerMetrics
from cluster.updates.forgetting import measure_update
from cluster.updates.policy import DistillPolicy, UpdatePolicy
from hierarchy.updates.aggregate import MergePolicy
from nodes.build.distill import Target, refit_adapter
from nodes.build.finetune import chain_perplexity
from nodes.build.gate import read_eval_text
from nodes.store.adapters import AdapterWeights
from registry.forgetting import history, latest
from registry.updates import get_update
from tests.cluster.update_world import TREE, built_tree, honest_adapter, make_world, package_of

ONC, CARD, RAD = "en/medical/oncology", "en/medical/cardiology", "en/medical/radiology"


def test_merge_is_a_name_or_a_mapping_in_the_policy(tmp_path):
    assert UpdatePolicy.from_dict({"merge": "dare_ties"}).merge == MergePolicy(method="dare_ties", eta=0.5)
    policy = UpdatePolicy.from_dict({"eta": 0.25, "merge": {"method": "project", "energy": 0.8}})
    assert policy.merge.method == "project" and policy.merge.energy == 0.8 and policy.merge.eta == 0.25
    file = tmp_path / "update-policy.yaml"
    file.write_text("merge: {method: dare, drop: 0.3, seed: 4}\n")
    assert UpdatePolicy.from_file(file).merge.drop == 0.3
    assert UpdatePolicy().with_(merge="ties", eta=1.0).merge == MergePolicy(method="ties", eta=1.0)
    # The default (chosen from the demo tree's measurements) also fills a mapping that names no method.
    assert UpdatePolicy().merge == MergePolicy(method="contrast", eta=0.5)
    assert UpdatePolicy.from_dict({"merge": {"strength": 8}}).merge == MergePolicy(
        method="contrast", eta=0.5, strength=8
    )


@pytest.mark.parametrize(
    "merge, named",
    [
        ("mean", "merge.method"),
        ({"method": "dare", "drop": 1.5}, "merge.drop"),
        ({"method": "dare", "seed": -3}, "merge.seed"),
        ({"method": "project", "energy": 0}, "merge.energy"),
        ({"method": "contrast", "strength": -2}, "merge.strength"),
        ({"method": "dare", "dropp": 0.1}, "merge field.*dropp"),
        ({"method": "dare", "eta": 0.1}, "eta is a top-level field"),
        (3, "merge must be"),
    ],
)
def test_a_bad_merge_is_refused_when_loaded_with_the_field_named(tmp_path, merge, named):
    with pytest.raises(PolicyError, match=named):
        UpdatePolicy.from_dict({"merge": merge})
    file = tmp_path / "update-policy.yaml"
    file.write_text(f"merge: {merge!r}\n".replace("'", '"'))
    with pytest.raises(PolicyError, match=named):
        UpdatePolicy.from_file(file)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("forgetting"), built_tree(tmp_path_factory))
    yield w
    w.close()


def test_measure_update_reports_gain_and_forgetting_per_method_and_eta(world):
    new = honest_adapter(world, ONC)
    text = read_eval_text(world.local(ONC), "oncology update text")
    view, bench = world.coordinator._view(), world.coordinator.bench

    def measure(eta: float, merge):
        return measure_update(bench, UpdatePolicy(eta=eta, merge=merge), view, ONC, new, text)

    small, full = measure(0.25, "concat"), measure(1.0, "concat")
    assert set(full.siblings) == {CARD, RAD} and set(full.ancestors) == {"en"}
    assert 0 < small.parent_gain < full.parent_gain  # a larger step learns more of the update ...
    assert full.max_sibling_regression > small.max_sibling_regression  # ... and forgets more
    assert full.max_sibling_regression == max(full.siblings.values()) and full.gate_passed
    # Projecting the increment away from the inputs the parent and siblings feed each layer
    # leaves their perplexities almost where they were.
    projected = measure(1.0, {"method": "project", "energy": 0.99})
    assert projected.max_sibling_regression < full.max_sibling_regression / 4
    assert abs(projected.parent_own_change) < abs(full.parent_own_change) or abs(projected.parent_own_change) < 1e-3
    # DARE is seeded: the same setting measures the same; the figures are plain numbers for JSON.
    assert measure(0.5, "dare").to_dict() == measure(0.5, "dare").to_dict()
    assert full.to_dict()["method"] == "concat" and full.to_dict()["eta"] == 1.0


def test_distillation_towards_the_current_chain_changes_nothing_and_pulls_a_moved_parent_back(world):
    bench = world.coordinator.bench
    view = world.coordinator._view()
    en, med, card = (bench.adapter(view.chain(p)[-1]) for p in ("en", "en/medical", CARD))
    policy = DistillPolicy(steps=6, lr=3e-3, batch_size=4)
    tokens = bench.train_tokens(CARD)
    # The teacher is the student itself: KL about 0 (rounding only); the model stays where it was.
    same = bench.distill([en, med], card, [Target(tokens, [en, med, card])], policy)
    # Over a moved parent (med scaled up), the child re-fit towards its old effective model ends
    # closer to it than the child left as it was.
    moved = AdapterWeights(
        med.r, med.alpha, med.target_modules, {m: replace(f, B=f.B * 1.6) for m, f in med.factors.items()}
    )
    rebased = bench.distill([en, moved], card, [Target(tokens, [en, med, card]), Target(tokens, None, 0.5)], policy)
    probe = bench.evaluator.tokens(bench.probe(CARD))
    model = bench.evaluator.base.model
    old = chain_perplexity(model, [en, med, card], probe, 32)
    stale = chain_perplexity(model, [en, moved, card], probe, 32)
    fresh = chain_perplexity(model, [en, moved, rebased], probe, 32)
    assert abs(fresh / old - 1) < abs(stale / old - 1)
    assert abs(chain_perplexity(model, [en, med, same], probe, 32) / old - 1) < 0.005
    assert bench.train_text(CARD).label != bench.probe(CARD).label  # trained on the training text


def test_the_refit_start_re_expresses_a_child_over_a_moved_parent(world):
    """refit_adapter: chains add in weight space, so the child's adapter re-expressed over a moved
    parent gives back its old effective weights up to the rank cut it reports, and its perplexity
    ends far closer to the old model's than the child left as it was (what a rebase starts from)."""
    bench = world.coordinator.bench
    view = world.coordinator._view()
    en, med, card = (bench.adapter(view.chain(p)[-1]) for p in ("en", "en/medical", CARD))
    moved = AdapterWeights(
        med.r, med.alpha, med.target_modules, {m: replace(f, B=f.B * 1.6) for m, f in med.factors.items()}
    )
    fitted, error = refit_adapter(card, [en, med], [en, moved])
    assert fitted.r == card.r and set(fitted.factors) == set(card.factors) and 0 < error < 1
    for module, f in fitted.factors.items():
        target = card.factors[module].delta() + med.factors[module].delta() - moved.factors[module].delta()
        residual = (f.delta() - target).norm() / target.norm()
        assert residual <= error + 1e-5  # the reported error bounds every layer's cut
    probe = bench.evaluator.tokens(bench.probe(CARD))
    model = bench.evaluator.base.model
    old = chain_perplexity(model, [en, med, card], probe, 32)
    stale = chain_perplexity(model, [en, moved, card], probe, 32)
    refit = chain_perplexity(model, [en, moved, fitted], probe, 32)
    assert abs(refit / old - 1) < abs(stale / old - 1) / 3
    # Over an unchanged parent it is the child itself (to rounding).
    same, error = refit_adapter(card, [en, med], [en, med])
    assert error < 1e-6 and abs(chain_perplexity(model, [en, med, same], probe, 32) / old - 1) < 1e-4


@pytest.mark.parametrize(
    "body, named",
    [
        ({"consolidate": {"steps": -1}}, "consolidate.steps"),
        ({"rebase": {"lr": 0}}, "rebase.lr"),
        ({"rebase": {"lm_weight": "x"}}, "rebase.lm_weight"),
        ({"rebase": {"stepz": 3}}, "unknown rebase field.*stepz"),
        ({"rebase": {"start": "scratch"}}, "rebase.start must be one of refit, own"),
        ({"consolidate": 5}, "consolidate must be a mapping"),
        ({"gate": {"rebase": -0.01}}, "rebase"),
    ],
)
def test_bad_distillation_settings_are_refused_with_the_field_named(body, named):
    with pytest.raises(PolicyError, match=named):
        UpdatePolicy.from_dict(body)


def test_distillation_settings_load():
    policy = UpdatePolicy.from_dict({"consolidate": {"steps": 12}, "rebase": {"steps": 0}, "gate": {"rebase": 0.02}})
    assert policy.consolidate == DistillPolicy(steps=12) and policy.rebase.steps == 0 and policy.gate.rebase == 0.02
    assert UpdatePolicy().rebase.steps > 0 and UpdatePolicy().consolidate.steps == 0
    assert (
        UpdatePolicy().rebase.start == "refit"
        and UpdatePolicy.from_dict({"rebase": {"start": "own"}}).rebase.start == "own"
    )


def test_every_protocol_version_records_its_forgetting_history(tmp_path_factory, capsys):
    w = make_world(tmp_path_factory.mktemp("history"), built_tree(tmp_path_factory))
    try:
        status = w.coordinator.submit(package_of(w, ONC, honest_adapter(w, ONC))[0])
        assert status.candidate_id is not None  # one increment is enough by default: en/medical v2 waits
        onc = history(w.registry, f"{TREE}/{ONC}")
        assert [(p.version, p.origin) for p in onc if p.role == "own"] == [(1, "genesis"), (2, "package")]
        roles = {(p.role, p.text_node) for p in onc if p.version == 2}
        assert roles == {("own", f"{TREE}/{ONC}"), ("parent", f"{TREE}/en/medical")} | {
            ("sibling", f"{TREE}/{s}") for s in (CARD, RAD)
        }
        # The update taught oncology: its own text got better from v1 to v2.
        own = {p.version: p.perplexity for p in onc if p.role == "own"}
        assert own[2] < own[1]
        med = history(w.registry, f"{TREE}/en/medical")
        assert [(p.version, p.origin) for p in med if p.role == "own"] == [(1, "genesis"), (2, "candidate")]
        assert {p.text_node for p in med if p.role == "sibling"} == {f"{TREE}/en/legal"}
        # The candidate's figures are the gate's: its own text is the parent held-out check's "after".
        checks = get_update(w.registry, status.candidate_id).figures["gate"]["checks"]
        held_out = next(c["after"] for c in checks if c["kind"] == "parent")
        assert next(p.perplexity for p in med if p.version == 2 and p.role == "own") == pytest.approx(held_out)

        code = main(["registry", "history", f"{TREE}/en/medical", "--db", w.url, "--json"])
        out = capsys.readouterr().out
        assert code == 0 and [v["origin"] for v in json.loads(out)["versions"]] == [
            "genesis",
            "candidate",
        ]
        code = main(["registry", "history", f"{TREE}/{ONC}", "--db", w.url])
        out = capsys.readouterr().out
        assert code == 0 and "made by" in out and "package" in out and "sibling:" in out
        code = main(["registry", "history", f"{TREE}/en/nowhere", "--db", w.url])
        assert code == 2 and "nowhere" in capsys.readouterr().err

        # /metrics: the newest version's points, public nodes and texts only (oncology is private).
        metrics = ServerMetrics()
        metrics.watch_forgetting(lambda: latest(w.registry, TREE), lambda node: not node.endswith("oncology"))
        text = generate_latest(metrics.registry).decode()
        assert (
            f'treelm_version_perplexity{{node="{TREE}/en/medical",role="own",text="{TREE}/en/medical",version="2"}}'
            in text
        )
        assert "oncology" not in text and f'node="{TREE}/{CARD}"' not in text  # cardiology has no history yet
    finally:
        w.close()
