"""Sine-wave regression tasks (Finn et al., 2017) and the meta-gradient error study on them.

Tasks: ``y = A sin(x + phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``.
The model is the paper's 1-40-40-1 ReLU MLP. All randomness comes from explicit generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.func import functional_call

from binom_opt.functional import meta_gradients

__all__ = [
    "SineBatch", "sample_sine_tasks", "sine_mlp", "squared_error", "meta_gradient_errors",
    "meta_gradient_errors_per_batch", "mean_errors", "mean_meta_gradient_errors",
]


@dataclass
class SineBatch:
    """A batch of tasks: support and query sets, each ``[tasks, points, 1]``."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    def __len__(self) -> int:
        return self.x_support.shape[0]


def sample_sine_tasks(
    tasks: int, generator: torch.Generator, shots: int = 10, queries: int = 10, dtype=torch.float32
) -> SineBatch:
    """Draw ``tasks`` sine tasks with ``shots`` support and ``queries`` query points each.

    Example:
        >>> batch = sample_sine_tasks(4, torch.Generator().manual_seed(0))
        >>> tuple(batch.x_support.shape), len(batch)
        ((4, 10, 1), 4)
    """
    u = lambda *shape: torch.rand(*shape, generator=generator, dtype=dtype)
    amplitude = 0.1 + 4.9 * u(tasks, 1, 1)
    phase = torch.pi * u(tasks, 1, 1)
    xs, xq = 10 * u(tasks, shots, 1) - 5, 10 * u(tasks, queries, 1) - 5
    wave = lambda x: amplitude * torch.sin(x + phase)
    return SineBatch(xs, wave(xs), xq, wave(xq))


def sine_mlp(hidden: int = 40, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """The 1-hidden-hidden-1 ReLU regressor of the MAML paper, with a seeded initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)).to(dtype)


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error written out (forward-mode AD through ``F.mse_loss`` fails in torch 2.13)."""
    return ((prediction - target) ** 2).mean()


def meta_gradient_errors(
    model: nn.Module,
    batch: SineBatch,
    estimators: Sequence,
    reference,
    *,
    steps: int,
    lr: float,
) -> Dict[object, float]:
    """Relative error of each estimator's meta-batch-mean meta-gradient against ``reference``'s.

    All estimators share each task's inner loop. Returns ``{estimator: ||mean_hat - mean_ref|| / ||mean_ref||}``.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    totals: Dict[object, List[torch.Tensor]] = {}
    for t in range(len(batch)):
        loss = lambda x, y: (lambda p: squared_error(functional_call(model, p, (x,)), y))
        results = meta_gradients(
            loss(batch.x_support[t], batch.y_support[t]),
            loss(batch.x_query[t], batch.y_query[t]),
            params,
            steps=steps,
            lr=lr,
            estimators=[reference, *estimators],
        )
        for estimator, (grad, _) in results.items():
            flat = torch.cat([g.reshape(-1) for g in grad.values()])
            totals[estimator] = totals.get(estimator, 0) + flat / len(batch)
    exact = totals[reference]
    return {e: float((totals[e] - exact).norm() / exact.norm()) for e in estimators}


def meta_gradient_errors_per_batch(
    estimators: Sequence,
    *,
    lr: float,
    steps: int = 5,
    batches: int = 8,
    tasks: int = 10,
    seed: int = 0,
    hidden: int = 40,
    progress=None,
) -> Dict[object, List[float]]:
    """The paper's Figure 3 protocol: the relative error of each of ``batches`` meta-batches.

    Each meta-batch draws ``tasks`` sine tasks and a fresh random initialisation (seeded by
    ``seed`` and the batch index); errors are against ``Exact()`` in float64. Returns
    ``{estimator: [error of batch 0, error of batch 1, ...]}`` (Figure 3a plots these).
    """
    from binom_opt import Exact

    generator = torch.Generator().manual_seed(seed)
    errors: Dict[object, List[float]] = {e: [] for e in estimators}
    for b in (progress or (lambda it: it))(range(batches)):
        model = sine_mlp(hidden=hidden, seed=seed * 100_003 + b, dtype=torch.float64)
        batch = sample_sine_tasks(tasks, generator, dtype=torch.float64)
        for e, err in meta_gradient_errors(model, batch, estimators, Exact(), steps=steps, lr=lr).items():
            errors[e].append(err)
    return errors


def mean_errors(per_batch: Dict[object, List[float]]) -> Dict[object, float]:
    """The mean over meta-batches of :func:`meta_gradient_errors_per_batch` (Figure 3b)."""
    return {e: sum(err / len(errs) for err in errs) for e, errs in per_batch.items()}


def mean_meta_gradient_errors(estimators: Sequence, **kwargs) -> Dict[object, float]:
    """Mean over ``batches`` meta-batches of the relative error (arguments as :func:`meta_gradient_errors_per_batch`)."""
    return mean_errors(meta_gradient_errors_per_batch(estimators, **kwargs))
