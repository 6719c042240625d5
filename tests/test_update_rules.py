"""Inner optimizers with state and learned learning rates, against higher and the generalised brute force."""


import functools

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import binom_opt as bo
from binom_opt.core.update_rules import read_optimizer

import references as R
from cases import frozen_body, generator, mlp_sine

TOL = 1e-10
K = 3


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def data(seed=1):
    gen = generator(seed)
    xs, xq = (torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (6, 8))
    return xs, torch.arange(6) % 2, xq, torch.arange(8) % 2


OPTIMIZERS = {
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
    "nesterov+wd": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.05),
    "dampening+wd": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.5, dampening=0.3, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.9), eps=0.0),
    "adam+wd": lambda ps: torch.optim.Adam(ps, lr=0.05, eps=0.0, weight_decay=0.05),
}


def engine_grads(model, opt, estimator, xs, ys, xq, yq, steps=K, **kwargs):
    engine = bo.MetaGradientEngine(model, opt, steps, estimator, **kwargs)
    F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))(xq), yq).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def higher_grads(model, opt, xs, ys, xq, yq, steps=K, **kwargs):
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, **kwargs) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.cross_entropy(fmodel(xs), ys))
        F.cross_entropy(fmodel(xq), yq).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_full_order_equals_higher(name):
    xs, ys, xq, yq = data()
    reference_model = mlp()
    reference = higher_grads(reference_model, OPTIMIZERS[name](reference_model.parameters()), xs, ys, xq, yq)
    for estimator in (bo.Exact(), bo.Binomial(K), bo.Truncated(K)):
        model = mlp()
        got = engine_grads(model, OPTIMIZERS[name](model.parameters()), estimator, xs, ys, xq, yq)
        assert R.relative_error(got, reference) < TOL, (name, estimator)


@functools.cache
def brute_force(name, estimator):
    model = mlp()
    xs, ys, xq, yq = data()
    adapted, rules, hyper, _ = read_optimizer(dict(model.named_parameters()), OPTIMIZERS[name](model.parameters()))
    support = lambda m: F.cross_entropy(m(xs), ys)
    query = lambda m: F.cross_entropy(m(xq), yq)
    return R.brute_force_with_rule(model, adapted, rules, hyper, support, query, K, estimator)


@pytest.mark.parametrize("name", ["momentum", "adam+wd"])
def test_every_estimator_equals_the_generalised_brute_force(name):
    xs, ys, xq, yq = data()
    estimators = [bo.FirstOrder(), bo.Binomial(1, "paper")] + [
        e for L in range(K + 1) for e in (bo.Binomial(L), bo.Truncated(L), *(bo.Hybrid(L, C) for C in range(L, K + 1)))
    ]
    for estimator in estimators:
        model = mlp()
        got = engine_grads(model, OPTIMIZERS[name](model.parameters()), estimator, xs, ys, xq, yq)
        assert R.relative_error(got, brute_force(name, estimator)) < TOL, (name, estimator)


def torch_adam_unrolled(model, lr, betas, eps, weight_decay, decoupled, xs, ys, xq, yq):
    """torch.optim.Adam / AdamW's documented update, unrolled with create_graph (independent reference)."""
    params = dict(model.named_parameters())
    phi, m, v = dict(params), {n: 0 * p for n, p in params.items()}, {n: 0 * p for n, p in params.items()}
    b1, b2 = betas
    for t in range(1, K + 1):
        grads = torch.autograd.grad(F.cross_entropy(functional_call(model, phi, (xs,)), ys), list(phi.values()), create_graph=True)
        new = {}
        for (n, p), g in zip(phi.items(), grads):
            if decoupled:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            denom = v[n].sqrt() / (1 - b2**t) ** 0.5 + eps
            new[n] = p - lr / (1 - b1**t) * m[n] / denom
        phi = new
    F.cross_entropy(functional_call(model, phi, (xq,)), yq).backward()
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_with_eps_matches_torch_update_unrolled(kind):
    xs, ys, xq, yq = data()
    options = dict(lr=0.05, betas=(0.85, 0.95), eps=1e-3, weight_decay=0.1)
    reference = torch_adam_unrolled(mlp(), decoupled=kind is torch.optim.AdamW, xs=xs, ys=ys, xq=xq, yq=yq, **options)
    model = mlp()
    got = engine_grads(model, kind(model.parameters(), **options), bo.Exact(), xs, ys, xq, yq)
    assert R.relative_error(got, reference) < TOL


def test_meta_sgd_learned_learning_rates_equal_higher():
    xs, ys, xq, yq = data()
    results = []
    for use_higher in (True, False):
        model = mlp()
        lrs = [torch.full_like(p, 0.2).requires_grad_(True) for p in model.parameters()]
        with torch.no_grad():
            for i, lr in enumerate(lrs):
                lr.mul_(1 + 0.1 * i)
        opt = torch.optim.SGD([{"params": [p]} for p in model.parameters()], lr=0.2)
        if use_higher:
            grads = higher_grads(model, opt, xs, ys, xq, yq, override={"lr": lrs})
        else:
            grads = engine_grads(model, opt, bo.Exact(), xs, ys, xq, yq, override={"lr": lrs})
        grads.update({f"lr{i}": lr.grad.clone() for i, lr in enumerate(lrs)})
        results.append(grads)
    assert R.relative_error(results[1], results[0]) < TOL


def test_meta_sgd_scalar_learning_rate_tensor_in_the_optimizer_group():
    xs, ys, xq, yq = data()
    results = []
    for use_higher in (True, False):
        model = mlp()
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        kwargs = {"override": {"lr": [lr]}}  # higher's form: one value for every parameter group
        grads = (higher_grads if use_higher else lambda *a, **k: engine_grads(a[0], a[1], bo.Binomial(K), *a[2:], **k))(
            model, opt, xs, ys, xq, yq, **kwargs
        )
        grads["lr"] = lr.grad.clone()
        results.append(grads)
    assert R.relative_error(results[1], results[0]) < TOL


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_anil_body_with_stateful_inner_optimizer_equals_higher(name):
    case = frozen_body()
    head = [p for n, p in case.model.named_parameters() if n.startswith("head")]
    reference_model = frozen_body().model
    ref_head = [p for n, p in reference_model.named_parameters() if n.startswith("head")]
    with higher.innerloop_ctx(reference_model, OPTIMIZERS[name](ref_head), copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(K):
            diffopt.step(case.support(fmodel))
        case.query(fmodel).backward()
    expected = {n: p.grad for n, p in reference_model.named_parameters()}
    engine = bo.MetaGradientEngine(case.model, OPTIMIZERS[name](head), K, bo.Exact())
    case.query(engine.adapt(case.support)).backward()
    got = {n: p.grad for n, p in case.model.named_parameters()}
    assert R.relative_error(got, expected) < TOL


def test_adam_through_a_parameter_whose_gradient_is_always_zero():
    """Weights that only ever see a zero input feature get exact-zero gradients, so Adam's second
    moment stays 0 there; the meta-gradient must not be NaN (sqrt's slope at 0) and must equal
    that of the same network without that input feature."""
    gen = generator(1)
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.arange(6) % 2
    x[:, 0] = 0.0

    def meta_gradient(features):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        if features == 2:  # the same network without the always-zero input feature
            first = torch.nn.Linear(2, 4).double()
            with torch.no_grad():
                first.weight.copy_(model[0].weight[:, 1:])
                first.bias.copy_(model[0].bias)
            model[0] = first
        data = x[:, 3 - features:]
        engine = bo.MetaGradientEngine(model, torch.optim.Adam(model.parameters(), lr=0.05), 2, bo.Exact())
        F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(data), y))(data), y).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    full, reduced = meta_gradient(3), meta_gradient(2)
    assert torch.equal(full["0.weight"][:, 0], torch.zeros(4, dtype=torch.float64))
    full["0.weight"] = full["0.weight"][:, 1:]
    assert R.relative_error(full, reduced) < 1e-12


def test_complex_or_integer_parameters_cannot_adapt():
    model = nn.Linear(2, 2)
    model.z = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="dtype torch.complex64.*real floating-point"):
        bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    with pytest.raises(RuntimeError):  # torch itself refuses integer tensors that require grad
        nn.Parameter(torch.zeros(2, dtype=torch.int64))


def test_bad_inner_optimizers():
    case = mlp_sine()
    params = list(case.model.parameters())
    with pytest.raises(TypeError, match="Unsupported inner optimizer RMSprop; supported: torch.optim.SGD.*Adam.*AdamW"):
        bo.MetaGradientEngine(case.model, torch.optim.RMSprop(params, lr=0.1), steps=2)
    with pytest.raises(ValueError, match="maximize=True"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD(params, lr=0.1, maximize=True), steps=2)
    with pytest.raises(ValueError, match="amsgrad=True"):
        bo.MetaGradientEngine(case.model, torch.optim.Adam(params, lr=0.1, amsgrad=True), steps=2)
    with pytest.raises(ValueError, match=r"one per parameter group \(1\) or one per adapted parameter \(6\), got 3"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD(params, lr=0.1), steps=2, override={"lr": [0.1] * 3})
    with pytest.raises(ValueError, match="override supports only 'lr'"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD(params, lr=0.1), steps=2, override={"momentum": [0.9]})
    with pytest.raises(ValueError, match="shape"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD(params, lr=0.1), steps=2,
                              override={"lr": [torch.ones(2, 2)] * len(params)})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        bo.MetaGradientEngine(case.model, torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1), steps=2)
    model = nn.Linear(2, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="inner_opt holds no parameters that require grad"):
        bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
