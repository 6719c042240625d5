"""MetaGradientEngine as users drive it: autograd composition, stats, BatchNorm, bad input."""

import pytest
import references as R
import torch
import torch.nn.functional as F
from cases import conv_bn, frozen_body, mlp_sine
from torch import nn

import binom_opt as bo

TOL = 1e-10


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


def test_forward_mode_through_mse_loss_gives_a_clear_error_and_auto_avoids_it():
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    closure = lambda m: F.mse_loss(m(x), y)
    for hvp in ("auto", "rev"):
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, estimator=bo.Binomial(1), hvp=hvp)
        engine.meta_backward(F.mse_loss(engine.adapt(closure)(x), y))
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, estimator=bo.Binomial(1), hvp="fwd")
    with pytest.raises(bo.HVPBackendError, match="hvp='rev'"):
        engine.meta_backward(F.mse_loss(engine.adapt(closure)(x), y))


@pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")  # lr 0.2 diverges; exactness holds
def test_batchnorm_with_running_stats_is_transductive_and_leaves_buffers_untouched():
    tracked, untracked = conv_bn(track_running_stats=True), conv_bn(track_running_stats=False)
    untracked.model.load_state_dict(tracked.model.state_dict(), strict=False)
    buffers = {n: b.clone() for n, b in tracked.model.named_buffers()}
    results = []
    for case in (tracked, untracked):
        engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=4, estimator=bo.Binomial(2))
        engine.meta_backward(case.query(engine.adapt(case.support)))
        results.append(grads_of(case.model))
    assert R.relative_error(results[0], results[1]) < TOL
    for name, value in tracked.model.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_learner_is_callable_like_the_model():
    case = frozen_body()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=2, estimator=bo.Exact())
    learner = engine.adapt(case.support)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert learner(x).shape == case.model(x).shape and not torch.allclose(learner(x), case.model(x))
    assert sorted(learner.params) == ["head.bias", "head.weight"] and "Learner" in repr(learner)


# --- bad input: a clear error, raised before anything changes ----------------------------------


def make_engine():
    case = mlp_sine()
    return bo.MetaGradientEngine(case.model, case.inner_opt(), steps=3, estimator=bo.Binomial(1)), case


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


def test_bad_inner_optimizers():
    case = mlp_sine()
    params = list(case.model.parameters())
    with pytest.raises(TypeError, match="Unsupported inner optimizer RMSprop; supported: torch.optim.SGD.*Adam.*AdamW"):
        bo.MetaGradientEngine(case.model, torch.optim.RMSprop(params, lr=0.1), steps=2)
    with pytest.raises(ValueError, match="maximize=True"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD(params, lr=0.1, maximize=True), steps=2)
    with pytest.raises(ValueError, match="amsgrad=True"):
        bo.MetaGradientEngine(case.model, torch.optim.Adam(params, lr=0.1, amsgrad=True), steps=2)
    with pytest.raises(ValueError, match="one learning rate per adapted parameter"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD(params, lr=0.1), steps=2, override={"lr": [0.1]})
    with pytest.raises(ValueError, match="shape"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD(params, lr=0.1), steps=2,
                              override={"lr": [torch.ones(2, 2)] * len(params)})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1), steps=2)
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    model = nn.Linear(2, 2)
    model.extra = frozen
    with pytest.raises(ValueError, match="requires_grad=False"):
        bo.MetaGradientEngine(model, torch.optim.SGD([model.weight, frozen], lr=0.1), steps=2)


@pytest.mark.parametrize(
    "closure, error, message",
    [
        (lambda m: m(torch.ones(4, 1, dtype=torch.float64)), ValueError, r"scalar loss.*shape \(4, 1\)"),
        (lambda m: 3.0, TypeError, "scalar torch.Tensor"),
        (lambda m: torch.tensor(1.0, dtype=torch.float64), ValueError, "does not depend"),
        (lambda m: m(torch.ones(1, 1, dtype=torch.float64)).sum() * float("nan"), FloatingPointError, "inner step 0"),
    ],
)
def test_bad_closures_change_nothing(closure, error, message):
    engine, case = make_engine()
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    with pytest.raises(error, match=message):
        engine.adapt(closure)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in case.model.named_parameters())


def test_outer_loss_without_graph_is_rejected():
    engine, case = make_engine()
    learner = engine.adapt(case.support)
    with torch.no_grad():
        loss = case.query(learner)
    with pytest.raises(ValueError, match="no autograd graph"):
        engine.meta_backward(loss)


def test_divergent_inner_loop_is_an_error_not_a_result():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, torch.optim.SGD(case.model.parameters(), lr=1e200), steps=3)
    with pytest.raises(FloatingPointError, match="inner step"):
        engine.adapt(case.support)


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
