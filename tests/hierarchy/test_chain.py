"""Chain math on random factors: composition, exact flattening, padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierarchy.chain import LoraFactors, compose_delta, effective_weight, flatten_chain, pad_rank
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
