"""The autograd node: the replay check, the NaN policy, backward once, reproducibility, no reference cycle."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo

import references as R
from cases import conv_bn, frozen_body, grads, image_tasks, mlp_sine, sine_engine, small_model, tasks

TOL = 1e-10
STEPS, B, K, LR = 3, 3, 4, 0.1
pytestmark = pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")


def bad_engine(**options):
    model = conv_bn().model
    opt = options.pop("opt", None) or torch.optim.SGD(model.parameters(), lr=LR)
    return bo.MetaGradientEngine(model, opt, steps=2, **options), model


def nan_gradient_query(case):
    """A finite query loss whose gradient is NaN (sqrt at 0)."""
    return lambda m: case.query(m) + torch.sqrt((0 * case.query(m)).clamp_min(0))


def test_non_finite_meta_gradient_raises_by_default_naming_where():
    case = frozen_body()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 3, bo.Binomial(2))
    loss = nan_gradient_query(case)(engine.adapt(case.support))
    assert torch.isfinite(loss)
    with pytest.raises(FloatingPointError, match="not finite"):
        engine.meta_backward(loss)


def test_skip_task_zeroes_the_task_and_records_it():
    case = frozen_body()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 3, bo.Binomial(2), nan_policy="skip_task")
    good = case.query(engine.adapt(case.support))
    bad = nan_gradient_query(case)(engine.adapt(case.support))
    engine.meta_backward(bad)
    assert engine.last_stats.skipped and engine.skipped_losses == 1
    assert all(p.grad is None for p in case.model.parameters())  # nothing reached .grad, not even the body
    engine.meta_backward(good)
    assert not engine.last_stats.skipped
    expected = {n: p.grad.clone() for n, p in case.model.named_parameters()}
    engine.meta_backward(case.query(engine.adapt(case.support)) * float("nan"))
    assert engine.skipped_losses == 2
    assert R.relative_error({n: p.grad for n, p in case.model.named_parameters()}, expected) == 0
    reference = frozen_body()
    plain = bo.MetaGradientEngine(reference.model, reference.inner_opt(), 3, bo.Binomial(2))
    plain.meta_backward(reference.query(plain.adapt(reference.support)))
    assert R.relative_error(expected, {n: p.grad for n, p in reference.model.named_parameters()}) < 1e-14
    with pytest.raises(ValueError, match="nan_policy"):
        bo.MetaGradientEngine(case.model, case.inner_opt(), 3, nan_policy="ignore")


def test_non_finite_tasks_are_named_or_skipped():
    xs, ys, xq, yq = image_tasks()
    xq = xq.clone()
    xq[1, 0, 0, 0, 0] = math.inf  # task 1's query loss is not finite
    closure = lambda m, t: F.cross_entropy(m(t[0]), t[1])
    engine, model = bad_engine(estimator=bo.Binomial(1))
    learners = engine.adapt_batch(closure, (xs, ys))
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[1\]"):
        F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()).backward()
    engine, model = bad_engine(estimator=bo.Binomial(1), nan_policy="skip_task")
    out = engine.adapt_batch(closure, (xs, ys))(xq)
    sum(F.cross_entropy(out[b], yq[b]) for b in range(B)).backward()
    assert engine.last_stats.skipped == 1
    got = grads(model)
    for b in (0, 2):
        learner = engine.adapt(lambda m, x=xs[b], y=ys[b]: F.cross_entropy(m(x), y))
        F.cross_entropy(learner(xq[b]), yq[b]).backward()
    assert R.relative_error(got, grads(model)) < 1e-12
    support = xs.clone()
    support[2] = math.nan
    with pytest.raises(FloatingPointError, match=r"step 0 for task\(s\) \[2\]"):  # named by the meta-gradient's read
        F.cross_entropy(engine.adapt_batch(closure, (support, ys))(xq).flatten(0, 1), yq.flatten()).backward()


@pytest.mark.cpu_only  # bitwise equality and the example code hold on the CPU
@pytest.mark.parametrize("estimator", [bo.Binomial(2), bo.Exact()])
def test_meta_gradients_are_bitwise_reproducible_on_cpu(estimator):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
        x, y = torch.randn(5, 1, 6, 6), torch.arange(5)
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, estimator)
        engine.meta_backward(F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(x), y))(x), y))
        runs.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_backward_twice_through_one_adaptation_is_refused_by_autograd():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2)
    loss = case.query(engine.adapt(case.support))
    engine.meta_backward(loss)
    with pytest.raises(RuntimeError, match="second time"):
        engine.meta_backward(loss)


def test_a_closure_that_changed_since_the_inner_loop_is_caught():
    """The classic late-binding bug: one backward for several tasks, lambdas reading the loop variable."""
    model = small_model()
    maml = bo.MAML(model, lr=0.1, estimator=bo.Binomial(2))
    total = 0
    for x_s, y_s, x_q, y_q in tasks(2):
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(lambda m: F.cross_entropy(m(x_s), y_s))
        total = total + F.cross_entropy(learner(x_q), y_q)
    with pytest.raises(RuntimeError, match="not a pure function.*lambda m, x=x_s"):
        total.backward()


def test_a_closure_that_reads_changed_state_is_caught_at_backward():
    engine, _ = bad_engine(estimator=bo.Binomial(1))
    xs, ys, xq, yq = image_tasks()
    temperature = {"value": 1.0}
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]) / temperature["value"], t[1]), (xs, ys))
    temperature["value"] = 2.0  # the replayed support loss is no longer the one the inner loop took
    with pytest.raises(RuntimeError, match=r"not a pure function of \(learner, task\)"):
        F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()).backward()


def closure_over(x, y):
    return lambda m: F.cross_entropy(m(x), y)


@pytest.mark.parametrize("shell", ["engine", "maml"])
def test_adaptations_are_freed_without_the_cycle_collector(shell):
    """A reference cycle through the autograd node would keep every task's data alive."""
    import gc
    import weakref

    case = frozen_body()
    gc.collect()
    gc.disable()
    try:
        support_x = torch.randn(6, 4, dtype=torch.float64)
        alive = weakref.ref(support_x)
        closure = closure_over(support_x, torch.arange(6) % 3)
        del support_x  # from here on only the closure, and what records it, hold the data
        if shell == "engine":
            engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=2, estimator=bo.Binomial(1))
            learner = engine.adapt(closure)
        else:
            learner = bo.MAML(case.model, lr=0.1, estimator=bo.Binomial(1)).clone()
            for _ in range(2):
                learner.adapt(closure)
        del closure
        case.query(learner).backward()
        assert alive() is not None  # still reachable through the learner
        del learner
        assert alive() is None
    finally:
        gc.enable()


def test_initial_parameters_changed_in_place_before_backward_are_refused():
    engine, case = sine_engine(bo.Exact())
    loss = case.query(engine.adapt(case.support))
    with torch.no_grad():
        next(case.model.parameters()).add_(1.0)  # e.g. an optimizer step before the meta-gradient
    with pytest.raises(RuntimeError, match=r"modified in place after the inner loop started.*before changing"):
        loss.backward()


def test_meta_backward_writes_nothing_when_the_meta_gradient_fails():
    """A parameter reached by the query loss alone would get its .grad before the failing node runs under
    loss.backward(); meta_backward differentiates first and accumulates only when everything succeeded."""
    engine, case = sine_engine(bo.Binomial(2))
    temperature = torch.ones((), dtype=torch.float64, requires_grad=True)
    data = {"scale": 1.0}
    learner = engine.adapt(lambda m: data["scale"] * case.support(m))
    loss = temperature * case.query(learner)
    data["scale"] = 2.0  # the replay check fails at backward
    with pytest.raises(RuntimeError, match="not a pure function"):
        engine.meta_backward(loss)
    assert temperature.grad is None and all(p.grad is None for p in case.model.parameters())


def test_a_model_called_by_a_learner_is_freed_with_its_last_reference():
    """The per-model cache of where its parameters sit (learner.call_with) holds the model only weakly."""
    import gc
    import weakref

    model = torch.nn.Linear(4, 3)  # parameters on the model itself
    learner = bo.MAML(model, lr=0.1).clone()
    learner.adapt(lambda m: m(torch.randn(2, 4)).sum())
    alive = weakref.ref(model)
    del model, learner
    gc.collect()
    assert alive() is None
