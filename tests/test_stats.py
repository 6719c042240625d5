"""The convergence monitor: diverging binomial series are flagged, healthy ones are not."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import binom_opt as bo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from fewshot.sine import sample_sine_tasks, sine_mlp, squared_error


def quadratic_engine(lr, estimator, steps=5):
    """Linear least squares: the Hessian is constant, 2 X^T X / n, with norm about 2 here."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(50, 3, dtype=torch.float64)
    y = torch.randn(50, 1, dtype=torch.float64)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=lr), steps=steps, estimator=estimator)
    closure = lambda m: squared_error(m(x), y)
    return engine, closure, lambda learner: squared_error(learner(x), 2 * y)


def test_divergence_warns_once_with_the_numbers_and_the_remedies():
    engine, closure, query = quadratic_engine(lr=0.6, estimator=bo.Binomial(3))
    with pytest.warns(bo.ExpansionDivergenceWarning, match=r"order 0\.\.3.*hessian_scale='paper'.*smaller L.*Truncated"):
        engine.meta_backward(query(engine.adapt(closure)))
    assert engine.last_stats.diverging
    growth = [engine.last_stats.g_norm, *engine.last_stats.contributions]
    assert growth == sorted(growth)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bo.ExpansionDivergenceWarning)
        engine.meta_backward(query(engine.adapt(closure)))  # once per engine
    assert engine.last_stats.diverging


def test_converging_series_do_not_warn():
    engine, closure, query = quadratic_engine(lr=0.02, estimator=bo.Binomial(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", bo.ExpansionDivergenceWarning)
        engine.meta_backward(query(engine.adapt(closure)))
    assert not engine.last_stats.diverging


def test_sequential_estimators_never_flag():
    engine, closure, query = quadratic_engine(lr=0.6, estimator=bo.Truncated(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", bo.ExpansionDivergenceWarning)
        engine.meta_backward(query(engine.adapt(closure)))
    assert not engine.last_stats.diverging


@pytest.mark.cpu_only  # bitwise equality and the example code hold on the CPU
@pytest.mark.parametrize("L", [1, 2, 3, 4])
def test_no_warning_on_the_sine_task_at_small_inner_lr(L):
    batch = sample_sine_tasks(10, torch.Generator().manual_seed(0), dtype=torch.float64)
    model = sine_mlp(seed=0, dtype=torch.float64)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.001), steps=5, estimator=bo.Binomial(L))
    with warnings.catch_warnings():
        warnings.simplefilter("error", bo.ExpansionDivergenceWarning)
        for t in range(len(batch)):
            learner = engine.adapt(lambda m: squared_error(m(batch.x_support[t]), batch.y_support[t]))
            engine.meta_backward(squared_error(learner(batch.x_query[t]), batch.y_query[t]))
            assert not engine.last_stats.diverging


def test_stats_norms_are_the_norms_of_the_outer_gradient_and_of_each_rounds_terms():
    """The sums over entries and tasks are taken on the host: they equal the device's norms of the same vectors."""
    from binom_opt.core.estimators import ExpansionPlan
    from binom_opt.core.memory import Chunking
    from binom_opt.core.readback import Readback
    from binom_opt.core.reductions import entry_norms
    from binom_opt.core.stats import add_stats, make_stats

    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.randn(3, 4, 5, generator=gen), "b": torch.randn(3, 5, generator=gen)}  # 3 tasks
    rounds = [torch.rand(3, generator=gen, dtype=torch.float64) * 10 ** -r for r in range(2)]
    rounds[1][2] = 5.0  # task 2 grows from round 1 to round 2
    read = Readback()
    add_stats(read, entry_norms(g.values()), torch.stack(rounds))
    read.add("losses", torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]]))
    stats = make_stats(bo.Binomial(2), ExpansionPlan(2, 0, "binomial", 1.0), read.read(), 3, 2, Chunking(), 0)
    flat = torch.cat([t.flatten(1) for t in g.values()], 1).double()
    assert stats.g_norm == pytest.approx(float(flat.norm()), rel=1e-6)  # per-entry norms in float32, as g
    assert stats.contributions == pytest.approx([float(r.norm()) for r in rounds], rel=1e-12)
    assert stats.inner_losses == pytest.approx([2.0, 0.5]) and stats.hvp_count == 6 and stats.rounds == 2
    per_task = flat.norm(dim=1)
    growing = [b for b in range(3) if rounds[0][b] > per_task[b] or rounds[1][b] > rounds[0][b]]
    assert list(stats.diverging_tasks) == growing and 2 in growing



@pytest.mark.parametrize("estimator", [bo.FirstOrder(), bo.Exact(), bo.Truncated(2), bo.Binomial(2)])
def test_stats_are_made_when_read_unless_a_binomial_warning_may_be_due(monkeypatch, estimator):
    """Only a binomial series can diverge: its stats are made with the meta-gradient, for the warning; the others' are
    made from the host values when ``last_stats`` is first read, equal to what making them at once gives."""
    from binom_opt.core import stats as stats_module

    made = []
    real = stats_module.make_stats
    monkeypatch.setattr(stats_module, "make_stats", lambda *args: made.append(real(*args)) or made[-1])
    model = sine_mlp(seed=0, dtype=torch.float64)
    batch = sample_sine_tasks(1, torch.Generator().manual_seed(0), dtype=torch.float64)
    maml = bo.MAML(model, lr=0.01, estimator=estimator)
    learner = maml.clone()
    for _ in range(3):
        learner.adapt(lambda m: squared_error(m(batch.x_support[0]), batch.y_support[0]))
    query = squared_error(learner(batch.x_query[0]), batch.y_query[0])
    query.backward()
    assert len(made) == (1 if isinstance(estimator, bo.Binomial) else 0)
    first = maml.last_stats
    assert len(made) == 1 and first is made[0] and maml.last_stats is first  # made once
    assert first.steps == 3 and first.inner_losses[0] > 0 and first.g_norm > 0


def test_the_first_order_stats_read_the_norm_of_g_once_and_right():
    """FirstOrder's meta-gradient is g itself: one norm serves the check and the stats, and it is g's."""
    model = sine_mlp(seed=0, dtype=torch.float64)
    batch = sample_sine_tasks(1, torch.Generator().manual_seed(0), dtype=torch.float64)
    maml = bo.MAML(model, lr=0.01, estimator=bo.FirstOrder())
    learner = maml.clone()
    for _ in range(3):
        learner.adapt(lambda m: squared_error(m(batch.x_support[0]), batch.y_support[0]))
    adapted = {n: t.detach().requires_grad_() for n, t in learner.named_parameters()}
    g = torch.autograd.grad(squared_error(torch.func.functional_call(model, adapted, (batch.x_query[0],)), batch.y_query[0]),
                            list(adapted.values()))
    squared_error(learner(batch.x_query[0]), batch.y_query[0]).backward()
    assert maml.last_stats.g_norm == pytest.approx(float(torch.cat([t.flatten() for t in g]).norm()), rel=1e-12)
    assert all(torch.equal(p.grad, t) for p, t in zip(model.parameters(), g))
