"""Meta-gradients of pure loss functions over dicts of tensors (the ``torch.func`` way).

``inner_loss(params)`` is the support loss and ``outer_loss(params)`` the query loss, both pure
functions of a dict name -> tensor (with ``tasks``: ``loss(params, task)`` for one task, vmapped
over a leading task dimension). The inner loop and the estimator are the same pipeline as the
engine's (docs/design.md): every inner optimizer, estimator and :class:`~binom_opt.Options` works here.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .core.adaptation import check_scalar_loss, sum_present
from .core.batching import Tasks, autograd_through_vmap, per_task
from .core.calls import calls
from .core.estimators import Estimator, Exact, Implicit, check_estimator
from .core.options import Options
from .core.recorder import InnerLoop, Setup
from .core.stats import DivergenceMonitor, MetaGradientStats, Stats, made, merge_stats
from .core.update_rules import read_optimizer, sgd_rules

Tensors = Dict[str, torch.Tensor]

__all__ = ["meta_gradient", "meta_gradients", "meta_gradient_batched"]

_MONITOR = DivergenceMonitor()  # functions have no object to warn once for: the divergence warning is once per process


def meta_gradient(inner_loss: Callable, outer_loss: Callable, params: Mapping[str, torch.Tensor], *, steps: int,
                  lr: Union[None, float, Mapping[str, object]] = None, inner_opt: Optional[torch.optim.Optimizer] = None,
                  estimator: Estimator = Exact(), meta_params: Optional[Mapping[str, torch.Tensor]] = None,
                  return_stats: bool = False, options: Optional[Options] = None,
                  **option_keywords: Any) -> Union[Dict[str, torch.Tensor], Tuple[Dict[str, torch.Tensor], MetaGradientStats]]:
    """The meta-gradient of ``outer_loss(phi_K)`` with respect to the initial point ``params``.

    ``phi_0 = params`` and ``phi_{k+1}`` is an inner step on ``inner_loss`` (plain SGD with step ``lr``,
    or ``inner_opt``) for ``steps`` steps; no autograd graph is kept between steps. The estimator picks
    which terms of the product of the step Jacobians to keep.

    Args:
        inner_loss: support loss, a pure function of a dict name -> tensor returning a scalar (it is
            replayed under ``torch.func`` transforms at recorded points).
        outer_loss: query loss, a function of the same kind of dict.
        params: the initial point; it is not modified.
        steps: ``K >= 1``.
        lr: plain SGD's step size, one value or one per entry of ``params``; tensors that require grad
            are meta-learned (list them in ``meta_params`` to get their meta-gradient).
        inner_opt: instead of ``lr``, a ``torch.optim`` SGD/Adam/AdamW built over ``params.values()``.
        estimator: ``FirstOrder()``, ``Truncated(L)``, ``Binomial(L)``, ``Hybrid(L, C)``, ``Implicit(cg_steps, reg)``,
            ``Reptile()`` or ``Exact()`` (default).
        meta_params: other tensors the losses use (or learned learning rates) whose meta-gradient to
            return too, by name.
        return_stats: also return the :class:`~binom_opt.MetaGradientStats`.
        options: a :class:`~binom_opt.Options`; its fields may also be given as keyword arguments.

    Returns:
        A dict with the meta-gradient of every entry of ``params`` and ``meta_params`` (and the stats).

    Example:
        >>> import torch, binom_opt as bo
        >>> from binom_opt.functional import meta_gradient
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
        >>> inner = lambda p: ((torch.tanh(x @ p["w"]) - y) ** 2).mean()
        >>> outer = lambda p: ((torch.tanh(x @ p["w"]) - 2 * y) ** 2).mean()
        >>> w = {"w": torch.zeros(3, dtype=torch.float64)}
        >>> binom = meta_gradient(inner, outer, w, steps=4, lr=0.1, estimator=bo.Binomial(4))
        >>> exact = meta_gradient(inner, outer, w, steps=4, lr=0.1)
        >>> torch.allclose(binom["w"], exact["w"], rtol=1e-12, atol=0)
        True
    """
    (grads, stats), = _meta_gradients(inner_loss, outer_loss, params, Tasks(), steps, lr, inner_opt, [estimator],
                                      meta_params, options, option_keywords).values()
    return (grads, stats) if return_stats else grads


def meta_gradients(inner_loss: Callable, outer_loss: Callable, params: Mapping[str, torch.Tensor], *, steps: int,
                   estimators: Sequence[Estimator], lr: Union[None, float, Mapping[str, object]] = None,
                   inner_opt: Optional[torch.optim.Optimizer] = None, meta_params: Optional[Mapping[str, torch.Tensor]] = None,
                   options: Optional[Options] = None,
                   **option_keywords: Any) -> Dict[Estimator, Tuple[Dict[str, torch.Tensor], MetaGradientStats]]:
    """Several estimators on ONE inner loop: ``{estimator: (meta_gradient, stats)}``.

    The way to compare estimators fairly (same trajectory, same ``g``) and cheaply (the inner loop
    runs once). Arguments as in :func:`meta_gradient`.

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
    return _meta_gradients(inner_loss, outer_loss, params, Tasks(), steps, lr, inner_opt, estimators, meta_params,
                           options, option_keywords)


def meta_gradient_batched(inner_loss: Callable, outer_loss: Callable, params: Mapping[str, torch.Tensor],
                          tasks: Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]], *,
                          steps: int, lr: Union[None, float, Mapping[str, object]] = None,
                          inner_opt: Optional[torch.optim.Optimizer] = None, estimator: Estimator = Exact(),
                          meta_params: Optional[Mapping[str, torch.Tensor]] = None, return_stats: bool = False,
                          options: Optional[Options] = None,
                          **option_keywords: Any) -> Union[Dict[str, torch.Tensor], Tuple[Dict[str, torch.Tensor], MetaGradientStats]]:
    """Per-task meta-gradients of a whole meta-batch, every inner step and HVP round batched over tasks.

    ``tasks`` is a tensor or a pytree (tuple, dict) of tensors with a leading task dimension ``B``;
    ``inner_loss(params, task)`` and ``outer_loss(params, task)`` see one task at a time (they are
    vmapped). Other arguments as in :func:`meta_gradient`.

    Returns:
        A dict like ``params`` whose entries have a leading task dimension (average them for the
        meta-batch mean), plus the meta-gradient of each ``meta_params`` entry summed over the tasks
        (and the stats when asked; their norms cover the whole meta-batch).

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
    (grads, stats), = _meta_gradients(inner_loss, outer_loss, params, Tasks(tasks), steps, lr, inner_opt, [estimator],
                                      meta_params, options, option_keywords).values()
    return (grads, stats) if return_stats else grads


def _meta_gradients(inner_loss, outer_loss, params, tasks: Tasks, steps, lr, inner_opt, estimators, meta_params,
                    options, option_keywords) -> Dict[Estimator, Tuple[Tensors, MetaGradientStats]]:
    options = Options.resolve(options, **option_keywords)
    for estimator in estimators:  # validated before anything runs
        check_estimator(estimator).plan(steps)
    if len(estimators) > 1 and any(isinstance(e, Implicit) for e in estimators):
        raise ValueError("Implicit(...) adapts with its own proximal inner loop, which the other estimators do not share: "
                         "compute it in a call of its own (meta_gradient(..., estimator=bo.Implicit(...))).")
    if (lr is None) == (inner_opt is None):
        raise ValueError("Give the inner step as exactly one of lr= (plain SGD) and inner_opt= (a torch.optim instance).")
    if inner_opt is None:
        rules, hyper = sgd_rules(lr, list(params))
    else:
        adapted, rules, hyper, _ = read_optimizer(params, inner_opt, modules=False)
        if sorted(adapted) != sorted(params):
            raise ValueError(f"inner_opt must be built over every tensor of params ({sorted(params)}), got {sorted(adapted)}.")
    extra = dict(meta_params or {})
    if params and tasks.batched:
        point = {n: t.detach() for n, t in params.items()}
        key = getattr(inner_loss, "__code__", None) or id(inner_loss)  # the same support loss, for the measured plan
        tasks = tasks.planned(options, next(iter(params.values())).device, inner_loss, point, key)
    if tasks.loop:
        return _task_by_task(inner_loss, outer_loss, params, tasks, steps, rules, hyper, estimators, extra, options)
    return _one_call(inner_loss, outer_loss, params, tasks, steps, rules, hyper, estimators, extra, options, _MONITOR)


def _one_call(inner_loss, outer_loss, params, tasks: Tasks, steps, rules, hyper, estimators, extra, options, monitor,
              retain_graph: bool = False) -> Dict[Estimator, Tuple[Tensors, MetaGradientStats]]:
    """One inner loop of one task or of a vmapped meta-batch, and each estimator's meta-gradient of it."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    make = (lambda fn: fn) if tasks.batched else (lambda fn: lambda phi, task: fn(phi))
    keep = estimators[0] if len(estimators) == 1 else Exact()  # several estimators read every point
    loop = InnerLoop(Setup(keep, options, make, on_stats=monitor), leaves, rules, hyper, tasks)
    for _ in range(steps):
        loop.step(inner_loss)
    out = {}
    for estimator in estimators:
        with torch.enable_grad():
            final = loop.outputs(estimator)
            # The query is differentiated first, on its own, so that its graph is gone before the estimator's
            # HVP rounds run; then the adapted parameters' gradient goes through the estimator.
            cut = {n: t.detach().requires_grad_(True) for n, t in final.items()}
            with calls(options, None, "the outer loss"), autograd_through_vmap():
                if tasks.batched:
                    one = lambda p, task: check_scalar_loss(outer_loss(p, task), "outer_loss")
                    outer = per_task(one, tasks.loop, options.bn)(cut, tasks.data).sum()
                else:
                    outer = check_scalar_loss(outer_loss(cut), "outer_loss")
            if not outer.requires_grad:
                raise ValueError("outer_loss does not depend on the adapted parameters: there is no meta-gradient.")
            # retained: a graph the losses share (features from a body) is differentiated again below
            query_grads = torch.autograd.grad(outer, [*cut.values(), *extra.values()], allow_unused=True, retain_graph=True)
            to_final, direct = query_grads[:len(cut)], query_grads[len(cut):]
            del outer  # and with it the query's own graph
            reached = [(final[n], g) for n, g in zip(cut, to_final) if g is not None]
            wrt = [*loop.initial_inputs.values(), *extra.values()]
            through = (torch.autograd.grad([t for t, _ in reached], wrt, [g for _, g in reached], allow_unused=True,
                                           retain_graph=retain_graph) if reached else [None] * len(wrt))
            grads = [*through[:len(params)], *(sum_present(pair) for pair in zip(through[len(params):], direct))]
        named = dict(zip([*params, *extra], grads))
        shapes = {**{n: t for n, t in loop.initial_inputs.items()}, **extra}
        result = {n: torch.zeros_like(shapes[n]) if g is None else g for n, g in named.items()}
        out[estimator] = (result, monitor.last_stats)
    return out


def _task_by_task(inner_loss, outer_loss, params, tasks: Tasks, steps, rules, hyper, estimators, extra, options
                  ) -> Dict[Estimator, Tuple[Tensors, MetaGradientStats]]:
    """The CPU plan of a meta-batch (:attr:`Tasks.loop`): each task's whole meta-gradient, inner loop, query loss and
    estimator, before the next task's, bitwise as :func:`meta_gradient` of that task computes it. The meta-batch
    then costs what a loop over :func:`meta_gradient` costs, in time and in memory: one task's trajectory,
    query graph and HVP rounds at a time, and its query forward once (the outer loss is known here, so
    nothing is recomputed). The per-task results are concatenated, the meta-parameters' summed over the
    tasks and the stats merged.
    """
    # Task data that requires grad (a body's features, computed for the whole meta-batch) is cut at each task's
    # slice, whose gradient is returned as an extra entry; one backward then takes them through that graph.
    shared = tasks.requiring_grad()
    cut_names = [f"\0task data {j}" for j in range(len(shared) if extra else 0)]
    per_task: Dict[Estimator, List[Tuple[Tensors, MetaGradientStats]]] = {e: [] for e in estimators}
    for b in range(tasks.size):  # retain_graph: the losses may share a graph built outside them
        alone = tasks.alone(b, detach=bool(shared))
        with_cut = {**extra, **dict(zip(cut_names, alone.requiring_grad()))}
        out = _one_call(inner_loss, outer_loss, params, alone, steps, rules, hyper, estimators, with_cut, options,
                        _Last(), retain_graph=True)
        for estimator, result in out.items():
            per_task[estimator].append(result)
    merged = {}
    for estimator, results in per_task.items():
        grads = {n: torch.cat([r[0][n] for r in results]) if n in params else sum_present([r[0][n] for r in results])
                 for n in [*params, *extra]}
        if cut_names:
            data_grads = tasks.through_data([[r[0][name] for name in cut_names] for r in results], list(extra.values()))
            grads.update({n: sum_present((grads[n], g)) for n, g in zip(extra, data_grads)})
        stats = merge_stats([r[1] for r in results])
        _MONITOR(stats)
        merged[estimator] = (grads, stats)
    return merged


class _Last:
    """Keeps the stats of the last meta-gradient, without the divergence warning (given once for the merged stats)."""

    last_stats: Optional[MetaGradientStats] = None

    def __call__(self, stats: Stats) -> None:
        self.last_stats = made(stats)
