"""The learn2learn-, higher- and torch.func-style drop-ins, and README's two-line diffs run for real."""

import re
from pathlib import Path

import higher
import pytest
import references as R
import torch
import torch.nn.functional as F
from l2l_reference import l2l
from torch import nn
from torch.func import functional_call

import binom_opt as bo

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TOL = 1e-10
STEPS = 3


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def tasks(count=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        xs, xq = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(9, 4, generator=gen, dtype=torch.float64)
        out.append((xs, torch.arange(6) % 3, xq, torch.arange(9) % 3))
    return out


def diff_sides(block):
    before, after = [], []
    for line in block.splitlines():
        marker, code = line[:1], line[1:]
        if marker in (" ", "-"):
            before.append(code)
        if marker in (" ", "+"):
            after.append(code)
    return "\n".join(before), "\n".join(after)


def run_snippet(code):
    """Run a README snippet on a fresh model and return the gradients it produced."""
    model = small_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    inner_loss = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)
    namespace = dict(
        torch=torch, F=F, bo=bo, l2l=l2l, higher=higher, model=model, tasks=tasks(), steps=STEPS, lr=0.1,
        inner_opt=torch.optim.SGD(model.parameters(), lr=0.1), params=params, inner_loss=inner_loss,
        meta_grads=[torch.zeros_like(p) for p in params.values()],
    )
    exec(compile(code, "README.md", "exec"), namespace)
    if "task_loss" in namespace:
        return dict(zip(params, namespace["meta_grads"]))
    return {n: p.grad.clone() for n, p in model.named_parameters()}


DIFFS = re.findall(r"```diff\n(.*?)```", README, flags=re.S)


def test_readme_has_the_three_switching_diffs():
    assert len(DIFFS) == 3
    for block in DIFFS:
        removed = sum(line.startswith("-") for line in block.splitlines())
        added = sum(line.startswith("+") for line in block.splitlines())
        assert 1 <= removed == added <= 2


@pytest.mark.parametrize("index", range(3), ids=["learn2learn", "higher", "torch.func"])
def test_two_line_switch_gives_the_original_meta_gradient(index):
    before, after = diff_sides(DIFFS[index])
    original, switched = run_snippet(before), run_snippet(after)
    assert R.relative_error(switched, original) < TOL


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
                with bo.innerloop_ctx(model, opt, estimator=estimator, steps=STEPS) as (fmodel, diffopt):
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


# --- bad input -------------------------------------------------------------------------------


def test_adapt_with_a_loss_tensor_explains_the_closure():
    (xs, ys, _, _), = tasks(1)
    learner = bo.MAML(small_model(), lr=0.1).clone()
    with pytest.raises(TypeError, match="closure.*Hessian-vector products"):
        learner.adapt(F.cross_entropy(learner(xs), ys))
    model = small_model()
    with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        with pytest.raises(TypeError, match="closure"):
            diffopt.step(F.cross_entropy(fmodel(xs), ys))


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


def test_higher_copy_initial_weights_true_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="copy_initial_weights=True.*no meta-gradient"):
        with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=True):
            pass


def test_higher_track_higher_grads_false_is_plain_evaluation():
    (xs, ys, xq, _), = tasks(1)
    model = small_model()
    with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(lambda m: F.cross_entropy(m(xs), ys))
        out = fmodel(xq)
    assert not out.requires_grad  # every parameter adapted and detached: no meta-gradient
    with torch.no_grad():
        assert not torch.allclose(out, model(xq))  # but the step was taken


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


def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def test_dropout_in_the_support_loss_is_a_clear_error_by_default():
    (xs, ys, xq, yq), = tasks(1)
    model = dropout_model()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, bo.Binomial(1))
    learner = engine.adapt(lambda m: F.cross_entropy(m(xs), ys))
    with pytest.raises(RuntimeError, match="random numbers.*randomness='same' or 'different'|draws random numbers"):
        F.cross_entropy(learner(xq), yq).backward()


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_randomness_is_forwarded_to_vmap(randomness):
    (xs, ys, xq, yq), = tasks(1)
    model = dropout_model()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, bo.Binomial(1), randomness=randomness)
    F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))(xq), yq).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="randomness must be one of"):
        bo.MAML(model, lr=0.1, randomness="fresh")


def test_randomness_same_replays_the_dropout_masks_exactly_like_higher_with_fixed_masks():
    """randomness='same': one random stream per task, so at L=K the meta-gradient is exact."""
    (xs, ys, xq, yq), = tasks(1)
    results = []
    for use_higher in (True, False):
        model = dropout_model()
        torch.manual_seed(5)
        if use_higher:
            state = torch.get_rng_state()

            def masked(f, x):
                with torch.random.fork_rng():
                    torch.set_rng_state(state)
                    return f(x)

            with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (f, opt):
                for _ in range(STEPS):
                    opt.step(F.cross_entropy(masked(f, xs), ys))
                F.cross_entropy(f(xq), yq).backward()
        else:
            engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), STEPS, bo.Binomial(STEPS), randomness="same")
            F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))(xq), yq).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert R.relative_error(results[1], results[0]) < TOL
