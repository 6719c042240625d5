"""Functional core: meta-gradients of pure loss functions over dicts of tensors.

Everything object-shaped in ``binom_opt`` (the engine, the drop-ins) is a thin shell over the
pieces assembled here: the recorded inner loop (:mod:`binom_opt.trajectory`), batched HVPs at
its points (:mod:`binom_opt.hvp`) and the estimator's arithmetic (:mod:`binom_opt.expansion`).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.func import grad, vmap

from .estimators import Binomial, Estimator, ExpansionPlan
from .expansion import ExpansionResult, expand
from .batched import batched_hvp_oracle, run_sgd_batched, task_count
from .hvp import trajectory_hvp_oracle
from .memory import Chunking
from .stats import MetaGradientStats
from .trajectory import check_replay, check_scalar_loss, run_sgd

Tensors = Dict[str, torch.Tensor]
LossFn = Callable[[Tensors], torch.Tensor]

__all__ = ["meta_gradient", "meta_gradients", "meta_gradient_batched"]


def meta_gradient(
    inner_loss: LossFn,
    outer_loss: LossFn,
    params: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: Union[float, Mapping[str, float]],
    estimator: Estimator = Binomial(1),
    hvp: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Union[None, int, str] = None,
    compile_hvps: bool = False,
    return_stats: bool = False,
) -> Union[Tensors, Tuple[Tensors, MetaGradientStats]]:
    """The meta-gradient of ``outer_loss(phi_K)`` with respect to the initial point ``params``.

    ``phi_0 = params`` and ``phi_{k+1} = phi_k - lr * grad inner_loss(phi_k)`` for ``steps``
    steps; no autograd graph is kept between steps. The estimator picks which terms of
    ``(I - lr H_0)...(I - lr H_{K-1}) grad outer_loss(phi_K)`` to keep.

    Args:
        inner_loss: support loss, a pure function of a dict name -> tensor returning a scalar
            (it is replayed under ``torch.func`` transforms at recorded points).
        outer_loss: query loss, a function of the same kind of dict.
        params: the initial point; it is not modified.
        steps: ``K >= 1``.
        lr: the inner step size, one float or one per entry of ``params``.
        estimator: ``FirstOrder()``, ``Truncated(L)``, ``Binomial(L)``, ``Hybrid(L, C)`` or ``Exact()``.
        hvp: ``"auto"``, ``"rev"`` (reverse-over-reverse) or ``"fwd"`` (forward-over-reverse).
        chunk_size: at most this many HVPs at once in a batched round (``None``: all).
        memory_budget: bytes (or a string such as ``"1GiB"``) for a batched round's activations;
            the chunk size follows from one HVP's measured activations (:mod:`binom_opt.memory`).
        compile_hvps: run the HVPs through ``torch.compile`` (:func:`binom_opt.hvp.compiled`).
        return_stats: also return a :class:`~binom_opt.MetaGradientStats`.

    Returns:
        A dict like ``params`` (and the stats when asked).

    Example:
        >>> import torch, binom_opt as bo
        >>> from binom_opt.functional import meta_gradient
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
        >>> inner = lambda p: ((torch.tanh(x @ p["w"]) - y) ** 2).mean()
        >>> outer = lambda p: ((torch.tanh(x @ p["w"]) - 2 * y) ** 2).mean()
        >>> w = {"w": torch.zeros(3, dtype=torch.float64)}
        >>> binom = meta_gradient(inner, outer, w, steps=4, lr=0.1, estimator=bo.Binomial(4))
        >>> exact = meta_gradient(inner, outer, w, steps=4, lr=0.1, estimator=bo.Exact())
        >>> torch.allclose(binom["w"], exact["w"], rtol=1e-12, atol=0)
        True
    """
    (result, stats), = meta_gradients(
        inner_loss, outer_loss, params, steps=steps, lr=lr, estimators=[estimator], hvp=hvp, chunk_size=chunk_size,
        memory_budget=memory_budget, compile_hvps=compile_hvps,
    ).values()
    return (result, stats) if return_stats else result


def meta_gradients(
    inner_loss: LossFn,
    outer_loss: LossFn,
    params: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: Union[float, Mapping[str, float]],
    estimators: Sequence[Estimator],
    hvp: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Union[None, int, str] = None,
    compile_hvps: bool = False,
) -> Dict[Estimator, Tuple[Tensors, MetaGradientStats]]:
    """Several estimators on ONE inner loop: ``{estimator: (meta_gradient, stats)}``.

    The way to compare estimators fairly (same trajectory, same ``g``) and cheaply (the inner
    loop runs once). Arguments as in :func:`meta_gradient`.

    Example:
        >>> import torch, binom_opt as bo
        >>> from binom_opt.functional import meta_gradients
        >>> x = torch.randn(8, 3, dtype=torch.float64)
        >>> loss = lambda p: torch.tanh(x @ p["w"]).pow(2).mean()
        >>> out = meta_gradients(loss, loss, {"w": torch.ones(3, dtype=torch.float64)}, steps=3, lr=0.1,
        ...                      estimators=[bo.Truncated(1), bo.Binomial(1)])
        >>> [stats.hvp_count for _, stats in out.values()]
        [1, 3]
    """
    for estimator in estimators:
        check_estimator(estimator)
    plans = {estimator: estimator.plan(steps) for estimator in estimators}
    step_size = step_sizes(lr, params)
    trajectory = run_sgd(inner_loss, params, step_size, steps)
    g = outer_gradient(outer_loss, trajectory.final)
    check_replay([inner_loss] * steps, trajectory)
    oracle = trajectory_hvp_oracle(
        inner_loss, trajectory.points, hvp, chunk_size, memory_budget=memory_budget, compile_hvps=compile_hvps
    )
    out = {}
    for estimator, plan in plans.items():
        with torch.no_grad():  # the HVPs are torch.func transforms; no outer graph to captured tensors
            result = expand(plan, g, step_size, oracle, steps=steps)
        check_finite(result)
        out[estimator] = (result.meta_grad, make_stats(estimator, plan, steps, g, result, trajectory.losses, oracle))
    return out


def meta_gradient_batched(
    inner_loss: Callable[[Tensors, object], torch.Tensor],
    outer_loss: Callable[[Tensors, object], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    tasks,
    *,
    steps: int,
    lr: Union[float, Mapping[str, float]],
    estimator: Estimator = Binomial(1),
    hvp: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget: Union[None, int, str] = None,
    compile_hvps: bool = False,
    return_stats: bool = False,
):
    """Per-task meta-gradients for a whole meta-batch, every inner step and HVP round batched over tasks.

    ``tasks`` is a tensor or a pytree (tuple, dict) of tensors with a leading task dimension
    ``B``; ``inner_loss(params, task)`` and ``outer_loss(params, task)`` see one task at a time
    (they are vmapped). A meta-batch costs one batched call per inner step and per HVP round
    (tasks x trajectory points in one vmap) instead of ``B`` Python iterations.
    ``chunk_size`` and ``memory_budget`` bound the HVPs (steps x tasks) run at once.

    Returns:
        A dict like ``params`` whose entries have a leading task dimension (average them for the
        meta-batch mean), and the stats when asked (norms over the whole meta-batch).

    Example:
        >>> import torch, binom_opt as bo
        >>> from binom_opt.functional import meta_gradient, meta_gradient_batched
        >>> x, y = torch.randn(4, 8, 3, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
        >>> loss = lambda p, task: ((torch.tanh(task[0] @ p["w"]) - task[1]) ** 2).mean()
        >>> w = {"w": torch.ones(3, dtype=torch.float64)}
        >>> batched = meta_gradient_batched(loss, loss, w, (x, y), steps=3, lr=0.1, estimator=bo.Binomial(2))
        >>> one = meta_gradient(lambda p: loss(p, (x[1], y[1])), lambda p: loss(p, (x[1], y[1])), w, steps=3,
        ...                     lr=0.1, estimator=bo.Binomial(2))
        >>> torch.allclose(batched["w"][1], one["w"], rtol=1e-12, atol=0)
        True
    """
    check_estimator(estimator)
    plan = estimator.plan(steps)
    step_size = step_sizes(lr, params)
    B = task_count(tasks)
    chunking = Chunking(chunk_size, memory_budget, inner_batch=B)
    loss = lambda phi, extra, task: inner_loss(phi, task)
    trajectory = run_sgd_batched(loss, params, {}, tasks, step_size, steps)
    with torch.no_grad():
        g = vmap(grad(outer_loss))(trajectory.final, tasks)
        oracle = batched_hvp_oracle(loss, trajectory, {}, tasks, hvp, chunking, compile_hvps=compile_hvps)
        result = expand(plan, g, step_size, oracle, steps=steps)
    check_finite(result)
    if not return_stats:
        return result.meta_grad
    return result.meta_grad, make_stats(estimator, plan, steps, g, result, trajectory.mean_losses, oracle, tasks=B)


def check_estimator(estimator: object) -> None:
    if not isinstance(estimator, Estimator):
        raise TypeError(
            f"estimator must be one of FirstOrder(), Truncated(L), Binomial(L), Hybrid(L, C), Exact(); "
            f"got {estimator!r}."
        )


def step_sizes(lr: Union[float, Mapping[str, float]], params: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """One validated step size per entry of ``params``."""
    per_name = dict(lr) if isinstance(lr, Mapping) else {n: lr for n in params}
    missing = sorted(set(params) - set(per_name))
    if missing:
        raise ValueError(f"lr gives no step size for {missing}.")
    for name, value in per_name.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"The inner learning rate must be a finite float >= 0, got {value!r} for {name!r}.")
    return {n: float(per_name[n]) for n in params}


def outer_gradient(outer_loss: LossFn, final: Tensors) -> Tensors:
    """``g``: the gradient of the outer loss at the adapted point (zeros where it does not depend)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in final.items()}
    with torch.enable_grad():
        loss = check_scalar_loss(outer_loss(leaves), "outer_loss")
        if not loss.requires_grad:
            raise ValueError("outer_loss does not depend on the adapted parameters: there is no meta-gradient.")
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}


def check_finite(result: ExpansionResult) -> None:
    """Raise instead of returning a NaN/Inf meta-gradient, naming the first round that went bad."""
    if all(bool(torch.isfinite(t).all()) for t in result.meta_grad.values()):
        return
    bad = next((i for i, c in enumerate(result.contributions) if not math.isfinite(c)), None)
    where = "in the outer-loss gradient" if bad is None else f"in HVP round {bad + 1}"
    raise FloatingPointError(
        f"The meta-gradient is not finite (first seen {where}). The Hessian-vector products overflowed "
        "or the outer loss is NaN/Inf: lower the inner learning rate, use a smaller L, or check the data."
    )


def make_stats(
    estimator: Estimator,
    plan: ExpansionPlan,
    steps: int,
    g: Tensors,
    result: ExpansionResult,
    inner_losses: List[float],
    oracle=None,
    tasks: int = 1,
) -> MetaGradientStats:
    """The stats of one meta-gradient; ``tasks`` > 1 for a task-batched one (the oracle's HVPs
    each covered that many tasks, ``inner_losses`` are averaged over them)."""
    chunking = getattr(oracle, "chunking", None)
    return MetaGradientStats(
        estimator=estimator,
        steps=steps,
        levels=plan.levels,
        hvp_count=result.hvp_count * tasks,
        rounds=result.oracle_calls,
        contributions=list(result.contributions),
        inner_losses=list(inner_losses),
        schedule=plan.schedule,
        g_norm=float(torch.sqrt(sum(t.detach().double().pow(2).sum() for t in g.values()))),
        chunk_fallbacks=list(chunking.fallbacks) if chunking else [],
        hvps_at_once=chunking.used if chunking else None,
        per_hvp_bytes=chunking.per_hvp_bytes if chunking else None,
    )
