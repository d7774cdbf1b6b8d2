"""Aggregation into the parent: exact concatenation, SVD rank reduction, TIES on sign conflicts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierarchy.chain import LoraFactors
from hierarchy.updates import AggregationError
from hierarchy.updates.aggregate import (
    MergePolicy,
    WeightedDelta,
    candidate_parent,
    concat_merge,
    reduce_rank,
    sign_conflict,
    ties_merge,
)

LAYERS = {"q": (12, 10), "v": (7, 10)}


def child(seed: int, rank: int, dtype=torch.float64, layers=LAYERS) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: LoraFactors(
            A=torch.randn(rank, inp, generator=g, dtype=dtype),
            B=torch.randn(out, rank, generator=g, dtype=dtype),
            scale=float(torch.rand(1, generator=g).item() * 2 + 0.25),
        )
        for m, (out, inp) in layers.items()
    }


def exact(delta: torch.Tensor) -> dict[str, LoraFactors]:
    """A full-rank factorisation (A = I) whose delta is exactly ``delta``: for hand-made examples."""
    _out, inp = delta.shape
    return {"w": LoraFactors(A=torch.eye(inp, dtype=torch.float64), B=delta.double(), scale=1.0)}


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ranks=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    weights=st.lists(st.floats(0.05, 10.0), min_size=5, max_size=5),
)
def test_concat_merge_is_exactly_the_weighted_sum_with_mixed_ranks(seed, ranks, weights):
    children = [WeightedDelta(child(seed + i, r), w) for i, (r, w) in enumerate(zip(ranks, weights, strict=False))]
    merged = concat_merge(children)
    total = sum(c.weight for c in children)
    for m in LAYERS:
        assert merged[m].rank == sum(ranks) and merged[m].scale == 1.0
        want = sum((c.weight / total) * c.delta[m].scale * (c.delta[m].B @ c.delta[m].A) for c in children)
        torch.testing.assert_close(merged[m].delta(), want, rtol=0, atol=1e-6)
    # Without normalisation it is the plain weighted sum.
    raw = concat_merge(children, normalize=False)
    want = sum(c.weight * c.delta["q"].delta() for c in children)
    torch.testing.assert_close(raw["q"].delta(), want, rtol=0, atol=1e-6)


def test_concat_merge_in_float32_and_zero_weights_drop_out():
    children = [
        WeightedDelta(child(1, 3, torch.float32), 2.0),
        WeightedDelta(child(2, 5, torch.float32), 1.0),
        WeightedDelta(child(3, 4, torch.float32), 0.0, name="flipped"),
    ]
    merged = concat_merge(children)
    assert merged["q"].rank == 8  # the zero-weight child contributes no rank
    want = (2 * children[0].delta["q"].delta() + children[1].delta["q"].delta()) / 3
    torch.testing.assert_close(merged["q"].delta(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AggregationError, match="positive weight"):
        concat_merge([WeightedDelta(child(1, 2), 0.0)])
    with pytest.raises(AggregationError, match="different layers"):
        concat_merge([WeightedDelta(child(1, 2)), WeightedDelta({"q": child(2, 2)["q"]})])
    with pytest.raises(AggregationError):
        WeightedDelta(child(1, 2), -1.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), total_rank=st.integers(2, 12), keep=st.integers(1, 12))
def test_svd_reduction_error_is_exactly_the_tail_singular_values(seed, total_rank, keep):
    f = child(seed, total_rank)["q"]
    d = f.delta()
    reduced = reduce_rank(f, keep)
    s = torch.linalg.svdvals(d)
    n = min(total_rank, *d.shape)
    torch.testing.assert_close(reduced.singular_values[:n], s[:n], rtol=1e-9, atol=1e-9)
    tail = s[keep:n]
    torch.testing.assert_close(reduced.tail[: tail.numel()], tail, rtol=1e-9, atol=1e-9)
    residual = d - reduced.factors.delta()
    assert math.isclose(float(torch.linalg.matrix_norm(residual)), reduced.error, rel_tol=1e-7, abs_tol=1e-9)
    assert math.isclose(reduced.error, float(torch.sqrt((tail**2).sum())), rel_tol=1e-7, abs_tol=1e-9)
    assert math.isclose(
        float(torch.linalg.matrix_norm(residual, ord=2)), reduced.spectral_error, rel_tol=1e-7, abs_tol=1e-9
    )
    assert reduced.factors.rank == keep
    # The dense path agrees with the factored one.
    dense = reduce_rank(d, keep)
    assert math.isclose(dense.error, reduced.error, rel_tol=1e-7, abs_tol=1e-9)


def test_reduction_keeps_the_requested_scale_and_is_exact_at_full_rank():
    f = child(7, 3)["q"]
    reduced = reduce_rank(f, 5, scale=0.5)  # rank 5 > true rank 3: zero-padded, nothing lost
    assert reduced.factors.scale == 0.5 and reduced.factors.rank == 5 and reduced.error < 1e-12
    torch.testing.assert_close(reduced.factors.delta(), f.delta(), rtol=0, atol=1e-10)
    with pytest.raises(AggregationError):
        reduce_rank(f, 0)


def test_ties_merge_resolves_sign_conflicts_as_defined():
    t1 = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    t2 = torch.tensor([[-3.0, -2.0, 0.4, 1.0]])
    t3 = torch.tensor([[1.0, 4.0, -0.1, 2.0]])
    children = [WeightedDelta(exact(t)) for t in (t1, t2, t3)]
    # No trimming: elected signs from the sums [0, 1, 0.8, 6] are all + (ties go to +); each entry is the
    # mean of the children that agree with it: (2+1)/2, 4, (0.5+0.4)/2, (3+1+2)/3.
    full = ties_merge(children, density=1.0)["w"]
    torch.testing.assert_close(full, torch.tensor([[1.5, 4.0, 0.45, 2.0]], dtype=torch.float64))
    # Keep the top half of each: t1 -> [2,0,0,3], t2 -> [-3,-2,0,0], t3 -> [0,4,0,2]; sums [-1,2,0,5]
    # elect [-,+,+,+]; agreeing means: -3, 4, nothing (0), (3+2)/2.
    half = ties_merge(children, density=0.5)["w"]
    torch.testing.assert_close(half, torch.tensor([[-3.0, 4.0, 0.0, 2.5]], dtype=torch.float64))
    # Weights move the election: with t2 at weight 3 entry 1 elects '-' (sum -6+4 < 0) -> t2's -2 alone.
    heavy = ties_merge(
        [WeightedDelta(exact(t1)), WeightedDelta(exact(t2), 3.0), WeightedDelta(exact(t3))], density=0.5
    )["w"]
    torch.testing.assert_close(heavy, torch.tensor([[-3.0, -2.0, 0.0, 2.5]], dtype=torch.float64))
    # Entries where two trimmed deltas overlap: 0, 1, 3; children disagree in sign on 0 and 1.
    assert math.isclose(sign_conflict(children, density=0.5), 2 / 3)
    # A plain average would have let the conflicts cancel: entry 0 of the mean is 0, TIES keeps -3.
    assert float((t1 + t2 + t3)[0, 0]) == 0.0


def _best_rank(target: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], float(torch.sqrt((s[r:] ** 2).sum()))


def test_candidate_parent_is_the_best_rank_r_approximation_of_parent_plus_eta_merge():
    parent = child(100, 4)
    kids = [WeightedDelta(child(1, 2), 1.0), WeightedDelta(child(2, 6), 3.0)]
    policy = MergePolicy(method="concat", eta=0.5)
    cand = candidate_parent(parent, kids, policy)
    assert cand.method == "concat"
    lost = total = 0.0
    for m in LAYERS:
        f = cand.factors[m]
        assert f.rank == parent[m].rank and f.scale == parent[m].scale
        target = parent[m].delta() + 0.5 * sum(c.weight / 4.0 * c.delta[m].delta() for c in kids)
        best, err = _best_rank(target, 4)
        torch.testing.assert_close(f.delta(), best, rtol=0, atol=1e-8)
        assert math.isclose(cand.truncation_error[m], err, rel_tol=1e-7)
        lost += err**2
        total += float((target**2).sum())
    assert math.isclose(cand.relative_error, math.sqrt(lost / total), rel_tol=1e-7)


def test_auto_uses_ties_only_when_children_disagree_in_sign():
    g = torch.Generator().manual_seed(5)
    d = torch.randn(12, 10, generator=g, dtype=torch.float64)
    parent = {
        "w": LoraFactors(
            A=torch.randn(3, 10, generator=g, dtype=torch.float64),
            B=torch.randn(12, 3, generator=g, dtype=torch.float64),
            scale=2.0,
        )
    }
    aligned = [WeightedDelta(exact(d)), WeightedDelta(exact(2 * d))]
    assert sign_conflict(aligned) == 0.0
    assert candidate_parent(parent, aligned).method == "concat"
    noise = torch.randn(12, 10, generator=g, dtype=torch.float64)
    opposed = [WeightedDelta(exact(d + 0.3 * noise)), WeightedDelta(exact(-d + 0.3 * noise))]
    cand = candidate_parent(parent, opposed, MergePolicy(density=0.5))
    assert cand.method == "ties" and cand.conflict == sign_conflict(opposed, 0.5) > 0.3
    target = parent["w"].delta() + ties_merge(opposed, density=0.5)["w"]
    best, err = _best_rank(target, 3)
    torch.testing.assert_close(cand.factors["w"].delta(), best, rtol=0, atol=1e-8)
    assert math.isclose(cand.truncation_error["w"], err, rel_tol=1e-7)


def test_aggregation_changes_none_of_its_inputs_and_checks_layers():
    parent = child(100, 4)
    kids = [WeightedDelta(child(1, 2)), WeightedDelta(child(2, 3))]
    snapshot = [{m: (f.A.clone(), f.B.clone()) for m, f in d.items()} for d in [parent] + [k.delta for k in kids]]
    candidate_parent(parent, kids, MergePolicy(method="ties"))
    candidate_parent(parent, kids, MergePolicy(method="concat"))
    for d, snap in zip([parent] + [k.delta for k in kids], snapshot, strict=False):
        for m, (a, b) in snap.items():
            assert torch.equal(d[m].A, a) and torch.equal(d[m].B, b)
    with pytest.raises(AggregationError, match="parent's layers"):
        candidate_parent({"q": parent["q"]}, kids)
    wrong = [WeightedDelta(child(3, 2, layers={"q": (12, 9), "v": (7, 10)}))]
    with pytest.raises(AggregationError, match="parent's layer"):
        candidate_parent(parent, wrong, MergePolicy(method="concat"))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"method": "mean"}, "method"),
        ({"eta": 0.0}, "eta"),
        ({"density": 0.0}, "density"),
        ({"conflict_threshold": 2.0}, "conflict_threshold"),
    ],
)
def test_bad_merge_policies_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MergePolicy(**kwargs)
