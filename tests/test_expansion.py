"""The estimators' arithmetic on explicit matrices, against the brute-force subset expansion."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import binom_opt as bo
from binom_opt.bounds import matrix_hvp_oracle
from binom_opt.core.expansion import expand
from binom_opt.core.update_rules import SGDRule, StepTranspose

import references as R
from cases import generator


def matrix_oracle(hessians, calls):
    """``matrix_hvp_oracle`` that also records how many HVPs each call asks for."""
    oracle = matrix_hvp_oracle(hessians)

    def counting(steps, vectors):
        calls.append(len(steps))
        return oracle(steps, vectors)

    return counting


def run(estimator, K, hessians, g, step, calls, **options):
    """``expand`` for one task (the task dimension of 1 added and taken off) with plain SGD's transposes."""
    sgd = StepTranspose({"w": SGDRule()}, {"w": {"lr": step}})
    return expand(estimator.plan(K), {"w": g[None]}, sgd, matrix_oracle(hessians, calls), steps=K, **options)


def without_meta(hessians, g, step):
    return R.Unrolled(hessians, [g.new_zeros(0, g.numel())] * len(hessians), g, g.new_zeros(0), step)


def random_problem(seed, K, d):
    gen = generator(seed)
    hessians = []
    for _ in range(K):
        a = torch.randn(d, d, generator=gen, dtype=torch.float64)
        hessians.append((a + a.T) / 2)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    step = 0.05 + 0.2 * torch.rand(d, generator=gen, dtype=torch.float64)  # per-entry step sizes
    return hessians, g, step


estimators = st.integers(1, 6).flatmap(
    lambda K: st.tuples(
        st.just(K),
        st.one_of(
            st.just(bo.FirstOrder()),
            st.just(bo.Exact()),
            st.integers(0, K).map(bo.Truncated),
            st.integers(0, K).map(bo.Binomial),
            st.integers(0, K).map(lambda L: bo.Binomial(L, "paper")),
            st.integers(0, K).flatmap(lambda C: st.integers(0, C).map(lambda L: bo.Hybrid(L, C))),
        ),
    )
)


@settings(max_examples=60, deadline=None)
@given(estimators, st.integers(0, 2**16), st.integers(1, 4))
def test_expansion_equals_brute_force(K_estimator, seed, d):
    K, estimator = K_estimator
    hessians, g, step = random_problem(seed, K, d)
    calls = []
    result = run(estimator, K, hessians, g, step, calls)
    expected, _ = R.brute_force(without_meta(hessians, g, step), estimator, K)
    assert torch.allclose(result.meta_grad["w"][0], expected, rtol=1e-12, atol=1e-12 * float(expected.norm()))
    assert result.hvp_count == sum(calls) and result.oracle_calls == len(calls)


def test_each_binomial_round_is_one_batched_call_of_K_minus_L_plus_1_hvps():
    K, L = 6, 3
    hessians, g, step = random_problem(0, K, 3)
    calls = []
    result = run(bo.Binomial(L), K, hessians, g, step, calls)
    assert calls == [K - L + 1] * L and result.hvp_count == L * (K - L + 1)
    calls.clear()
    run(bo.Hybrid(2, 4), K, hessians, g, step, calls)
    assert calls == [4, 3]  # Hessians from K - C = 2 on: round 1 takes j = 2..5, round 2 j = 2..4


@pytest.mark.parametrize("estimator", [bo.Binomial(1), bo.Binomial(2), bo.Binomial(4), bo.Hybrid(2, 4), bo.Hybrid(3, 4)])
def test_binomial_contributions_are_the_norms_of_each_order_over_their_window(estimator):
    K = 5
    hessians, g, step = random_problem(1, K, 3)
    result = run(estimator, K, hessians, g, step, [])
    L, first = estimator.L, K - getattr(estimator, "C", K)
    expected = []
    for level in range(1, L + 1):
        window = max(L - level + 1, first)
        terms = torch.zeros_like(g)
        for subset in itertools.combinations(range(window, K), level):
            v = g
            for k in reversed(subset):
                v = -(hessians[k] @ (step * v))
            terms = terms + v
        expected.append(float(terms.norm()))
    assert torch.allclose(torch.cat(result.contributions), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5).flatmap(lambda K: st.tuples(st.just(K), st.integers(1, K), st.integers(0, 1000))))
def test_adjoints_are_the_tails_with_one_hessian_factor_less(K_L_seed):
    K, L, seed = K_L_seed
    hessians, g, step = random_problem(seed, K, 3)
    adjoints = {}
    run(bo.Binomial(L), K, hessians, g, step, [], on_adjoint=adjoints.__setitem__)
    assert list(adjoints) == list(reversed(range(K)))  # handed over as soon as they exist, last step first
    for k, adjoint in adjoints.items():
        tail = without_meta(hessians[k + 1 :], g, step)
        expected, _ = R.brute_force(tail, bo.Binomial(min(L - 1, K - k - 1)), K - k - 1)
        assert torch.allclose(adjoint["w"][0], expected, rtol=1e-12, atol=1e-14), k
