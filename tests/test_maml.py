"""bo.MAML, learn2learn style: the same meta-gradients as the engine, learn2learn's flags, clear errors."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo

import references as R
from cases import small_model, tasks
from l2l_reference import l2l

TOL = 1e-10
STEPS = 3


@pytest.mark.parametrize("estimator", [bo.FirstOrder(), bo.Truncated(2), bo.Binomial(1), bo.Binomial(2), bo.Hybrid(1, 2)])
def test_dropins_equal_the_engine_for_every_estimator(estimator):
    results = []
    for shell in ("engine", "maml", "higher"):
        model = small_model()
        for xs, ys, xq, yq in tasks():
            closure = lambda m, x=xs, y=ys: F.cross_entropy(m(x), y)
            if shell == "engine":
                engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), STEPS, estimator)
                F.cross_entropy(engine.adapt(closure)(xq), yq).backward()
            elif shell == "maml":
                learner = bo.MAML(model, lr=0.1, steps=STEPS, estimator=estimator).clone()
                for _ in range(STEPS):
                    learner.adapt(closure)
                F.cross_entropy(learner(xq), yq).backward()
            else:
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                with bo.innerloop_ctx(model, opt, estimator=estimator, steps=STEPS, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(STEPS):
                        diffopt.step(closure)
                    F.cross_entropy(fmodel(xq), yq).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert R.relative_error(results[1], results[0]) < TOL
    assert R.relative_error(results[2], results[0]) < TOL


def test_maml_first_order_flag_and_stats():
    (xs, ys, xq, yq), = tasks(1)
    grads = []
    for kwargs in ({"first_order": True, "estimator": bo.Exact()}, {"estimator": bo.FirstOrder()}):
        model = small_model()
        maml = bo.MAML(model, lr=0.1, **kwargs)
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
        F.cross_entropy(learner(xq), yq).backward()
        assert maml.last_stats.hvp_count == 0 and learner.steps_taken == STEPS
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert R.relative_error(grads[0], grads[1]) == 0


def test_maml_steps_taken_at_each_forward_define_the_meta_gradient():
    """learn2learn code evaluates the learner between steps; each output differentiates its own prefix."""
    (xs, ys, xq, yq), = tasks(1)
    model = small_model()
    learner = bo.MAML(model, lr=0.1, estimator=bo.Exact()).clone()
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    after_one = F.cross_entropy(learner(xq), yq)
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    after_one.backward()
    via_engine = small_model()
    engine = bo.MetaGradientEngine(via_engine, torch.optim.SGD(via_engine.parameters(), lr=0.1), 1, bo.Exact())
    F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))(xq), yq).backward()
    expected = {n: p.grad for n, p in via_engine.named_parameters()}
    assert R.relative_error({n: p.grad for n, p in model.named_parameters()}, expected) < TOL


def test_adapt_after_backward_needs_a_new_clone():
    (xs, ys, xq, yq), = tasks(1)
    maml = bo.MAML(small_model(), lr=0.1)
    learner = maml.clone()
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    F.cross_entropy(learner(xq), yq).backward()
    with pytest.raises(RuntimeError, match="already computed.*maml.clone"):
        learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    maml.clone().adapt(lambda m: F.cross_entropy(m(xs), ys))  # a new clone is fine


def test_wrong_number_of_adapt_calls_when_steps_is_set():
    (xs, ys, xq, yq), = tasks(1)
    learner = bo.MAML(small_model(), lr=0.1, steps=3, estimator=bo.Binomial(2)).clone()
    for _ in range(2):
        learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    with pytest.raises(ValueError, match="adapted 2 time.*steps=3"):
        F.cross_entropy(learner(xq), yq).backward()


def test_estimator_above_the_number_of_steps_taken():
    (xs, ys, xq, yq), = tasks(1)
    learner = bo.MAML(small_model(), lr=0.1, estimator=bo.Binomial(3)).clone()
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    with pytest.raises(ValueError, match="L=3 > K=1"):
        F.cross_entropy(learner(xq), yq).backward()


def test_frozen_and_unused_parameters_follow_learn2learn_flags():
    (xs, ys, xq, yq), = tasks(1)
    model = small_model()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0.weight'\].*allow_nograd=True"):
        bo.MAML(model, lr=0.1)
    learner = bo.MAML(model, lr=0.1, allow_nograd=True).clone()
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    assert "0.weight" not in learner.params
    F.cross_entropy(learner(xq), yq).backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None

    model = small_model()
    model.unused = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not depend on the adapted parameter.*unused.*allow_unused=True"):
        bo.MAML(model, lr=0.1).clone().adapt(lambda m: F.cross_entropy(m(xs), ys))
    learner = bo.MAML(model, lr=0.1, allow_unused=True, estimator=bo.Exact()).clone()
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    F.cross_entropy(learner(xq), yq).backward()
    assert torch.equal(model.unused.grad, torch.zeros(2, dtype=torch.float64))


# --- learn2learn's names mean what they mean in learn2learn ------------------------------------


def l2l_and_bo(adapt_flags, clone_flags=None):
    """The meta-gradients of the l2l stand-in and of bo.MAML with the same per-clone and per-adapt flags."""
    (xs, ys, xq, yq), = tasks(1)
    results = []
    for library in (l2l.algorithms, bo):
        model = small_model()
        maml = library.MAML(model, lr=0.1)
        learner = maml.clone(**(clone_flags or {}))
        for flags in adapt_flags:
            if library is bo:
                learner.adapt(lambda m: F.cross_entropy(m(xs), ys), **flags)
            else:
                learner.adapt(F.cross_entropy(learner(xs), ys), **flags)
        F.cross_entropy(learner(xq), yq).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return results


def test_first_order_per_adapt_call_drops_that_steps_hessian_as_learn2learn_does():
    for pattern in ([True, False, False], [False, True, False], [False, False, True], [True, True, False]):
        original, ours = l2l_and_bo([{"first_order": f} for f in pattern])
        assert R.relative_error(ours, original) < TOL, pattern
    exact, _ = l2l_and_bo([{}] * 3)
    assert R.relative_error(l2l_and_bo([{"first_order": True}, {}, {}])[0], exact) > 1e-4  # the flag matters


def test_clone_first_order_overrides_the_wrapper():
    original, ours = l2l_and_bo([{}] * 3, clone_flags={"first_order": True})
    assert R.relative_error(ours, original) < TOL
    maml = bo.MAML(small_model(), lr=0.1, first_order=True)
    assert isinstance(maml.clone()._loop.setup.estimator, bo.FirstOrder)
    assert isinstance(maml.clone(first_order=False)._loop.setup.estimator, bo.Exact)


def test_each_clone_reads_the_wrappers_estimator_and_flags_then():
    maml = bo.MAML(small_model(), lr=0.1)
    estimator_of = lambda learner: learner._loop.setup.estimator
    assert estimator_of(maml.clone()) == bo.Exact() and maml.clone()._loop.setup is maml.clone()._loop.setup  # one setup
    maml.estimator = bo.Binomial(1)  # switched between clones: the next clone uses it
    assert estimator_of(maml.clone()) == bo.Binomial(1) and estimator_of(maml.clone(first_order=True)) == bo.FirstOrder()
    maml.allow_unused = True
    assert maml.clone()._loop.setup.allow_unused and not maml.clone(allow_unused=False)._loop.setup.allow_unused


def test_learner_module_is_the_adapted_model_and_parameters_are_the_adapted_ones():
    (xs, ys, xq, yq), = tasks(1)
    model = small_model()
    learner = bo.MAML(model, lr=0.1).clone()
    for _ in range(2):
        learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    adapted = learner.module
    assert adapted is not model and torch.allclose(adapted(xq), learner(xq))
    assert torch.equal(adapted[0].weight, learner.params["0.weight"])  # a submodule runs with the adapted weight
    assert not torch.allclose(adapted[0](xq), model[0](xq))
    parameters = list(learner.parameters())
    assert len(parameters) == len(list(model.parameters())) and all(p.grad_fn is not None for p in parameters)
    F.cross_entropy(adapted(xq), yq).backward()  # the meta-gradient flows through the adapted module too
    expected = small_model()
    engine = bo.MetaGradientEngine(expected, torch.optim.SGD(expected.parameters(), lr=0.1), 2)
    F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))(xq), yq).backward()
    assert R.relative_error({n: p.grad for n, p in model.named_parameters()},
                            {n: p.grad for n, p in expected.named_parameters()}) < TOL


def test_allow_unused_and_allow_nograd_per_adapt_call():
    (xs, ys, _, _), = tasks(1)
    model = small_model()
    model.unused = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    learner = bo.MAML(model, lr=0.1).clone()
    with pytest.raises(ValueError, match=r"does not depend on the adapted parameter\(s\) \['unused'\]"):
        learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys), allow_unused=True)
    assert learner.steps_taken == 1
    model = small_model()
    model[0].bias.requires_grad_(False)
    learner = bo.MAML(model, lr=0.1, allow_nograd=True).clone()
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys), allow_nograd=True)
    with pytest.raises(ValueError, match=r"\['0.bias'\].*allow_nograd=False"):
        learner.adapt(lambda m: F.cross_entropy(m(xs), ys), allow_nograd=False)


def test_a_call_of_the_adapted_model_sets_the_modes_it_took_without_walking_the_model_again():
    """The adapted model's modes are those of the modules it took them from when the adaptation started: a call sets
    them on those modules, with no walk of the model (a cost per call that grows with its modules)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    x = torch.randn(8, 4)
    learner = bo.MAML(model, lr=0.1).clone()
    learner.adapt(lambda m: m(x).pow(2).mean())
    learner.eval()
    walks = []
    real = type(model).modules
    model.modules = lambda: walks.append(1) or real(model)  # an instance attribute: this model's walks only
    try:
        out = learner(x)
    finally:
        del model.modules
    assert walks == [] and torch.equal(out, learner(x))  # dropout off: the same output twice
    assert model.training and model[1].training  # the model's own modes, untouched
