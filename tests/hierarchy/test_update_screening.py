"""Screening deltas before a parent absorbs them: norm floor and ceiling, direction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierarchy.chain import LoraFactors
from hierarchy.updates import ScreeningRejected
from hierarchy.updates.screening import (
    ScreenPolicy,
    Verdict,
    delta_cosine,
    delta_inner,
    delta_norm,
    scale_delta,
    screen_update,
)

LAYERS = {"q": (12, 10), "v": (6, 10)}


def random_delta(seed: int, ranks=(2, 3), dtype=torch.float64) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: LoraFactors(
            A=torch.randn(r, inp, generator=g, dtype=dtype),
            B=torch.randn(out, r, generator=g, dtype=dtype),
            scale=float(torch.rand(1, generator=g).item() + 0.5),
        )
        for (m, (out, inp)), r in zip(LAYERS.items(), ranks, strict=False)
    }


def dense(delta) -> dict[str, torch.Tensor]:
    return {m: f.delta() for m, f in delta.items()}


@pytest.fixture
def parent():
    """A parent with a reference direction and a history of accepted norms around its own scale."""
    reference = random_delta(0)
    base_norm = delta_norm(reference)
    history = tuple(base_norm * f for f in (0.8, 0.9, 1.0, 1.1, 1.2))
    return reference, history


def honest_child(reference, seed=1, noise=0.3):
    """The reference direction plus some noise of its own: a plausible fine-tune."""
    noise_delta = random_delta(seed)
    return {
        m: LoraFactors(
            A=torch.cat([reference[m].A, noise_delta[m].A]),
            B=torch.cat([reference[m].scale * reference[m].B, noise * noise_delta[m].scale * noise_delta[m].B], 1),
            scale=1.0,
        )
        for m in reference
    }


@settings(max_examples=40, deadline=None)
@given(a=st.integers(0, 10_000), b=st.integers(0, 10_000))
def test_norms_and_inner_products_from_factors_equal_the_dense_ones(a, b):
    x, y = random_delta(a, (2, 3)), random_delta(b, (4, 1))
    dx, dy = dense(x), dense(y)
    want = sum(float((dx[m] * dy[m]).sum()) for m in LAYERS)
    for left, right in ((x, y), (dx, dy), (x, dy), (dx, y)):
        assert math.isclose(delta_inner(left, right), want, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(delta_norm(x), math.sqrt(sum(float((d**2).sum()) for d in dx.values())), rel_tol=1e-9)
    assert math.isclose(delta_cosine(x, x), 1.0, rel_tol=1e-9)


def test_a_normal_update_is_accepted_with_full_weight(parent):
    reference, history = parent
    child = honest_child(reference)
    r = screen_update(child, accepted_norms=history, reference=reference)
    assert r.verdict is Verdict.ACCEPTED and r.accepted and r.weight == 1.0 and r.clip_factor == 1.0
    assert r.cosine > 0.5 and r.floor <= r.norm <= r.ceiling
    assert r.raise_if_rejected() is r


def test_a_x100_update_is_rejected_or_clipped_to_the_ceiling(parent):
    reference, history = parent
    child = honest_child(reference)
    big = scale_delta(child, 100.0)
    assert math.isclose(delta_norm(big), 100 * delta_norm(child), rel_tol=1e-9)
    rejected = screen_update(big, accepted_norms=history, reference=reference)
    assert rejected.verdict is Verdict.TOO_LARGE and rejected.weight == 0.0 and "ceiling" in rejected.reason
    assert math.isclose(rejected.ceiling, 10.0 * sorted(history)[2])  # 10 x the median accepted norm
    with pytest.raises(ScreeningRejected) as info:
        rejected.raise_if_rejected()
    assert info.value.details["result"] is rejected
    clipped = screen_update(big, accepted_norms=history, reference=reference, policy=ScreenPolicy(on_too_large="clip"))
    assert clipped.verdict is Verdict.CLIPPED and clipped.weight == 1.0
    assert math.isclose(delta_norm(scale_delta(big, clipped.clip_factor)), clipped.ceiling, rel_tol=1e-9)
    assert math.isclose(clipped.merged_norm, clipped.ceiling, rel_tol=1e-9)


def test_a_near_zero_update_is_rejected(parent):
    reference, history = parent
    tiny = scale_delta(honest_child(reference), 1e-9)
    r = screen_update(tiny, accepted_norms=history, reference=reference)
    assert r.verdict is Verdict.TOO_SMALL and r.weight == 0.0 and "near-zero" in r.reason
    # Without history only the absolute floor applies.
    small = scale_delta(honest_child(reference), 1e-3)
    assert screen_update(small, reference=reference).accepted
    assert not screen_update(small, accepted_norms=history, reference=reference).accepted  # < 1% of median


def test_a_sign_flipped_update_gets_weight_zero(parent):
    reference, history = parent
    flipped = scale_delta(honest_child(reference), -1.0)
    r = screen_update(flipped, accepted_norms=history, reference=reference)
    assert r.verdict is Verdict.OPPOSED and r.weight == 0.0 and r.cosine < -0.5
    # The same delta unflipped passes: only the direction differs.
    assert screen_update(scale_delta(flipped, -1.0), accepted_norms=history, reference=reference).accepted


def test_non_finite_and_empty_deltas_are_rejected(parent):
    reference, history = parent
    bad = honest_child(reference)
    bad["q"] = LoraFactors(A=bad["q"].A.clone(), B=bad["q"].B.clone(), scale=1.0)
    bad["q"].B[0, 0] = float("nan")
    assert screen_update(bad, accepted_norms=history).verdict is Verdict.NON_FINITE
    assert screen_update({}, accepted_norms=history).verdict is Verdict.NON_FINITE


def test_the_ceiling_waits_for_enough_history(parent):
    reference, history = parent
    big = scale_delta(honest_child(reference), 100.0)
    assert screen_update(big, accepted_norms=history[:2]).accepted  # min_history=3: no ceiling yet
    capped = screen_update(big, accepted_norms=history[:2], policy=ScreenPolicy(max_norm=1.0))
    assert capped.verdict is Verdict.TOO_LARGE and capped.ceiling == 1.0


def test_screening_changes_none_of_its_inputs(parent):
    reference, history = parent
    child = honest_child(reference)
    copies = {m: (f.A.clone(), f.B.clone(), f.scale) for m, f in child.items()}
    screen_update(
        scale_delta(child, 100.0), accepted_norms=history, reference=reference, policy=ScreenPolicy(on_too_large="clip")
    )
    scale_delta(child, 0.5)
    for m, (a, b, s) in copies.items():
        assert torch.equal(child[m].A, a) and torch.equal(child[m].B, b) and child[m].scale == s


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_norm": -1.0}, "min_norm"),
        ({"max_relative": 1.0}, "max_relative"),
        ({"on_too_large": "ignore"}, "on_too_large"),
        ({"min_cosine": 2.0}, "min_cosine"),
        ({"min_history": 0}, "min_history"),
        ({"max_norm": 0.0}, "max_norm"),
    ],
)
def test_bad_policies_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ScreenPolicy(**kwargs)
