"""Fuzzing: random small models, adapted subsets, K, L, C, estimators and inner optimizers.

Invariant: either a clear library error (a ValueError/TypeError naming the problem), or a
finite meta-gradient equal, in float64, to the brute-force expansion of the same estimator.
"""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import binom_opt as bo
from binom_opt.core.update_rules import read_optimizer

import references as R
from cases import generator

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.2),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.7, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, eps=1e-4),
}


def estimators(K):
    return st.one_of(
        st.just(bo.FirstOrder()),
        st.just(bo.Exact()),
        st.integers(0, K + 1).map(bo.Truncated),
        st.integers(0, K + 1).map(bo.Binomial),
        st.integers(0, K).map(lambda L: bo.Binomial(L, "paper")),
        st.integers(0, K + 1).flatmap(lambda C: st.integers(0, C).map(lambda L: bo.Hybrid(L, C))),
    )


problems = st.integers(1, 3).flatmap(
    lambda K: st.fixed_dictionaries(
        {
            "K": st.just(K),
            "estimator": estimators(K),
            "optimizer": st.sampled_from(sorted(OPTIMIZERS)),
            "hidden": st.integers(2, 4),
            "batchnorm": st.sampled_from([None, "untracked", "tracked"]),
            "dropout_eval": st.booleans(),
            "adapt_mask": st.lists(st.booleans(), min_size=4, max_size=4).filter(any),
            "seed": st.integers(0, 1000),
        }
    )
)


def build(problem):
    torch.manual_seed(problem["seed"])
    layers = [nn.Linear(3, problem["hidden"])]
    if problem["batchnorm"]:
        layers.append(nn.BatchNorm1d(problem["hidden"], track_running_stats=problem["batchnorm"] == "tracked"))
    layers += [nn.Tanh(), nn.Dropout(0.3), nn.Linear(problem["hidden"], 2)]
    model = nn.Sequential(*layers).double()
    if problem["dropout_eval"]:
        model[-2].eval()  # dropout off: deterministic; with it on, each step's masks are replayed
    linears = [model[0], model[-1]]
    chosen = [p for layer in linears for p in (layer.weight, layer.bias)]
    adapted = [p for p, keep in zip(chosen, problem["adapt_mask"]) if keep]
    gen = generator(problem["seed"] + 1)
    xs, xq = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen, dtype=torch.float64)
    ys, yq = torch.arange(6) % 2, torch.arange(7) % 2
    return model, adapted, (lambda m: F.cross_entropy(m(xs), ys)), (lambda m: F.cross_entropy(m(xq), yq))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems)
def test_random_problems_give_a_clear_error_or_the_brute_force_meta_gradient(problem):
    model, adapted, support, query = build(problem)
    K, estimator = problem["K"], problem["estimator"]
    try:
        engine = bo.MetaGradientEngine(model, OPTIMIZERS[problem["optimizer"]](adapted), K, estimator)
        engine.meta_backward(query(engine.adapt(support)))
    except (ValueError, TypeError) as error:  # the library's own refusals, each naming the problem
        message = str(error)
        assert "> K=" in message, message  # the only bad input generated: L or C above K
        assert getattr(estimator, "L", 0) > K or getattr(estimator, "C", 0) > K, message
        return
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    adapted_names, rules, hyper, _ = read_optimizer(dict(model.named_parameters()), OPTIMIZERS[problem["optimizer"]](adapted))
    reference, _, support, query = build(problem)
    if not problem["dropout_eval"]:  # active dropout: each step, and the query, with the masks it drew in the loop
        states = R.step_states(support, reference, K + 1)
        support, query = [R.with_random_state(support, s) for s in states[:K]], R.with_random_state(query, states[K])
    expected = R.brute_force_with_rule(reference, adapted_names, rules, hyper, support, query, K, estimator)
    got = {n: grads[n] for n in adapted_names}
    assert R.relative_error(got, expected) < 1e-9, (problem, R.relative_error(got, expected))
