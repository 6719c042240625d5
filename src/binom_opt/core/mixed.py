"""Meta-gradients of the meta-parameters other than the initial point (docs/design.md, "Other meta-parameters").

A tensor ``c`` the support loss reaches gets ``sum_k d/dc <grad_phi l_k(phi_k, c), s B_k^T lambda_{k+1}>``
with the adjoints one Hessian factor lower; a learned learning rate gets ``sum_k (d step_k / d lr)^T
lambda_{k+1}`` at the full order.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch.func import grad

from .batching import autograd_through_vmap, calls, map_points
from .oracle import HVPOracle
from .update_rules import StepTranspose

Tensors = Dict[str, torch.Tensor]

__all__ = ["meta_input_gradients", "directional_gradients", "hyper_gradients"]


def meta_input_gradients(oracle: HVPOracle, weights: Dict[int, Tensors], meta_inputs: List[torch.Tensor]
                         ) -> List[Optional[torch.Tensor]]:
    """``sum_k d/dc <grad_phi l_k(phi_k, c), w_k>`` for each ``c`` of ``meta_inputs`` (``None`` if unreached).

    ``weights`` maps steps to ``[B, ...]`` vectors; the points, tasks, options and chunking are the oracle's.
    """
    trajectory, tasks, chunking = oracle.trajectory, oracle.tasks, oracle.chunking
    totals: List[Optional[torch.Tensor]] = [None] * len(meta_inputs)
    if not weights:
        return totals
    skipped = frozenset(range(min(weights), max(weights))) - set(weights)  # first-order steps: no mixed term
    for lo, hi, loss_fn in trajectory.runs(min(weights), max(weights) + 1, split=skipped):
        if lo in skipped:
            continue
        limit = chunking.limit(lambda lo=lo, fn=loss_fn: oracle.measure(fn, lo))
        span = hi - lo if limit is None else max(1, limit // tasks.at_once)
        for start in range(lo, hi, span):  # each chunk's graph is freed before the next one is built
            stop = min(hi, start + span)
            stacked = {n: torch.stack([weights[k][n] for k in range(start, stop)]) for n in weights[start]}
            grads = directional_gradients(oracle, loss_fn, trajectory.points(start, stop), stacked, meta_inputs,
                                          f"the mixed second-order terms at steps {start}..{stop - 1}")
            totals = [t if d is None else (d if t is None else t + d) for t, d in zip(totals, grads)]
    return totals


def directional_gradients(oracle: HVPOracle, loss_fn, points: Tensors, weights: Tensors, meta_inputs: List[torch.Tensor],
                          during: str) -> Tuple[Optional[torch.Tensor], ...]:
    """``d/dc sum <grad_phi loss_fn(phi, c), w>`` over the ``[n, B, ...]`` ``points`` and ``weights``, for each ``c``
    of ``meta_inputs`` (``None`` if unreached), with the oracle's tasks and options."""
    tasks, options, stream = oracle.tasks, oracle.options, oracle.trajectory.stepper.stream

    def inner(phi: Tensors, w: Tensors, task) -> torch.Tensor:
        g = grad(loss_fn)(phi, task)
        return sum((g[n] * w[n]).sum() for n in g)  # pyright: ignore[reportReturnType]  # a sum of tensors

    with torch.enable_grad(), calls(options, stream, during), autograd_through_vmap():
        values = map_points(inner, (points, weights), tasks, options.randomness)
        # retain_graph: the support loss may reuse a graph built outside the closure (features computed
        # once per task), which later chunks and the rest of the backward differentiate again.
        return torch.autograd.grad(values.sum(), meta_inputs, allow_unused=True, retain_graph=True)


def hyper_gradients(transpose: StepTranspose, adjoints: Dict[int, Tensors]) -> List[torch.Tensor]:
    """``sum_k (d step_k / d hyper)^T lambda_{k+1}`` for each learned hyperparameter of ``transpose``."""
    totals = {id(v): torch.zeros_like(v) for _, _, v in transpose.learned}
    for k, adjoint in adjoints.items():
        for key, cotangent in transpose.vjp(k, adjoint, with_hyper=True)[2].items():
            totals[key] = totals[key] + cotangent
    return list(totals.values())
