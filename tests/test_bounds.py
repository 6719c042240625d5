"""The paper's error bounds (binom_opt.bounds) against the library's estimators on explicit matrices."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from binom_opt.bounds import (
    decay_constant_3_8,
    decay_constant_3_10,
    measured_errors,
    sample_hessians,
    theorem_3_6,
    theorem_3_8,
    theorem_3_10,
)

from cases import generator

SLACK = 1e-9  # relative; float64 rounding of the estimators is ~1e-15


def below(actual, bound):
    return actual <= bound * (1 + SLACK) + 1e-14


# ---- hand-computed values -------------------------------------------------------------------


def test_theorem_3_6_values():
    # K=3, L=1, aH=0.2: FO 1.2^3 - 1 = 0.728; Tr 1.728 - 1.2 = 0.528;
    # Bi C(3,2) 0.04 + C(3,3) 0.008 = 0.128; all times ||g|| = 2.
    assert theorem_3_6(3, 1, 0.1, 2.0, g_norm=2.0) == pytest.approx((1.456, 1.056, 0.256), rel=1e-14)


def test_theorem_3_8_values():
    # K=3, L=1, aH=0.2: FO 1 - 0.8^3 = 0.488; Tr 1 - 0.8^2 = 0.36; Bi C(3,2) 0.2^2 = 0.12.
    assert theorem_3_8(3, 1, 0.1, 2.0) == pytest.approx((0.488, 0.36, 0.12), rel=1e-14)


def test_theorem_3_10_values():
    # K=4, L=2, M=1, aH=0.2, s = 1 - ah = 0.9:
    # FO max(1.2^3 * 0.9 - 1 = 0.5552, 1 - 0.8^4 = 0.5904) = 0.5904
    # Tr (1.2^3 - 1.2^1) * 0.9 = 0.528 * 0.9 = 0.4752
    # Bi 0.2^3 C(3,2) 0.9^0 + 0.9 (C(3,3) 0.2^3) = 0.024 + 0.0072 = 0.0312
    assert theorem_3_10(4, 2, 0.1, 2.0, 1.0, 1) == pytest.approx((0.5904, 0.4752, 0.0312), rel=1e-14)


def test_theorem_3_10_with_two_strongly_convex_steps():
    # K=4, L=2, M=2, aH=0.5, s = 0.75: FO max(1.5^2 0.75^2 - 1 < 0, 1 - 0.5^4 = 0.9375);
    # Tr (1.5^2 - 1.5^0) 0.75^2 = 1.25 * 0.5625 = 0.703125;
    # Bi 0.5^3 (C(3,2) + C(2,2) 0.75) + 0.75^2 * (empty sum, l = 3..2) = 0.125 * 3.75 = 0.46875
    assert theorem_3_10(4, 2, 0.5, 1.0, 0.5, 2) == pytest.approx((0.9375, 0.703125, 0.46875), rel=1e-14)


def test_decay_constants():
    # e K / (L + 1) = e 6 / 3 = 2e; e (K - 1) / L = e 5 / 2
    assert decay_constant_3_8(6, 2) == pytest.approx(2 * math.e)
    assert decay_constant_3_10(6, 2) == pytest.approx(2.5 * math.e)


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda: theorem_3_6(0, 0, 0.1, 1.0), ("Theorem 3.6", "K")),
        (lambda: theorem_3_6(2.0, 0, 0.1, 1.0), ("Theorem 3.6", "K")),
        (lambda: theorem_3_6(3, 4, 0.1, 1.0), ("Theorem 3.6", "L")),
        (lambda: theorem_3_6(3, 1, 0.0, 1.0), ("Theorem 3.6", "alpha")),
        (lambda: theorem_3_6(3, 1, 0.1, -1.0), ("Theorem 3.6", "H")),
        (lambda: theorem_3_8(3, 1, 0.5, 2.0), ("Theorem 3.8", "alpha < 1/H")),
        (lambda: theorem_3_10(3, 1, 0.5, 2.0, 1.0, 1), ("Theorem 3.10", "alpha < 1/H")),
        (lambda: theorem_3_10(3, 1, 0.1, 1.0, 2.0, 1), ("Theorem 3.10", "h")),
        (lambda: theorem_3_10(3, 1, 0.1, 1.0, 0.5, 2), ("Theorem 3.10", "M")),
        (lambda: theorem_3_10(4, 0, 0.1, 1.0, 0.5, 0), ("Theorem 3.10", "M")),
        (lambda: decay_constant_3_10(4, 0), ("decay_constant_3_10", "L")),
    ],
)
def test_out_of_range_arguments_name_the_argument_and_theorem(call, names):
    with pytest.raises(ValueError) as info:
        call()
    assert all(name in str(info.value) for name in names)


# ---- the bounds hold for the library's estimators --------------------------------------------


@st.composite
def problems(draw, assumption):
    """(hessians, g, alpha, L, M, h, H) satisfying the assumptions of ``assumption``'s theorem."""
    K = draw(st.integers(2 if assumption == "3.10" else 1, 5))
    M = draw(st.integers(1, K // 2)) if assumption == "3.10" else 0
    L = draw(st.integers(M, K - M))
    H = draw(st.sampled_from([0.5, 1.0, 3.0]))
    aH = draw(st.floats(0.01, 0.99) if assumption != "3.6" else st.floats(0.01, 2.0))
    h = draw(st.floats(0.05, 1.0)) * H
    gen = generator(draw(st.integers(0, 2**16)))
    d = draw(st.integers(1, 4))
    shared = draw(st.booleans())
    hessians = sample_hessians(assumption, K, d, H, h=h, M=M, shared_basis=shared, generator=gen)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    return hessians, g, aH / H, L, M, h, H, shared


@settings(max_examples=60, deadline=None)
@given(problems("3.6"))
def test_theorem_3_6_bounds_hold_and_are_ordered(problem):
    hessians, g, alpha, L, _, _, H, _ = problem
    bound = theorem_3_6(len(hessians), L, alpha, H, g_norm=float(g.norm()))
    assert all(map(below, measured_errors(hessians, g, alpha, L), bound))
    assert below(bound.binomial, bound.truncated) and below(bound.truncated, bound.fo)


@settings(max_examples=60, deadline=None)
@given(problems("3.8"))
def test_theorem_3_8_bounds_hold(problem):
    hessians, g, alpha, L, _, _, H, shared = problem
    bound = theorem_3_8(len(hessians), L, alpha, H, g_norm=float(g.norm()))
    errors = measured_errors(hessians, g, alpha, L)
    assert below(errors.binomial, bound.binomial)
    if shared:  # (12a), (12b) assume commuting Hessians, see test_paper_gap_non_commuting
        assert below(errors.fo, bound.fo) and below(errors.truncated, bound.truncated)


@settings(max_examples=60, deadline=None)
@given(problems("3.10"))
def test_theorem_3_10_bounds_hold(problem):
    hessians, g, alpha, L, M, h, H, shared = problem
    bound = theorem_3_10(len(hessians), L, alpha, H, h, M, g_norm=float(g.norm()))
    errors = measured_errors(hessians, g, alpha, L)
    assert below(errors.truncated, bound.truncated) and below(errors.binomial, bound.binomial)
    if shared:  # (13a) assumes commuting Hessians
        assert below(errors.fo, bound.fo)


def test_paper_gap_non_commuting_convex_hessians_break_12a():
    """(12a) reads ||P - I|| off P's eigenvalues, which needs commuting H_k: a counterexample."""
    v = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    hessians = [torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)), torch.outer(v, v)]
    P = (torch.eye(2, dtype=torch.float64) - 0.9 * hessians[0]) @ (torch.eye(2, dtype=torch.float64) - 0.9 * hessians[1])
    worst_g = torch.linalg.svd(P - torch.eye(2, dtype=torch.float64)).Vh[0]
    errors = measured_errors(hessians, worst_g, alpha=0.9, L=0)
    bound = theorem_3_8(2, 0, 0.9, 1.0)
    assert errors.fo == pytest.approx(1.0763, abs=1e-4) and bound.fo == pytest.approx(0.99)
    assert errors.fo > bound.fo


# ---- sharpness and decay ---------------------------------------------------------------------


@pytest.mark.parametrize("K, L, alpha, H", [(5, 0, 0.25, 1.0), (5, 2, 0.25, 1.0), (4, 3, 0.4, 2.0), (3, 3, 0.1, 1.0)])
def test_negative_identity_attains_theorem_3_6(K, L, alpha, H):
    g = torch.tensor([0.6, -0.8], dtype=torch.float64)
    errors = measured_errors([-H * torch.eye(2, dtype=torch.float64)] * K, g, alpha, L)
    assert tuple(errors) == pytest.approx(tuple(theorem_3_6(K, L, alpha, H)), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("K, L", [(5, 0), (5, 2), (3, 3)])
def test_identity_attains_theorem_3_8(K, L):
    alpha, H, eye, g = 0.25, 1.0, torch.eye(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    bound = theorem_3_8(K, L, alpha, H)
    assert measured_errors([H * eye] * K, g, alpha, L).fo == pytest.approx(bound.fo, rel=1e-12)
    # (12b) is attained with H I before the truncation window and 0 inside it.
    window = [H * eye] * (K - L) + [0 * eye] * L
    assert measured_errors(window, g, alpha, L).truncated == pytest.approx(bound.truncated, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("K", [3, 5, 8])
def test_binomial_bound_decays_super_exponentially_below_the_decay_constant(K):
    H = 1.0
    alpha = 0.99 / (decay_constant_3_8(K, 0) * H)  # below 1/(C_a H) for every L
    e = [theorem_3_8(K, L, alpha, H).binomial for L in range(K)]
    ratios = [b / a for a, b in zip(e, e[1:])]
    assert all(r < 1 / math.e for r in ratios) and ratios == sorted(ratios, reverse=True)
    assert len(set(ratios)) == len(ratios)  # strictly shrinking
    assert all(e[L] <= (decay_constant_3_8(K, L) * alpha * H) ** (L + 1) * (1 + SLACK) for L in range(K))


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 12).flatmap(lambda K: st.tuples(st.just(K), st.integers(1, K // 2))), st.floats(0.01, 0.99), st.floats(0.01, 1.0))
def test_theorem_3_10_binomial_bound_decays_below_the_decay_constant(K_M, fraction, h):
    K, M = K_M
    H = 1.0
    alpha = fraction / (decay_constant_3_10(K, 1) * H)
    Ls = range(M, K - M + 1)
    e = [theorem_3_10(K, L, alpha, H, h, M).binomial for L in Ls]
    for L, value in zip(Ls, e):  # the envelope the proof after eq. (37) derives
        envelope = (M * alpha * H + (1 + alpha * H) ** (K - L - M) - 1) * (decay_constant_3_10(K, L) * alpha * H) ** L
        assert value <= envelope * (1 + SLACK)
    ratios = [b / a for a, b in zip(e, e[1:])]
    assert all(r < 1 for r in ratios) and all(b <= a * (1 + SLACK) for a, b in zip(ratios, ratios[1:]))


@settings(max_examples=30, deadline=None)
@given(problems("3.6"))
def test_binomial_error_vanishes_at_L_equals_K(problem):
    hessians, g, alpha, _, _, _, _, _ = problem
    K = len(hessians)
    assert measured_errors(hessians, g, alpha, K).binomial <= 1e-12 * (1 + alpha * 3.0) ** K * float(g.norm())
