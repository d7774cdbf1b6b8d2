"""Chain math on random factors: composition, exact flattening, padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierarchy.chain import LoraFactors, compose_delta, effective_weight, flatten_chain, pad_rank, refit_over
from hierarchy.errors import ChainError


def random_chain(seed: int, ranks: list[int], out: int = 12, inp: int = 10) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraFactors(
            A=torch.randn(r, inp, generator=g, dtype=torch.float64),
            B=torch.randn(out, r, generator=g, dtype=torch.float64),
            scale=float(torch.rand(1, generator=g).item() * 3 + 0.1),
        )
        for r in ranks
    ]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_flatten_is_exact_with_mixed_ranks(seed, ranks):
    chain = random_chain(seed, ranks)
    flat = flatten_chain(chain)
    assert flat.rank == sum(ranks) and flat.scale == 1.0
    expected = sum(f.scale * f.B @ f.A for f in chain)
    torch.testing.assert_close(flat.delta(), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(compose_delta(chain), expected, rtol=0, atol=1e-10)


def test_effective_weight_adds_every_chain_element():
    chain = random_chain(1, [2, 3, 4])
    w0 = torch.randn(12, 10, dtype=torch.float64)
    w = effective_weight(w0, chain)
    # peel the chain off one element at a time: each element contributes its own term
    torch.testing.assert_close(w - effective_weight(w0, chain[:2]), chain[2].delta())
    assert torch.equal(effective_weight(w0, []), w0)


def test_naive_average_is_not_the_chain():
    chain = [pad_rank(f, 4) for f in random_chain(3, [2, 4, 3])]
    naive = LoraFactors(
        A=sum(f.A for f in chain) / 3, B=sum(f.B for f in chain) / 3, scale=sum(f.scale for f in chain) / 3
    )
    gap = (naive.delta() - compose_delta(chain)).abs().max().item()
    assert gap > 1e-1


def test_pad_rank_keeps_delta_and_refuses_to_shrink():
    f = random_chain(5, [3])[0]
    padded = pad_rank(f, 7)
    assert padded.rank == 7
    torch.testing.assert_close(padded.delta(), f.delta())
    with pytest.raises(ChainError):
        pad_rank(f, 2)


def test_shape_errors_are_typed():
    with pytest.raises(ChainError, match="rank mismatch"):
        LoraFactors(A=torch.zeros(2, 4), B=torch.zeros(3, 3), scale=1.0)
    a = random_chain(0, [2], out=5, inp=4)[0]
    b = random_chain(0, [2], out=6, inp=4)[0]
    with pytest.raises(ChainError, match="expected"):
        compose_delta([a, b])
    with pytest.raises(ChainError, match="empty chain"):
        flatten_chain([])


def test_refit_over_a_changed_parent_keeps_the_effective_weight():
    """own + old parent == refit + new parent: exact when the target fits the rank, and the
    reported error is the SVD tail (what the rank cut leaves out) otherwise."""
    ancestor, old_parent, new_parent = random_chain(3, [2, 3, 3])
    own = random_chain(4, [4])[0]
    w0 = torch.randn(12, 10, dtype=torch.float64)
    before = effective_weight(w0, [ancestor, old_parent, own])
    # Rank 10 (the layer's width): the target always fits, so the fit is exact.
    wide, error = refit_over(own, [ancestor, old_parent], [ancestor, new_parent], 10)
    assert error == pytest.approx(0.0, abs=1e-9) and wide.scale == own.scale
    torch.testing.assert_close(effective_weight(w0, [ancestor, new_parent, wide]), before, rtol=0, atol=1e-9)
    # At own's rank (4) the target (rank up to 10) is cut; the error is the tail of its spectrum.
    cut, error = refit_over(own, [ancestor, old_parent], [ancestor, new_parent], own.rank)
    assert cut.rank == own.rank
    target = own.delta() + old_parent.delta() - new_parent.delta()
    s = torch.linalg.svdvals(target)
    assert error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-9) and 0 < error < 1
    residual = effective_weight(w0, [ancestor, new_parent, cut]) - before
    assert float(residual.norm() / target.norm()) == pytest.approx(error, rel=1e-6)
    # Unchanged parent: the own factors' delta comes back (its rank fits), error 0.
    same, error = refit_over(own, [old_parent], [old_parent], own.rank)
    torch.testing.assert_close(same.delta(), own.delta(), rtol=0, atol=1e-9)
    assert error == pytest.approx(0.0, abs=1e-9)


def test_refit_over_pads_narrow_layers_and_refuses_bad_input():
    own = random_chain(5, [3], out=2, inp=10)[0]
    fitted, _ = refit_over(own, [], [], 3)
    assert fitted.rank == 3  # the layer has only 2 singular values: the third rank is zero-padded
    torch.testing.assert_close(fitted.delta(), own.delta(), rtol=0, atol=1e-9)
    with pytest.raises(ChainError, match="rank must be >= 1"):
        refit_over(own, [], [], 0)
    with pytest.raises(ChainError, match="adapts a 12x10 layer, the own adapter a 2x10 one"):
        refit_over(own, random_chain(6, [2]), [], 3)
