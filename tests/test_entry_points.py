"""Every entry point x every feature, float64: each gives the meta-gradient of the per-task engine loop.

Entry points: ``engine.adapt`` (task by task: the reference, itself checked against the brute
force and against higher in test_exactness.py and test_update_rules.py), ``engine.adapt_batch``,
``bo.MAML``, ``bo.innerloop_ctx``, ``functional.meta_gradient`` (task by task) and
``functional.meta_gradient_batched``; a meta-batch of B = 3 tasks (B = 1 where it says so).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import binom_opt as bo
from binom_opt.functional import meta_gradient, meta_gradient_batched

import references as R
from cases import BodyHead, generator

K, LR, TOL = 3, 0.3, 1e-10
ENTRIES = ["adapt", "adapt_batch", "maml", "innerloop_ctx", "meta_gradient", "meta_gradient_batched"]
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=LR),
    "momentum+nesterov+wd": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.05),
    "dampening": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.5, dampening=0.3),
    "adam+wd": lambda ps: torch.optim.Adam(ps, lr=0.05, eps=1e-3, weight_decay=0.05),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, eps=1e-3, weight_decay=0.1),
    "two-groups": lambda ps: two_groups(list(ps)),
}


def two_groups(params):
    return torch.optim.SGD([{"params": params[:2], "lr": LR}, {"params": params[2:], "lr": 0.1}])


ESTIMATORS = [bo.FirstOrder(), bo.Truncated(2), bo.Binomial(1), bo.Binomial(2, "paper"), bo.Hybrid(1, 2), bo.Exact()]
pytestmark = pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def body_head():
    torch.manual_seed(0)
    return BodyHead().double()


def make_tasks(B=3, features=3, seed=1):
    gen = generator(seed)
    xs, xq = (torch.randn(B, n, features, generator=gen, dtype=torch.float64) for n in (6, 8))
    return xs, (torch.arange(6) % 2).repeat(B, 1), xq, (torch.arange(8) % 2).repeat(B, 1)


def meta_grads(entry, optimizer="sgd", estimator=bo.Exact(), learned=False, model_fn=mlp, adapt="all", tasks=None,
               query_scale=None, **options):
    """The meta-gradient of the summed query losses of a meta-batch through ``entry``, by parameter name
    (and ``lr:<name>`` for learned learning rates)."""
    model = model_fn()
    named = dict(model.named_parameters())
    adapted = {n: p for n, p in named.items() if adapt == "all" or n.startswith(adapt)}
    xs, ys, xq, yq = tasks or make_tasks(features=4 if model_fn is body_head else 3)
    B = len(xs)
    scale = query_scale if query_scale is not None else torch.ones(B, dtype=torch.float64)
    lrs = {n: torch.tensor(LR, dtype=torch.float64, requires_grad=True) for n in adapted} if learned else None
    make_opt = lambda params: OPTIMIZERS[optimizer](params)
    override = {"lr": list(lrs.values())} if learned else None
    closure = lambda m, x, y: F.cross_entropy(m(x), y)
    if entry in ("adapt", "adapt_batch"):
        engine = bo.MetaGradientEngine(model, make_opt(adapted.values()), K, estimator, override=override, **options)
        if entry == "adapt":
            for b in range(B):
                learner = engine.adapt(lambda m, x=xs[b], y=ys[b]: closure(m, x, y))
                (scale[b] * F.cross_entropy(learner(xq[b]), yq[b])).backward()
        else:
            out = engine.adapt_batch(lambda m, t: closure(m, t[0], t[1]), (xs, ys))(xq)
            sum(scale[b] * F.cross_entropy(out[b], yq[b]) for b in range(B)).backward()
    elif entry == "maml":
        step = {"lr": lrs or LR} if optimizer == "sgd" and adapt == "all" else {"inner_opt": make_opt(adapted.values())}
        maml = bo.MAML(model, estimator=estimator, allow_nograd=True, **step, **options)
        for b in range(B):
            learner = maml.clone()
            for _ in range(K):
                learner.adapt(lambda m, x=xs[b], y=ys[b]: closure(m, x, y))
            (scale[b] * F.cross_entropy(learner(xq[b]), yq[b])).backward()
    elif entry == "innerloop_ctx":
        for b in range(B):
            with bo.innerloop_ctx(model, make_opt(adapted.values()), estimator=estimator, override=override, copy_initial_weights=False,
                                  **options) as (fmodel, diffopt):
                for _ in range(K):
                    diffopt.step(lambda m, x=xs[b], y=ys[b]: closure(m, x, y))
                (scale[b] * F.cross_entropy(fmodel(xq[b]), yq[b])).backward()
    else:
        return functional_grads(entry, model, adapted, named, optimizer, estimator, lrs, (xs, ys, xq, yq), scale, options)
    out = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    return {**out, **({f"lr:{n}": t.grad.clone() for n, t in lrs.items()} if learned else {})}


def functional_grads(entry, model, adapted, named, optimizer, estimator, lrs, tasks, scale, options):
    params = {n: p.detach() for n, p in adapted.items()}
    others = {n: p for n, p in named.items() if n not in adapted}  # meta-parameters the losses reach
    meta = {**others, **({f"lr:{n}": t for n, t in lrs.items()} if lrs else {})}
    step = {"lr": lrs or LR} if optimizer == "sgd" else {"inner_opt": OPTIMIZERS[optimizer](list(params.values()))}
    loss = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)
    xs, ys, xq, yq = tasks
    if entry == "meta_gradient_batched":
        grads = meta_gradient_batched(lambda p, t: loss(p, t[0], t[1]), lambda p, t: t[4] * loss(p, t[2], t[3]), params,
                                      (xs, ys, xq, yq, scale), steps=K, estimator=estimator, meta_params=meta, **step, **options)
        return {n: g.sum(0) if n in params else g for n, g in grads.items()}
    total = {}
    for b in range(len(xs)):
        grads = meta_gradient(lambda p: loss(p, xs[b], ys[b]), lambda p: scale[b] * loss(p, xq[b], yq[b]), params,
                              steps=K, estimator=estimator, meta_params=meta, **step, **options)
        total = {n: total.get(n, 0) + g for n, g in grads.items()}
    return total


def assert_equal(got, expected, tol=TOL):
    assert got.keys() == expected.keys()
    assert R.relative_error(got, expected) < tol, R.relative_error(got, expected)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("entry", ENTRIES[1:])
def test_every_entry_point_every_optimizer_every_estimator(entry, optimizer):
    for estimator in ESTIMATORS:
        assert_equal(meta_grads(entry, optimizer, estimator), meta_grads("adapt", optimizer, estimator))


@pytest.mark.parametrize("optimizer", ["sgd", "adam+wd"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_learned_learning_rates(entry, optimizer):
    if optimizer != "sgd" and entry in ("maml", "meta_gradient", "meta_gradient_batched"):
        pytest.skip("learned learning rates go with plain SGD there (lr=tensors); optimizers' own lr is a float")
    for estimator in (bo.Binomial(1), bo.Exact()):
        got = meta_grads(entry, optimizer, estimator, learned=True)
        assert any(n.startswith("lr:") for n in got)
        assert_equal(got, meta_grads("adapt", optimizer, estimator, learned=True))


@pytest.mark.parametrize("entry", ENTRIES[1:])
def test_frozen_body_is_a_meta_parameter_everywhere(entry):
    for optimizer in ("sgd", "adam+wd"):
        for estimator in (bo.Truncated(1), bo.Binomial(2), bo.Exact()):
            got = meta_grads(entry, optimizer, estimator, model_fn=body_head, adapt="head")
            assert {"body.0.weight", "head.weight"} <= got.keys()
            assert_equal(got, meta_grads("adapt", optimizer, estimator, model_fn=body_head, adapt="head"))


@pytest.mark.parametrize("entry", ENTRIES[1:])
def test_implicit_and_reptile_everywhere(entry):
    """iMAML's and Reptile's meta-gradients (references: test_implicit.py) through every entry point, an ANIL body
    included for Implicit."""
    for optimizer in ("sgd", "adam+wd"):
        for estimator in (bo.Implicit(2, 1.0), bo.Reptile()):
            assert_equal(meta_grads(entry, optimizer, estimator), meta_grads("adapt", optimizer, estimator))
        got = meta_grads(entry, optimizer, bo.Implicit(3, 0.5), model_fn=body_head, adapt="head")
        assert {"body.0.weight", "head.weight"} <= got.keys()
        assert_equal(got, meta_grads("adapt", optimizer, bo.Implicit(3, 0.5), model_fn=body_head, adapt="head"))


OPTIONS = [{"chunk_size": 1}, {"chunk_size": 2}, {"memory_budget": "inner_step"}, {"memory_budget": 1},
           {"hvp": "fwd"}, {"checkpoint_every": 2}, {"nan_policy": "skip_task"}, {"bn": "transductive"}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("entry", ENTRIES)
def test_every_option_everywhere_leaves_the_meta_gradient_as_it_is(entry, options):
    for optimizer, estimator in (("sgd", bo.Binomial(2)), ("adam+wd", bo.Hybrid(1, 2)), ("momentum+nesterov+wd", bo.Exact()),
                                 ("sgd", bo.Implicit(2, 1.0))):
        assert_equal(meta_grads(entry, optimizer, estimator, **options), meta_grads("adapt", optimizer, estimator))


@pytest.mark.cpu_only  # bitwise equality and the example code hold on the CPU
@pytest.mark.parametrize("entry", ENTRIES)
def test_checkpointed_trajectories_give_bitwise_the_same_meta_gradient(entry):
    for optimizer, estimator in (("sgd", bo.Exact()), ("adam+wd", bo.Binomial(2))):
        plain = meta_grads(entry, optimizer, estimator)
        for every in (2, 3):
            got = meta_grads(entry, optimizer, estimator, checkpoint_every=every)
            assert all(torch.equal(got[n], plain[n]) for n in plain), (optimizer, every)


@pytest.mark.parametrize("entry", ENTRIES)
def test_skip_task_drops_exactly_the_non_finite_task(entry):
    scale = torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64)  # task 1's query loss is NaN
    got = meta_grads(entry, "adam+wd", bo.Binomial(2), query_scale=scale, nan_policy="skip_task")
    expected = meta_grads("adapt", "adam+wd", bo.Binomial(2), query_scale=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert_equal(got, expected)
    with pytest.raises(FloatingPointError, match="not finite"):
        meta_grads(entry, "adam+wd", bo.Binomial(2), query_scale=scale)


def dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 2)).double()


@pytest.mark.parametrize("entry", ENTRIES)
def test_randomness_same_is_exact_for_the_fixed_masks(entry):
    """Dropout on: at L = K the meta-gradient under randomness='same' equals Exact's, and the estimators
    agree with each other as they do on a deterministic loss (Binomial(K) == Exact)."""
    results = []
    for estimator in (bo.Binomial(K), bo.Exact()):
        torch.manual_seed(5)
        results.append(meta_grads(entry, "sgd", estimator, model_fn=dropout_mlp, randomness="same"))
    assert_equal(results[0], results[1])


def test_randomness_same_in_a_meta_batch_equals_the_unrolled_vmapped_loop():
    """adapt_batch: the tasks draw different masks from one stream, the same at every step and replay."""
    xs, ys, xq, yq = make_tasks()
    model = dropout_mlp()
    theta = dict(model.named_parameters())
    torch.manual_seed(5)
    state = torch.get_rng_state()
    phi = {n: p.unsqueeze(0).expand(3, *p.shape) for n, p in theta.items()}
    support = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)
    for _ in range(K):
        with torch.random.fork_rng():
            torch.set_rng_state(state)
            loss = torch.vmap(support, randomness="different")(phi, xs, ys).sum()
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - LR * g for (n, p), g in zip(phi.items(), grads)}
    torch.manual_seed(9)  # the query draws its own masks, the same in both
    torch.vmap(support, randomness="different")(phi, xq, yq).sum().backward()
    expected = {n: p.grad.clone() for n, p in theta.items()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K, bo.Exact(), randomness="same")
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (xs, ys))
    torch.manual_seed(9)
    out = learners(xq)
    sum(F.cross_entropy(out[b], yq[b]) for b in range(3)).backward()
    assert_equal({n: p.grad for n, p in theta.items()}, expected)


@pytest.mark.parametrize("B", [1, 3])
def test_batched_entry_points_with_one_or_several_tasks(B):
    tasks = make_tasks(B)
    for entry in ("adapt_batch", "meta_gradient_batched"):
        assert_equal(meta_grads(entry, "adam+wd", bo.Binomial(2), tasks=tasks), meta_grads("adapt", "adam+wd", bo.Binomial(2), tasks=tasks))
