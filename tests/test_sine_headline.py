"""The paper's headline on its sine task, and where it stops holding.

Protocol: MLP 1-40-40-1 ReLU (a fresh random initialisation per meta-batch), K = 5 inner
steps, 10 support points, relative error of the meta-batch-mean meta-gradient against Exact()
over meta-batches of 10 tasks, averaged over 8 meta-batches, float64, fixed seeds.
"""

import sys
from pathlib import Path

import pytest

import binom_opt as bo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from fewshot.sine import mean_meta_gradient_errors

pytestmark = pytest.mark.cpu_only  # the example scripts, processes and files run on the host

K = 5
ESTIMATORS = [bo.FirstOrder()] + [bo.Truncated(L) for L in range(1, K)] + [bo.Binomial(L) for L in range(1, K)]


@pytest.fixture(scope="module")
def errors():
    return {lr: mean_meta_gradient_errors(ESTIMATORS, lr=lr, steps=K, batches=8, tasks=10, seed=0) for lr in (0.003, 0.01)}


def test_binomial_beats_truncated_at_every_order_for_small_steps(errors):
    e = errors[0.003]
    for L in range(1, K):
        assert e[bo.Binomial(L)] < e[bo.Truncated(L)], (L, e[bo.Binomial(L)], e[bo.Truncated(L)])
    assert e[bo.Binomial(2)] < 0.05 * e[bo.FirstOrder()]
    assert e[bo.Binomial(1)] < 0.5 * e[bo.Truncated(1)]


def test_the_binomial_advantage_fades_as_alpha_times_hessian_grows(errors):
    ratio = {lr: errors[lr][bo.Binomial(1)] / errors[lr][bo.Truncated(1)] for lr in errors}
    assert ratio[0.01] > 2 * ratio[0.003], ratio
    # At alpha = 0.01 first-order Binomial is no longer better than first-order Truncated by any margin.
    assert ratio[0.01] > 0.8, ratio
