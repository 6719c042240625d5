"""The recorded inner loop: bad closures are clear errors at the step they happen, and non-finite steps are named
when their meta-gradient is computed (the one host read of a meta-gradient), before anything changes."""

import sys

import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo

from cases import mlp_sine, sine_engine, small_model, tasks


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
    engine, case = sine_engine()
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    with pytest.raises(error, match=message):
        meta_step(engine, case, closure)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in case.model.named_parameters())


def test_divergent_inner_loop_is_an_error_not_a_result():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, torch.optim.SGD(case.model.parameters(), lr=1e200), steps=3)
    with pytest.raises(FloatingPointError, match="inner step"):
        meta_step(engine, case, case.support)


def meta_step(engine, case, closure):
    """Adapt and take the meta-gradient: a non-finite inner step is reported by the meta-gradient's one host read."""
    engine.meta_backward(case.query(engine.adapt(closure)))


def test_data_of_another_dtype_fails_at_the_first_step_with_context():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2)
    x = torch.randn(5, 1)  # float32 data for a float64 model
    with pytest.raises(RuntimeError) as error:
        engine.adapt(lambda m: (m(x) ** 2).mean())
    if sys.version_info >= (3, 11):
        assert "share one dtype and one device" in "\n".join(error.value.__notes__)
    assert all(p.grad is None for p in case.model.parameters())


def test_empty_support_set_is_a_clear_error():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2)
    x = torch.zeros(0, 1, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="inner loss is nan at inner step 0"):
        meta_step(engine, case, lambda m: ((m(x) - 1) ** 2).mean())


@pytest.mark.parametrize("nan_policy", ["raise", "skip_task"])
def test_a_non_finite_inner_loop_is_named_before_what_it_caused(nan_policy):
    # a meta-parameter beside the initialisation: its gradient is NaN too, but the inner loop is the cause
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2, nan_policy=nan_policy)
    x, scale = torch.zeros(0, 1, dtype=torch.float64), torch.ones((), dtype=torch.float64, requires_grad=True)
    with pytest.raises(FloatingPointError, match="inner loss is nan at inner step 0"):
        meta_step(engine, case, lambda m: ((scale * m(x) - 1) ** 2).mean())
    assert scale.grad is None


def test_non_finite_inner_gradient_is_named_at_its_step():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 3)
    x = torch.zeros(4, 1, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"inner gradient of .* not finite at inner step 0"):
        meta_step(engine, case, lambda m: torch.sqrt(((m(x) - m(x).detach()) ** 2).sum()))


def test_adapt_with_a_loss_tensor_explains_the_closure():
    (xs, ys, _, _), = tasks(1)
    learner = bo.MAML(small_model(), lr=0.1).clone()
    with pytest.raises(TypeError, match="closure.*Hessian-vector products"):
        learner.adapt(F.cross_entropy(learner(xs), ys))
    model = small_model()
    with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (fmodel, diffopt):
        with pytest.raises(TypeError, match="closure"):
            diffopt.step(F.cross_entropy(fmodel(xs), ys))


def test_a_closure_that_ignores_its_learner_is_told_to_use_it():
    """The usual slips when switching: a loss computed before the step, or the model (or fnet) used directly."""
    (xs, ys, _, _), = tasks(1)
    model = small_model()
    spt_loss = F.cross_entropy(model(xs), ys)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    for closure in (lambda m: spt_loss, lambda m: F.cross_entropy(model(xs), ys)):
        with pytest.raises(ValueError, match="compute it from the learner it is given"):
            engine.adapt(closure)
    with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (fnet, diffopt):
        with pytest.raises(ValueError, match="compute it from the learner it is given"):
            diffopt.step(lambda m: F.cross_entropy(fnet(xs), ys))
    assert all(p.grad is None for p in model.parameters())
