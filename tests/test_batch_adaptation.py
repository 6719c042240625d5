"""engine.adapt_batch: the task-batched meta-step equals the per-task loop, chunked equals unchunked."""

import math

import pytest
import references as R
import torch
import torch.nn.functional as F
from cases import BodyHead, conv_bn
from torch.func import functional_call

import binom_opt as bo
from binom_opt.core.memory import activation_bytes, parse_memory_budget

B, K, LR = 3, 4, 0.1
# Some estimators diverge at this step size (the point is equality with the loop, not accuracy).
pytestmark = pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")
ESTIMATORS = [bo.FirstOrder(), bo.Truncated(2), bo.Binomial(1), bo.Binomial(3), bo.Hybrid(2, 3), bo.Exact()]


def image_tasks(seed=0, B=B):
    gen = torch.Generator().manual_seed(seed)
    xs, xq = (torch.randn(B, n, 1, 6, 6, generator=gen, dtype=torch.float64) for n in (6, 9))
    return xs, (torch.arange(6) % 3).repeat(B, 1), xq, (torch.arange(9) % 3).repeat(B, 1)


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def per_task_loop(engine, model, tasks):
    xs, ys, xq, yq = tasks
    for b in range(xs.shape[0]):
        learner = engine.adapt(lambda m, x=xs[b], y=ys[b]: F.cross_entropy(m(x), y))
        (F.cross_entropy(learner(xq[b]), yq[b]) / xs.shape[0]).backward()
    return grads(model)


def batched(engine, model, tasks):
    xs, ys, xq, yq = tasks
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (xs, ys))
    engine.meta_backward(F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()))
    return grads(model)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_batched_meta_step_equals_the_per_task_loop(estimator):
    model = conv_bn().model  # BatchNorm with batch statistics, per task
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K, estimator=estimator)
    tasks = image_tasks()
    expected = per_task_loop(engine, model, tasks)
    got = batched(engine, model, tasks)
    assert got.keys() == expected.keys()
    assert R.relative_error(got, expected) < 1e-12
    assert engine.last_stats.hvp_count == B * estimator_hvps(estimator, K)


def estimator_hvps(estimator, steps):
    plan = estimator.plan(steps)
    if plan.schedule == "sequential":
        return steps - plan.first_active if plan.levels else 0
    return sum(steps - level - max(plan.levels - level, plan.first_active) + 1 for level in range(1, plan.levels + 1))


def test_batched_exact_equals_unrolled_autograd():
    model = conv_bn().model
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K, estimator=bo.Exact())
    xs, ys, xq, yq = tasks = image_tasks()
    got = batched(engine, model, tasks)
    names = [n for n, _ in model.named_parameters()]
    expected = {n: torch.zeros_like(t) for n, t in got.items()}
    for b in range(B):
        one = R.unrolled_autograd(model, names, dict.fromkeys(names, LR), lambda m: F.cross_entropy(m(xs[b]), ys[b]),
                                  lambda m: F.cross_entropy(m(xq[b]), yq[b]) / B, K)
        expected = {n: expected[n] + one[n] for n in expected}
    assert R.relative_error(got, expected) < 1e-10


def body_head_tasks(seed=1):
    gen = torch.Generator().manual_seed(seed)
    xs, xq = (torch.randn(B, n, 4, generator=gen, dtype=torch.float64) for n in (6, 9))
    return xs, (torch.arange(6) % 3).repeat(B, 1), xq, (torch.arange(9) % 3).repeat(B, 1)


@pytest.mark.parametrize("estimator", [bo.FirstOrder(), bo.Binomial(2), bo.Exact()], ids=repr)
def test_frozen_body_run_in_the_closure_gets_its_meta_gradient(estimator):
    torch.manual_seed(0)
    model = BodyHead().double()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=5 * LR), steps=K, estimator=estimator)
    tasks = body_head_tasks()
    expected = per_task_loop(engine, model, tasks)
    got = batched(engine, model, tasks)
    assert {"body.0.weight", "head.weight"} <= got.keys()
    assert R.relative_error(got, expected) < 1e-12


@pytest.mark.parametrize("estimator", [bo.Truncated(1), bo.Binomial(2), bo.Exact()], ids=repr)
def test_features_passed_in_tasks_get_their_meta_gradient(estimator):
    """ANIL's usual form: the body runs once per task before the inner loop, the head adapts."""
    torch.manual_seed(0)
    model = BodyHead().double()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=5 * LR), steps=K, estimator=estimator)
    xs, ys, xq, yq = body_head_tasks()
    head = lambda m, features: F.linear(features, m.params["head.weight"], m.params["head.bias"])
    for b in range(B):
        features = model.body(xs[b])
        learner = engine.adapt(lambda m, f=features, y=ys[b]: F.cross_entropy(head(m, f), y))
        (F.cross_entropy(learner(xq[b]), yq[b]) / B).backward()
    expected = grads(model)
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(head(m, t[0]), t[1]), (model.body(xs), ys))
    F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()).backward()
    got = grads(model)
    assert R.relative_error(got, expected) < 1e-12


@pytest.mark.parametrize("limits", [{"chunk_size": 1}, {"chunk_size": 2}, {"chunk_size": 5}, {"memory_budget": 1}, {"memory_budget": "64KiB"},
     {"memory_budget": "inner_step"}])
def test_chunked_equals_unchunked(limits):
    model = conv_bn().model
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tasks = image_tasks()
    whole = bo.MetaGradientEngine(model, opt, steps=K, estimator=bo.Binomial(2))
    expected = batched(whole, model, tasks)
    assert whole.last_stats.hvps_at_once == (K - 1) * B  # a round's points x tasks at once
    chunked = bo.MetaGradientEngine(model, opt, steps=K, estimator=bo.Binomial(2), **limits)
    got = batched(chunked, model, tasks)
    assert R.relative_error(got, expected) < 1e-13
    stats = chunked.last_stats
    if "chunk_size" in limits:
        assert stats.hvps_at_once == min(limits["chunk_size"], (K - 1) * B)
    else:
        budget = limits["memory_budget"]
        sizes = activation_bytes(lambda p: F.cross_entropy(functional_call(model, p, (tasks[0][0],)), tasks[1][0]),
                                 {n: p.detach() for n, p in model.named_parameters()})
        budget = B * sizes.gradient if budget == "inner_step" else parse_memory_budget(budget)
        assert stats.per_hvp_bytes == sizes.hvp
        assert stats.hvps_at_once == min(max(1, budget // sizes.hvp), (K - 1) * B)


def test_batched_learner_calls_and_indexing():
    model = conv_bn().model
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=2)
    xs, ys, xq, _ = image_tasks()
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (xs, ys))
    assert len(learners) == B and learners(xq).shape == (B, 9, 3)
    assert torch.allclose(learners[1](xq[1]), learners(xq)[1])
    with pytest.raises(ValueError, match="leading task dimension of 3"):
        learners(xq[:2])


def bad_engine(**options):
    model = conv_bn().model
    opt = options.pop("opt", None) or torch.optim.SGD(model.parameters(), lr=LR)
    return bo.MetaGradientEngine(model, opt, steps=2, **options), model


def test_bad_batched_input_is_refused_before_anything_runs():
    xs, ys, *_ = image_tasks()
    closure = lambda m, t: F.cross_entropy(m(t[0]), t[1])
    engine, model = bad_engine()
    with pytest.raises(ValueError, match="same leading task dimension"):
        engine.adapt_batch(closure, (xs, ys[:2]))
    with pytest.raises(TypeError, match="tasks must be"):
        engine.adapt_batch(closure, "tasks")
    with pytest.raises(TypeError, match="Pass a closure"):
        engine.adapt_batch(F.cross_entropy(model(xs[0]), ys[0]), (xs, ys))
    with pytest.raises(ValueError, match="scalar"):
        engine.adapt_batch(lambda m, t: m(t[0]), (xs, ys))


def test_captured_differentiable_tensors_get_their_meta_gradient():
    """A tensor the closure captures (neither a model parameter nor in tasks) is a meta-parameter too."""
    scale = torch.full((), 1.5, dtype=torch.float64, requires_grad=True)
    xs, ys, xq, yq = image_tasks()
    results = []
    for batched_call in (False, True):
        engine, model = bad_engine(estimator=bo.Binomial(1))
        if batched_call:
            learners = engine.adapt_batch(lambda m, t: F.cross_entropy(scale * m(t[0]), t[1]), (xs, ys))
            F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()).backward()
        else:
            for b in range(B):
                learner = engine.adapt(lambda m, x=xs[b], y=ys[b]: F.cross_entropy(scale * m(x), y))
                (F.cross_entropy(learner(xq[b]), yq[b]) / B).backward()
        results.append({**grads(model), "scale": scale.grad.clone()})
        scale.grad = None
    assert R.relative_error(results[1], results[0]) < 1e-12 and float(results[0]["scale"].abs()) > 0


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
    with pytest.raises(FloatingPointError, match=r"step 0 for task\(s\) \[2\]"):
        engine.adapt_batch(closure, (support, ys))


def test_a_closure_that_reads_changed_state_is_caught_at_backward():
    engine, _ = bad_engine(estimator=bo.Binomial(1))
    xs, ys, xq, yq = image_tasks()
    temperature = {"value": 1.0}
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]) / temperature["value"], t[1]), (xs, ys))
    temperature["value"] = 2.0  # the replayed support loss is no longer the one the inner loop took
    with pytest.raises(RuntimeError, match=r"not a pure function of \(learner, task\)"):
        F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()).backward()


def test_dropout_needs_a_randomness_choice_and_runs_with_different():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    xs, ys, xq, yq = body_head_tasks()
    closure = lambda m, t: F.cross_entropy(m(t[0]), t[1])
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K)
    with pytest.raises(RuntimeError, match="randomness='same' or 'different'"):
        engine.adapt_batch(closure, (xs, ys))
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K, randomness="different")
    learners = engine.adapt_batch(closure, (xs, ys))
    F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
