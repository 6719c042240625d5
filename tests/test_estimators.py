import dataclasses

import pytest

import binom_opt as bo


@pytest.mark.parametrize("make", [lambda: bo.Binomial(-1), lambda: bo.Truncated(-2), lambda: bo.Hybrid(-1, 2), lambda: bo.Hybrid(1, -1)])
def test_negative_levels_are_rejected(make):
    with pytest.raises(ValueError, match=">= 0"):
        make()


@pytest.mark.parametrize("value", [1.5, True, "2", None])
def test_non_integer_levels_are_rejected(value):
    with pytest.raises(TypeError, match="integer"):
        bo.Binomial(value)


def test_hybrid_needs_window_at_least_levels():
    with pytest.raises(ValueError, match=r"L <= C.*L=3, C=2"):
        bo.Hybrid(3, 2)


def test_unknown_hessian_scale_is_rejected():
    with pytest.raises(ValueError, match="hessian_scale"):
        bo.Binomial(1, "approximate")


@pytest.mark.parametrize(
    "estimator, message",
    [(bo.Binomial(4), r"L=4 > K=3"), (bo.Truncated(5), r"L=5 > K=3"), (bo.Hybrid(1, 4), r"C=4 > K=3")],
)
def test_levels_above_inner_steps_are_rejected_at_use(estimator, message):
    with pytest.raises(ValueError, match=message):
        estimator.plan(3)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_steps_must_be_a_positive_integer(steps):
    with pytest.raises(ValueError, match="steps"):
        bo.Binomial(0).plan(steps)


def test_estimators_are_immutable_and_hashable():
    estimator = bo.Binomial(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        estimator.L = 3
    assert estimator == bo.Binomial(2) and len({estimator, bo.Binomial(2), bo.Truncated(2)}) == 2


@pytest.mark.parametrize(
    "estimator, plan",
    [
        (bo.FirstOrder(), (0, 5, "sequential", 1.0)),
        (bo.Binomial(0), (0, 5, "sequential", 1.0)),
        (bo.Truncated(0), (0, 5, "sequential", 1.0)),
        (bo.Hybrid(0, 3), (0, 5, "sequential", 1.0)),
        (bo.Truncated(2), (2, 3, "sequential", 1.0)),
        (bo.Binomial(2), (2, 0, "binomial", 1.0)),
        (bo.Binomial(2, "paper"), (2, 0, "binomial", 0.4)),
        (bo.Hybrid(1, 4), (1, 1, "binomial", 1.0)),
        (bo.Hybrid(2, 2), (2, 3, "sequential", 1.0)),
        (bo.Binomial(5), (5, 0, "sequential", 1.0)),
        (bo.Exact(), (5, 0, "sequential", 1.0)),
    ],
)
def test_plans(estimator, plan):
    assert dataclasses.astuple(estimator.plan(5)) == plan
