"""Theorem 3.6 on real networks: with H measured along the trajectory, actual errors stay below the bounds."""

import pytest
import torch
from torch.func import functional_call

import binom_opt as bo
from binom_opt.bounds import hessian_norms, theorem_3_6
from binom_opt.functional import meta_gradients

from cases import conv_bn, generator, mlp_sine

K = 5


def sgd_trajectory(loss, params, lr, steps):
    """The inner loop's points, stacked, and its final point (plain torch.func, independent of the library)."""
    points, phi = [], dict(params)
    for _ in range(steps):
        points.append(phi)
        grads = torch.func.grad(loss)(phi)
        phi = {n: phi[n] - lr * grads[n] for n in phi}
    return {n: torch.stack([p[n] for p in points]) for n in phi}, phi


@pytest.mark.parametrize("make_case, lr", [(mlp_sine, 0.02), (conv_bn, 0.05)])
def test_actual_errors_are_within_theorem_3_6_with_measured_hessian_norm(make_case, lr):
    case = make_case()
    params = {n: p.detach() for n, p in case.model.named_parameters()}
    loss = lambda fn: (lambda p: fn(lambda *x: functional_call(case.model, p, x)))
    inner, outer = loss(case.support), loss(case.query)
    points, final = sgd_trajectory(inner, params, lr, K)
    # Power iteration approaches ||H_k|| from below; 1% headroom covers what 300 iterations miss.
    H = 1.01 * max(hessian_norms(inner, points, iters=300, generator=generator(0)))
    g = torch.func.grad(outer)(final)
    g_norm = float(torch.sqrt(sum(t.pow(2).sum() for t in g.values())))
    estimators = [bo.Exact(), bo.FirstOrder()] + [e for L in range(1, K) for e in (bo.Truncated(L), bo.Binomial(L))]
    results = meta_gradients(inner, outer, params, steps=K, lr=lr, estimators=estimators)
    flat = {e: torch.cat([t.reshape(-1) for t in grad.values()]) for e, (grad, _) in results.items()}
    error = lambda e: float((flat[e] - flat[bo.Exact()]).norm())
    for L in range(1, K):
        bound = theorem_3_6(K, L, lr, H, g_norm=g_norm)
        assert error(bo.FirstOrder()) <= bound.fo
        assert error(bo.Truncated(L)) <= bound.truncated, L
        assert error(bo.Binomial(L)) <= bound.binomial, L
