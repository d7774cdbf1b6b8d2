"""Sibling-safe merges: DARE (seeded, unbiased), projection away from protected inputs, contrast."""

from __future__ import annotations

import pytest
import torch

from hierarchy.chain import LoraFactors
from hierarchy.updates import AggregationError
from hierarchy.updates.aggregate import MergePolicy, WeightedDelta, candidate_parent, concat_merge
from hierarchy.updates.merges import contrast_map, dare_merge, input_basis, project_away, projector
from tests.hierarchy.test_update_aggregate import child

LAYERS = {"q": (12, 10), "v": (7, 10)}


def dense(factors: dict[str, LoraFactors]) -> dict[str, torch.Tensor]:
    return {m: f.delta().double() for m, f in factors.items()}


def test_dare_is_deterministic_per_seed_and_keeps_the_rest_rescaled():
    kids = [(child(1, 3), 0.5), (child(2, 2), 0.5)]
    one, again, other = dare_merge(kids, 0.5, 7), dare_merge(kids, 0.5, 7), dare_merge(kids, 0.5, 8)
    for m in LAYERS:
        torch.testing.assert_close(one[m], again[m], rtol=0, atol=0)
        assert not torch.equal(one[m], other[m])
    # drop 0 is the weighted mean exactly (what concat computes)
    plain = dare_merge(kids, 0.0, 0)
    want = concat_merge([WeightedDelta(child(1, 3)), WeightedDelta(child(2, 2))])
    for m in LAYERS:
        torch.testing.assert_close(plain[m], want[m].delta().double(), rtol=0, atol=1e-12)
    # a kept entry is the child's entry / (1 - drop); a dropped one is 0
    solo = dare_merge([(child(3, 2), 1.0)], 0.75, 1)
    d = child(3, 2)["q"].delta().double()
    kept = solo["q"] != 0
    assert 0.1 < kept.double().mean() < 0.45  # about a quarter kept
    torch.testing.assert_close(solo["q"][kept], d[kept] / 0.25)


def test_dare_is_unbiased_over_seeds():
    kid = [(child(4, 2), 1.0)]
    mean = sum(dare_merge(kid, 0.5, s)["v"] for s in range(400)) / 400
    d = child(4, 2)["v"].delta().double()
    assert float((mean - d).norm() / d.norm()) < 0.1


def test_dare_ties_drops_entries_against_the_elected_sign():
    a = {
        "q": LoraFactors(
            A=torch.eye(2, dtype=torch.float64), B=torch.tensor([[1.0, 2.0], [3.0, -1.0]]).double(), scale=1.0
        )
    }
    b = {
        "q": LoraFactors(
            A=torch.eye(2, dtype=torch.float64), B=torch.tensor([[-3.0, 2.0], [1.0, 1.0]]).double(), scale=1.0
        )
    }
    out = dare_merge([(a, 0.5), (b, 0.5)], 0.0, 0, elect_sign=True)["q"]
    # (0,0): 1 vs -3 -> elected '-', only b counts -> -3; (1,1): -1 vs 1 -> sum 0 -> '+', only b -> 1
    torch.testing.assert_close(out, torch.tensor([[-3.0, 2.0], [2.0, 1.0]], dtype=torch.float64))


def test_projection_leaves_protected_inputs_unchanged():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g).double()
    cov = inputs.T @ inputs / 200  # rank 3 inside 10 dims
    delta = torch.randn(12, 10, generator=g, dtype=torch.float64)
    basis = input_basis(cov, 0.999999)
    assert basis.shape == (10, 3)
    moved = project_away(delta, basis)
    assert float((moved @ inputs.T).abs().max()) < 1e-8
    torch.testing.assert_close(delta @ projector(cov, 0.999999), moved)
    other = torch.randn(10, generator=g, dtype=torch.float64)
    other -= basis @ (basis.T @ other)  # orthogonal to what is protected: the update acts in full
    torch.testing.assert_close(moved @ other, delta @ other)


def test_contrast_keeps_the_update_where_the_protected_inputs_have_no_energy():
    e = torch.eye(4, dtype=torch.float64)
    keep = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    protect = torch.diag(torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    m = contrast_map(keep, protect, 3.0)
    assert abs(float(m[0, 0]) - 1.0) < 1e-5  # only the update reads it: full step
    assert abs(float(m[1, 1]) - 0.25) < 1e-5  # shared: 1 / (1 + strength)
    assert abs(float(m[2, 2])) < 1e-5  # only the protected read it: nothing
    torch.testing.assert_close(contrast_map(keep, protect, 0.0) @ keep, keep @ e, atol=1e-5, rtol=0)


def test_input_mapped_merges_need_maps_and_apply_them():
    parent = child(9, 4)
    kids = [WeightedDelta(child(1, 3))]
    with pytest.raises(AggregationError, match="input maps"):
        candidate_parent(parent, kids, MergePolicy(method="project"))
    zero = {m: torch.zeros(10, 10, dtype=torch.float64) for m in LAYERS}
    cand = candidate_parent(parent, kids, MergePolicy(method="project"), zero)
    for m, f in cand.factors.items():  # a map that removes every input: the parent is unchanged
        torch.testing.assert_close(f.delta().double(), parent[m].delta().double(), atol=1e-9, rtol=0)
    dare = candidate_parent(parent, kids, MergePolicy(method="dare", drop=0.0, eta=0.5))
    concat = candidate_parent(parent, kids, MergePolicy(method="concat", eta=0.5))
    for m in LAYERS:
        torch.testing.assert_close(dare.factors[m].delta(), concat.factors[m].delta(), atol=1e-9, rtol=0)
    assert dare.method == "dare"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "magic"}, "method"),
        ({"drop": 1.0}, "drop"),
        ({"drop": -0.1}, "drop"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"energy": 1.0}, "energy"),
        ({"strength": -1.0}, "strength"),
        ({"strength": float("nan")}, "strength"),
    ],
)
def test_bad_merge_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MergePolicy(**kwargs)


def test_bad_bases_and_covariances_are_refused():
    with pytest.raises(AggregationError, match="energy"):
        input_basis(torch.eye(3), 1.0)
    with pytest.raises(AggregationError, match="square"):
        input_basis(torch.ones(2, 3), 0.5)
    with pytest.raises(AggregationError, match="does not match"):
        project_away(torch.ones(4, 5), torch.ones(3, 1))
    with pytest.raises(AggregationError, match="drop"):
        dare_merge([(child(1, 2), 1.0)], 1.0, 0)
