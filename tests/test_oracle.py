"""The HVP oracle: backends, out-of-memory retries, and torch.compile reusing one graph across tasks."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo
import binom_opt.core.batching as batching_module

import references as R
from cases import adapt_and_backward, generator, mlp_sine

torch_dynamo = pytest.importorskip("torch._dynamo")


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


def test_out_of_memory_in_a_batched_round_retries_with_smaller_chunks(monkeypatch):
    real_vmap = batching_module.vmap

    def vmap_that_fits_one_at_a_time(fn, chunk_size=None, **kwargs):
        batched = real_vmap(fn, chunk_size=chunk_size, **kwargs)

        def call(points, vectors):
            if chunk_size is None or chunk_size > 1:
                raise torch.OutOfMemoryError("injected: out of memory")
            return batched(points, vectors)

        return call

    # memory_budget=None: a round's points vmapped at once ("auto" takes one task's points one by one)
    expected = adapt_and_backward(mlp_sine(), bo.Binomial(2), steps=5, memory_budget=None)[1]
    monkeypatch.setattr(batching_module, "vmap", vmap_that_fits_one_at_a_time)
    engine, got = adapt_and_backward(mlp_sine(), bo.Binomial(2), steps=5, memory_budget=None)
    assert R.relative_error(got, expected) < 1e-14
    assert engine.last_stats.chunk_fallbacks == [2, 1]


def run(case, tasks, **options):
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=4, estimator=bo.Binomial(2), **options)
    for x, y in tasks:
        learner = engine.adapt(lambda m, x=x, y=y: F.mse_loss(m(x), y))
        F.mse_loss(learner(x + 1), y).backward()
    grads = {n: p.grad.clone() for n, p in case.model.named_parameters()}
    case.model.zero_grad(set_to_none=True)
    return grads


def test_compiled_hvps_equal_eager_and_compile_once_for_many_tasks():
    case = mlp_sine()
    gen = generator(0)
    tasks = [(x, torch.sin(x)) for x in (torch.rand(10, 1, generator=gen, dtype=torch.float64) * 6 - 3 for _ in range(3))]
    expected = run(case, tasks)
    torch_dynamo.reset()
    torch_dynamo.utils.counters.clear()
    got = run(case, tasks, compile_hvps=True)
    assert R.relative_error(got, expected) < 1e-12
    # one graph for the batched rounds (3 HVPs each), shared by both rounds of all three tasks, and one
    # for the inner steps after each task's first, shared by all three tasks
    assert torch_dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compiled_task_batched_rounds_equal_eager():
    from binom_opt.functional import meta_gradient_batched

    gen = generator(1)
    x, y = torch.randn(4, 8, 3, generator=gen, dtype=torch.float64), torch.randn(4, 8, generator=gen, dtype=torch.float64)
    loss = lambda p, task: ((torch.tanh(task[0] @ p["w"]) - task[1]) ** 2).mean()
    w = {"w": torch.ones(3, dtype=torch.float64)}
    torch_dynamo.reset()
    torch_dynamo.utils.counters.clear()
    for shift in (0.0, 1.0):  # new data, same shapes: the graph is reused
        tasks = (x + shift, y)
        eager = meta_gradient_batched(loss, loss, w, tasks, steps=4, lr=0.1, estimator=bo.Binomial(2))
        compiled = meta_gradient_batched(loss, loss, w, tasks, steps=4, lr=0.1, estimator=bo.Binomial(2), compile_hvps=True)
        assert torch.allclose(compiled["w"], eager["w"], rtol=1e-12, atol=1e-15)
    # the batched inner step and the batched HVP rounds: one graph each, reused for the new data
    assert torch_dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("estimator", [bo.Binomial(1), bo.Binomial(2), bo.Hybrid(2, 3), bo.Exact()], ids=repr)
def test_one_tasks_replayed_points_run_one_at_a_time_and_give_the_kept_graphs_bits(monkeypatch, estimator):
    """"auto" on one task, above the cap of kept graphs (a large model): each round's points are replayed one at a time
    (never stacked: a round holds its products, one copy of the parameters per step) and give, bit for bit, the
    products of the graphs a small model keeps."""
    from binom_opt.core import recorder
    from binom_opt.core.trajectory import Trajectory

    case = mlp_sine()
    _, kept = adapt_and_backward(case, estimator, steps=5)
    stacked = []
    real_points = Trajectory.points
    monkeypatch.setattr(Trajectory, "points", lambda self, lo, hi: stacked.append((lo, hi)) or real_points(self, lo, hi))
    monkeypatch.setattr(recorder, "AUTO_KEEP_GRAPH_CAP", 1)
    engine, replayed = adapt_and_backward(case, estimator, steps=5)
    assert not stacked and engine.last_stats.hvp_count > 0
    for n in kept:
        assert torch.equal(replayed[n], kept[n]), n
