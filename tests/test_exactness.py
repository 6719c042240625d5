"""Every estimator against the brute-force subset expansion, and L = K against exact unrolled MAML.

float64 throughout; "equal" means relative error < 1e-10.
"""

from __future__ import annotations

import functools

import pytest
from torch.func import functional_call

import binom_opt as bo
from binom_opt.functional import meta_gradient

import references as R
from cases import CASES

TOL = 1e-10
# Several of these settings make the binomial series diverge on purpose: exactness still holds.
pytestmark = pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")


def all_estimators(K):
    yield bo.FirstOrder()
    yield bo.Exact()
    for L in range(K + 1):
        yield bo.Binomial(L)
        yield bo.Truncated(L)
        for C in range(L, K + 1):
            yield bo.Hybrid(L, C)


@functools.cache
def problem(case_name, K):
    case = CASES[case_name]()
    unrolled = R.unroll(case.model, case.adapted, case.lrs, case.support, case.query, K)
    return case, unrolled


def engine_gradient(case, estimator, K, **options):
    case.model.zero_grad(set_to_none=True)
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=K, estimator=estimator, **options)
    case.query(engine.adapt(case.support)).backward()
    return {n: p.grad.clone() for n, p in case.model.named_parameters()}, engine


def brute_force_gradient(case, unrolled, estimator, K):
    params = dict(case.model.named_parameters())
    init, meta = R.brute_force(unrolled, estimator, K)
    out = R.unflatten(init, {n: params[n] for n in case.adapted})
    others = {n: p for n, p in params.items() if n not in case.lrs}
    if others:
        out.update(R.unflatten(meta, others))
    return out


@pytest.mark.parametrize("K", range(1, 7))
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_every_estimator_equals_brute_force_expansion(case_name, K):
    case, unrolled = problem(case_name, K)
    for estimator in all_estimators(K):
        got, _ = engine_gradient(case, estimator, K)
        expected = brute_force_gradient(case, unrolled, estimator, K)
        assert R.relative_error(got, expected) < TOL, (estimator, R.relative_error(got, expected))


@pytest.mark.parametrize("K", range(1, 7))
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_full_order_equals_exact_unrolled_maml(case_name, K):
    case, _ = problem(case_name, K)
    via_higher = R.unrolled_higher(case.model, case.inner_opt(), case.support, case.query, K)
    via_autograd = R.unrolled_autograd(case.model, case.adapted, case.lrs, case.support, case.query, K)
    assert R.relative_error(via_autograd, via_higher) < TOL
    for estimator in (bo.Binomial(K), bo.Exact(), bo.Truncated(K), bo.Hybrid(K, K), bo.Binomial(K, "paper")):
        got, _ = engine_gradient(case, estimator, K)
        assert R.relative_error(got, via_higher) < TOL, estimator
        assert R.relative_error(got, via_autograd) < TOL, estimator


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_functional_core_equals_engine(case_name):
    K = 4
    case, _ = problem(case_name, K)
    params = {n: p.detach() for n, p in case.model.named_parameters() if n in case.lrs}
    loss_of = lambda fn: (lambda p: fn(lambda *x: functional_call(case.model, p, x)))
    for estimator in (bo.FirstOrder(), bo.Truncated(2), bo.Binomial(2), bo.Hybrid(1, 3), bo.Exact()):
        got = meta_gradient(
            loss_of(case.support), loss_of(case.query), params, steps=K, lr=case.lrs, estimator=estimator
        )
        expected, _ = engine_gradient(case, estimator, K)
        assert R.relative_error(got, {n: expected[n] for n in params}) < TOL, estimator


@pytest.mark.parametrize("K", [3, 5])
def test_zero_order_estimators_are_first_order(K):
    case, _ = problem("conv_bn", K)
    first_order, _ = engine_gradient(case, bo.FirstOrder(), K)
    for estimator in (bo.Binomial(0), bo.Truncated(0), bo.Hybrid(0, K), bo.Hybrid(0, 0), bo.Binomial(0, "paper")):
        got, _ = engine_gradient(case, estimator, K)
        assert R.relative_error(got, first_order) == 0.0, estimator


@pytest.mark.parametrize("L", range(5))
def test_hybrid_limits_are_binomial_and_truncated(L):
    K = 4
    case, _ = problem("mlp_sine", K)
    assert R.relative_error(engine_gradient(case, bo.Hybrid(L, K), K)[0], engine_gradient(case, bo.Binomial(L), K)[0]) < TOL
    assert R.relative_error(engine_gradient(case, bo.Hybrid(L, L), K)[0], engine_gradient(case, bo.Truncated(L), K)[0]) < TOL


def test_paper_hessian_scale_equals_brute_force_with_scaled_step():
    K = 5
    case, unrolled = problem("frozen_body", K)
    for L in range(K + 1):
        estimator = bo.Binomial(L, "paper")
        got, _ = engine_gradient(case, estimator, K)
        assert R.relative_error(got, brute_force_gradient(case, unrolled, estimator, K)) < TOL, L


@pytest.mark.parametrize("case_name", ["conv_bn", "frozen_body"])
def test_hvp_backends_and_chunking_agree(case_name):
    K = 5
    case, _ = problem(case_name, K)
    for estimator in (bo.Binomial(2), bo.Hybrid(2, 4), bo.Exact()):
        reference, _ = engine_gradient(case, estimator, K, hvp="rev")
        for options in ({"hvp": "fwd"}, {"hvp": "auto"}, {"chunk_size": 1}, {"chunk_size": 2, "hvp": "fwd"}):
            got, _ = engine_gradient(case, estimator, K, **options)
            assert R.relative_error(got, reference) < TOL, (estimator, options)
