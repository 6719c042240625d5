"""The estimators' arithmetic on explicit matrices, against the brute-force subset expansion."""

import itertools
import weakref

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


def random_problem(seed, K, d, scalar_step=False):
    """``K`` symmetric Hessians, ``g`` and the step sizes: per entry, or one float (``scalar_step``: plain SGD, whose
    step Jacobian an approximation multiplies after the Hessian's product)."""
    gen = generator(seed)
    hessians = []
    for _ in range(K):
        a = torch.randn(d, d, generator=gen, dtype=torch.float64)
        hessians.append((a + a.T) / 2)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    step = 0.05 + 0.2 * torch.rand(d, generator=gen, dtype=torch.float64)  # per-entry step sizes
    return hessians, g, float(step[0]) if scalar_step else step


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
@given(estimators, st.integers(0, 2**16), st.integers(1, 4), st.booleans())
def test_expansion_equals_brute_force(K_estimator, seed, d, scalar_step):
    K, estimator = K_estimator
    hessians, g, step = random_problem(seed, K, d, scalar_step)
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


def alive(refs):
    """How many distinct tensors of the weak references ``refs`` are alive."""
    return len({id(t) for t in (r() for r in refs) if t is not None})


class ListedOracle:
    """An oracle whose products come as a list (an ``HVPOracle`` on one task's points: kept graphs, or replays one at a
    time where ``alone``): it records, at each call, how many products of earlier calls and vectors of the rounds
    before are still alive."""

    def __init__(self, hessians, alone):
        self.hessians, self.alone = hessians, alone
        self.products, self.vectors, self.live_at_call = [], [], []

    def listed(self, steps):
        return True

    def replays_alone(self, steps):
        return self.alone

    def each(self, steps, vectors, first=None, bare=False):
        self.live_at_call.append((alive(self.products), alive(self.vectors)))
        out = []
        for j, v in zip(steps, vectors):
            self.vectors.append(weakref.ref(v["w"]))
            product = {"w": self.hessians[j] @ v["w"][0]} if bare else {"w": (self.hessians[j] @ v["w"][0])[None]}
            self.products.append(weakref.ref(product["w"]))
            out.append(product)
        return out


@pytest.mark.parametrize("alone", [False, True], ids=["kept graphs", "replayed alone"])
@pytest.mark.parametrize("estimator", [bo.Binomial(1), bo.Binomial(2), bo.Binomial(3), bo.Hybrid(2, 4)], ids=repr)
def test_a_listed_round_drops_each_product_once_summed(estimator, alone):
    """Products taken as a list are dropped as soon as the round's sums take them: the next call starts with none of
    them alive (a round holds one product at a time where the points are replayed alone, else one per step, never two
    rounds'), and a replayed round's vectors are dropped as the sums replace them (Binomial(L) then holds L - 1
    vectors per step). The result is the stacked oracle's."""
    K = 5
    hessians, g, step = random_problem(3, K, 4, scalar_step=True)
    oracle = ListedOracle(hessians, alone)
    sgd = StepTranspose({"w": SGDRule()}, {"w": {"lr": step}})
    got = expand(estimator.plan(K), {"w": g[None]}, sgd, oracle, steps=K)
    plan = estimator.plan(K)
    assert [products for products, _ in oracle.live_at_call] == [0] * (got.hvp_count if alone else plan.levels)
    if alone:  # at most one round's vectors alive (the rounds before, 1 + their window's), the last round's dropped
        assert max(vectors for _, vectors in oracle.live_at_call) <= (K + 1 if plan.levels > 1 else 1)
        assert alive(oracle.vectors) <= 2  # the result's vectors, and the window's
    expected = run(estimator, K, hessians, g, step, [])
    assert torch.allclose(got.meta_grad["w"], expected.meta_grad["w"], rtol=1e-13, atol=0)


@pytest.mark.parametrize("scalar_step", [False, True])
@pytest.mark.parametrize("estimator", [bo.Binomial(1), bo.Binomial(2), bo.Binomial(4), bo.Hybrid(2, 4), bo.Hybrid(3, 4)])
def test_binomial_contributions_are_the_norms_of_each_order_over_their_window(estimator, scalar_step):
    K = 5
    hessians, g, step = random_problem(1, K, 3, scalar_step)
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
    assert torch.allclose(result.contributions.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("estimator", [bo.Truncated(2), bo.Exact()])
def test_sequential_contributions_are_the_norms_of_the_change_each_factor_makes(estimator):
    K = 4
    hessians, g, step = random_problem(2, K, 3, scalar_step=True)
    result = run(estimator, K, hessians, g, step, [])
    v, expected = g, []
    for j in reversed(range(K - estimator.plan(K).levels, K)):
        change = -(hessians[j] @ (step * v))
        expected.append(float(change.norm()))
        v = v + change
    assert torch.allclose(result.contributions.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


def test_an_approximation_multiplies_the_product_by_the_sgd_step_and_exact_keeps_unrolled_autograds_order():
    """Plain SGD's step Jacobian is ``-lr`` times the identity: an approximation (``L < K``) hands the Hessian the
    adjoint itself and multiplies the product (no scaled copy), ``Exact`` hands it ``-lr`` times the adjoint, as
    unrolled autograd does (the same bits as the loop it replaces, where the Hessian is ill-conditioned too)."""
    K, lr = 3, 0.1
    hessians, g, _ = random_problem(3, K, 2)
    for estimator, handed in ((bo.Binomial(1), g), (bo.Truncated(1), g), (bo.Exact(), -lr * g)):
        seen = []
        oracle = matrix_hvp_oracle(hessians)

        def recording(steps, vectors, oracle=oracle, seen=seen):
            seen.append(vectors["w"])
            return oracle(steps, vectors)

        sgd = StepTranspose({"w": SGDRule()}, {"w": {"lr": lr}})
        expand(estimator.plan(K), {"w": g[None]}, sgd, recording, steps=K)
        assert torch.equal(seen[0][0, 0], handed), estimator  # the first vector H_{K-1} takes: u_K = g, scaled or not


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
