"""The functional API on dicts of tensors: per task and task-batched (B = 1 and 4) give the same meta-gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import binom_opt as bo
from binom_opt.functional import meta_gradient, meta_gradient_batched

from cases import conv_bn, generator, mlp_sine


def batch_of_tasks(seed=0, B=4):
    gen = generator(seed)
    xs, xq = torch.randn(B, 6, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randn(B, 9, 1, 6, 6, generator=gen, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (B, 6), generator=gen), torch.randint(0, 3, (B, 9), generator=gen)
    return {"support": (xs, ys), "query": (xq, yq)}


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize(
    "estimator", [bo.FirstOrder(), bo.Truncated(2), bo.Binomial(1), bo.Binomial(3), bo.Hybrid(2, 3), bo.Exact()]
)
def test_batched_equals_per_task_loop(estimator, B):
    model = conv_bn().model
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = lambda part: (lambda p, task: F.cross_entropy(functional_call(model, p, (task[part][0],)), task[part][1]))
    tasks = batch_of_tasks(B=B)
    batched = meta_gradient_batched(loss("support"), loss("query"), params, tasks, steps=4, lr=0.1, estimator=estimator)
    for t in range(B):
        task = {part: (x[t], y[t]) for part, (x, y) in tasks.items()}
        one = meta_gradient(
            lambda p: loss("support")(p, task), lambda p: loss("query")(p, task), params, steps=4, lr=0.1, estimator=estimator
        )
        for n in params:
            assert torch.allclose(batched[n][t], one[n], rtol=1e-10, atol=1e-13), (estimator, t, n)


@pytest.mark.parametrize("B", [1, 4])
def test_batched_chunking_and_stats(B):
    model = mlp_sine().model
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = generator(0)
    x = torch.rand(B, 10, 1, generator=gen, dtype=torch.float64) * 10 - 5
    tasks = (x, torch.sin(x))
    loss = lambda p, task: ((functional_call(model, p, (task[0],)) - task[1]) ** 2).mean()
    full, stats = meta_gradient_batched(loss, loss, params, tasks, steps=5, lr=0.01, estimator=bo.Binomial(2), return_stats=True)
    chunked = meta_gradient_batched(loss, loss, params, tasks, steps=5, lr=0.01, estimator=bo.Binomial(2), chunk_size=1)
    assert all(torch.allclose(full[n], chunked[n], rtol=1e-12, atol=0) for n in params)
    assert stats.hvp_count == 8 * B and stats.rounds == 2 and len(stats.inner_losses) == 5


def test_batched_bad_input():
    params = {"w": torch.zeros(3)}
    loss = lambda p, task: (task[0] @ p["w"]).pow(2).mean()
    with pytest.raises(ValueError, match="same leading task dimension"):
        meta_gradient_batched(loss, loss, params, (torch.ones(2, 4, 3), torch.ones(3, 4)), steps=2, lr=0.1)
    with pytest.raises(TypeError, match="tasks must be"):
        meta_gradient_batched(loss, loss, params, "tasks", steps=2, lr=0.1)
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[1\]"):
        bad = torch.ones(2, 4, 3)
        bad[1, 0, 0] = float("nan")
        meta_gradient_batched(loss, loss, params, (bad,), steps=2, lr=0.1)
