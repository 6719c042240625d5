"""MetaGradientEngine as users drive it: adapt and adapt_batch (B = 1 and 3), autograd composition, stats, bad input."""


import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import binom_opt as bo
from binom_opt.core.memory import activation_bytes, parse_memory_budget

import references as R
from cases import BodyHead, body_head_tasks, conv_bn, frozen_body, grads, image_tasks, mlp_sine, sine_engine

TOL = 1e-10
B, K, LR = 3, 4, 0.1
ESTIMATORS = [bo.FirstOrder(), bo.Truncated(2), bo.Binomial(1), bo.Binomial(3), bo.Hybrid(2, 3), bo.Exact()]

# Some estimators diverge at these step sizes (the point is equality, not accuracy).
pytestmark = pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_meta_backward_equals_loss_backward():
    case = frozen_body()
    results = []
    for use_engine_call in (True, False):
        case.model.zero_grad(set_to_none=True)
        engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=4, estimator=bo.Binomial(2))
        loss = case.query(engine.adapt(case.support))
        engine.meta_backward(loss) if use_engine_call else loss.backward()
        results.append(grads_of(case.model))
    assert R.relative_error(results[0], results[1]) == 0.0


def test_tasks_accumulate_and_compose_with_other_loss_terms():
    first, second = frozen_body(seed=0), frozen_body(seed=1)
    second.model.load_state_dict(first.model.state_dict())
    model = first.model
    engine = bo.MetaGradientEngine(model, first.inner_opt(), steps=3, estimator=bo.Hybrid(1, 2))
    per_task = []
    for case in (first, second):
        model.zero_grad(set_to_none=True)
        case.query(engine.adapt(case.support)).backward()
        per_task.append(grads_of(model))
    model.zero_grad(set_to_none=True)
    penalty = lambda: 0.1 * sum((p**2).sum() for p in model.parameters())
    total = sum(case.query(engine.adapt(case.support)) for case in (first, second)) + penalty()
    engine.meta_backward(total)
    expected = {n: per_task[0][n] + per_task[1][n] + 0.2 * p.detach() for n, p in model.named_parameters()}
    assert R.relative_error(grads_of(model), expected) < TOL


@pytest.mark.parametrize(
    "estimator, hvps, rounds",
    [(bo.FirstOrder(), 0, 0), (bo.Truncated(2), 2, 2), (bo.Binomial(2), 8, 2), (bo.Hybrid(1, 3), 3, 1), (bo.Exact(), 5, 5)],
)
def test_last_stats_count_the_work(estimator, hvps, rounds):
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=5, estimator=estimator)
    engine.meta_backward(case.query(engine.adapt(case.support)))
    stats = engine.last_stats
    assert (stats.hvp_count, stats.rounds, stats.steps, stats.estimator) == (hvps, rounds, 5, estimator)
    assert len(stats.contributions) == rounds and len(stats.inner_losses) == 5
    assert stats.inner_losses[-1] < stats.inner_losses[0]


def test_learner_is_callable_like_the_model():
    case = frozen_body()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=2, estimator=bo.Exact())
    learner = engine.adapt(case.support)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert learner(x).shape == case.model(x).shape and not torch.allclose(learner(x), case.model(x))
    assert sorted(learner.params) == ["head.bias", "head.weight"] and "Learner" in repr(learner)


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


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_batched_meta_step_equals_the_per_task_loop(estimator, B):
    model = conv_bn().model  # BatchNorm with batch statistics, per task
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K, estimator=estimator)
    tasks = image_tasks(B=B)
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


@pytest.mark.parametrize("B", [1, 3])
def test_batched_exact_equals_unrolled_autograd(B):
    model = conv_bn().model
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K, estimator=bo.Exact())
    xs, ys, xq, yq = tasks = image_tasks(B=B)
    got = batched(engine, model, tasks)
    names = [n for n, _ in model.named_parameters()]
    expected = {n: torch.zeros_like(t) for n, t in got.items()}
    for b in range(B):
        one = R.unrolled_autograd(model, names, dict.fromkeys(names, LR), lambda m: F.cross_entropy(m(xs[b]), ys[b]),
                                  lambda m: F.cross_entropy(m(xq[b]), yq[b]) / B, K)
        expected = {n: expected[n] + one[n] for n in expected}
    assert R.relative_error(got, expected) < 1e-10


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("estimator", [bo.FirstOrder(), bo.Binomial(2), bo.Exact()], ids=repr)
def test_frozen_body_run_in_the_closure_gets_its_meta_gradient(estimator, B):
    torch.manual_seed(0)
    model = BodyHead().double()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=5 * LR), steps=K, estimator=estimator)
    tasks = body_head_tasks(B=B)
    expected = per_task_loop(engine, model, tasks)
    got = batched(engine, model, tasks)
    assert {"body.0.weight", "head.weight"} <= got.keys()
    assert R.relative_error(got, expected) < 1e-12


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("estimator", [bo.Truncated(1), bo.Binomial(2), bo.Exact()], ids=repr)
def test_features_passed_in_tasks_get_their_meta_gradient(estimator, B):
    """ANIL's usual form: the body runs once per task before the inner loop, the head adapts."""
    torch.manual_seed(0)
    model = BodyHead().double()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=5 * LR), steps=K, estimator=estimator)
    xs, ys, xq, yq = body_head_tasks(B=B)
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
    whole = bo.MetaGradientEngine(model, opt, steps=K, estimator=bo.Binomial(2), memory_budget=None)  # all at once
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


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"estimator": bo.Binomial(4)}, ValueError, r"L=4 > K=3"),
        ({"estimator": bo.Hybrid(1, 5)}, ValueError, r"C=5 > K=3"),
        ({"steps": 0}, ValueError, "steps"),
        ({"estimator": "binomial"}, TypeError, "estimator must be"),
        ({"hvp": "forward"}, ValueError, "hvp must be"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"bn": "running"}, ValueError, "bn must be"),
    ],
)
def test_bad_engine_options(options, error, message):
    case = mlp_sine()
    with pytest.raises(error, match=message):
        bo.MetaGradientEngine(case.model, case.inner_opt(), **{"steps": 3, "estimator": bo.Binomial(1), **options})


def test_outer_loss_without_graph_is_rejected():
    engine, case = sine_engine()
    learner = engine.adapt(case.support)
    with torch.no_grad():
        loss = case.query(learner)
    with pytest.raises(ValueError, match="no autograd graph"):
        engine.meta_backward(loss)


def test_outer_loss_that_ignores_the_learner_is_refused():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2)
    engine.adapt(case.support)
    with pytest.raises(ValueError, match="does not depend on an adapted learner"):
        engine.meta_backward(case.query(case.model))
    assert all(p.grad is None for p in case.model.parameters())
