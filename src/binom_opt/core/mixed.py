"""Meta-gradients of the meta-parameters other than the initial point (docs/design.md, "Other meta-parameters").

A tensor ``c`` the support loss reaches gets ``sum_k d/dc <grad_phi l_k(phi_k, c), s B_k^T lambda_{k+1}>``
with the adjoints one Hessian factor lower; a learned learning rate gets ``sum_k (d step_k / d lr)^T
lambda_{k+1}`` at the full order.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.func import grad

from . import backprop
from .batching import along_tasks, autograd_through_vmap, map_points
from .calls import calls
from .context import StepContext
from .oracle import HVPOracle
from .reductions import nonfinite_groups
from .trajectory import Graph
from .update_rules import StepTranspose

Tensors = Dict[str, torch.Tensor]

__all__ = ["MixedTerms", "directional_gradients", "hyper_gradients"]


class MixedTerms:
    """``sum_k d/dc <grad_phi l_k(phi_k, c), s B_k^T lambda_{k+1}>`` for each ``c`` of ``meta_inputs``, summed as
    :func:`~binom_opt.core.expansion.expand` hands over the adjoints (:meth:`add`, in decreasing ``k``).

    Consecutive steps sharing a support loss are summed in one lifted call, at most the chunking's limit of
    evaluations and one checkpoint segment at once, so the weights held at once follow the memory budget,
    not K (kept graphs: one backward from the steps' kept gradients, no limit). Steps in ``skip`` (first-order:
    no Hessian, no mixed term) add nothing; tasks in ``drop`` (a ``[B]`` mask) contribute nothing.
    """

    def __init__(self, oracle: HVPOracle, transpose: StepTranspose, scale: float, meta_inputs: List[torch.Tensor],
                 skip: frozenset = frozenset(), drop: Optional[torch.Tensor] = None):
        self.oracle, self.transpose, self.scale, self.meta_inputs = oracle, transpose, scale, meta_inputs
        self.skip, self.drop = skip, drop
        self._bad: Optional[torch.Tensor] = None
        self._totals: List[Optional[torch.Tensor]] = [None] * len(meta_inputs)
        self._pending: Dict[int, Tensors] = {}
        self._span: Optional[int] = None

    @property
    def bad(self) -> Optional[torch.Tensor]:
        """``[B]``, the tasks whose weight of a mixed term (``s B_k^T lambda_{k+1}``) was not finite, every step's
        (a tensor: reading it is left to the caller)."""
        self._flush()
        return self._bad

    def add(self, k: int, adjoint: Tensors) -> None:
        """Take step ``k``'s adjoint ``lambda_{k+1}`` (steps come in decreasing ``k``)."""
        trajectory = self.oracle.trajectory
        if self._pending:
            lo, every = min(self._pending), trajectory.every
            full = self._span is not None and len(self._pending) >= self._span
            segment_ends = every > 1 and lo % every == 0  # step k is in the checkpoint segment before lo's
            if k in self.skip or not trajectory.together(k, lo) or full or segment_ends:
                self._flush()
        if k in self.skip:
            return
        if not self._pending:  # kept steps are a prefix of the loop: from a kept k down, every step is kept
            limit = None if self.oracle.kept(range(k, k + 1)) else self.oracle.chunking.limit(
                lambda: self.oracle.measure(trajectory.loss_fns[k], k))
            self._span = None if limit is None else max(1, limit // self.oracle.tasks.at_once)
        weight = self.transpose.vjp(k, adjoint)[1]
        if self.drop is not None:
            weight = {n: torch.where(along_tasks(self.drop, t), torch.zeros_like(t), t) for n, t in weight.items()}
        self._pending[k] = {n: t * self.scale for n, t in weight.items()} if self.scale != 1.0 else weight

    def taken(self, totals: Sequence[Optional[torch.Tensor]]) -> MixedTerms:
        """These terms summed by a chain's backward (:attr:`~binom_opt.core.expansion.ExpansionResult.others`, one
        task's) instead of step by step: zero where that task is dropped."""
        drop = self.drop
        self._totals = [t if t is None or drop is None else torch.where(drop.reshape(()), torch.zeros_like(t), t) for t in totals]
        return self

    def totals(self) -> List[Optional[torch.Tensor]]:
        """The sums over every step handed over (``None`` for an input no support loss reaches)."""
        self._flush()
        return self._totals

    def _flush(self) -> None:
        if not self._pending:
            return
        lo, hi = min(self._pending), max(self._pending) + 1
        # the weights' non-finite tasks, every step's at once (one task: one flat concatenation), read from the [B, ...]
        # weights themselves: no copy of the group above the concatenation's cap
        bad = nonfinite_groups([[w for k in range(lo, hi) for w in self._pending[k].values()]], self.oracle.tasks.size)[0]
        self._bad = bad if self._bad is None else self._bad | bad
        stacked = {n: torch.stack([self._pending[k][n] for k in range(lo, hi)]) for n in self._pending[lo]}
        self._pending = {}
        trajectory = self.oracle.trajectory
        kept = [trajectory.graphs.get(k) for k in range(lo, hi)]
        # kept graphs: one backward from their gradients, no replay; not through a chained one, whose point depends on
        # the earlier steps' graphs: a backward from it would add their terms again (a chain sums them itself, expand)
        if all(kept) and not any(graph.chained for graph in kept):  # pyright: ignore[reportOptionalMemberAccess]  # all kept
            with calls(self.oracle.options, None, f"the mixed second-order terms at steps {lo}..{hi - 1}", modules=False):
                grads = _from_graphs(kept, stacked, self.meta_inputs)  # pyright: ignore[reportArgumentType]  # none is None
        else:
            grads = directional_gradients(self.oracle, trajectory.loss_fns[lo], trajectory.points(lo, hi), stacked,
                                          self.meta_inputs, f"the mixed second-order terms at steps {lo}..{hi - 1}",
                                          trajectory.context(lo))
        self._totals = [t if d is None else (d if t is None else t + d) for t, d in zip(self._totals, grads)]


def directional_gradients(oracle: HVPOracle, loss_fn, points: Tensors, weights: Tensors, meta_inputs: List[torch.Tensor],
                          during: str, context: StepContext) -> Tuple[Optional[torch.Tensor], ...]:
    """``d/dc sum <grad_phi loss_fn(phi, c), w>`` over the ``[n, B, ...]`` ``points`` and ``weights``, for each ``c``
    of ``meta_inputs`` (``None`` if unreached), with the oracle's tasks and options, in the steps' ``context``."""
    tasks, options = oracle.tasks, oracle.options
    if tasks.at_once == 1 and tasks.size == 1 and not options.compile_hvps:
        return _plain_directional(loss_fn, points, weights, meta_inputs, tasks, calls(options, context, during))

    def inner(phi: Tensors, w: Tensors, task) -> torch.Tensor:
        g = grad(loss_fn)(phi, task)
        return sum((g[n] * w[n]).sum() for n in g)  # pyright: ignore[reportReturnType]  # a sum of tensors

    with torch.enable_grad(), calls(options, context, during), autograd_through_vmap():
        values = map_points(inner, (points, weights), tasks, options.randomness)
        # retain_graph: the support loss may reuse a graph built outside the closure (features computed
        # once per task), which later chunks and the rest of the backward differentiate again.
        return torch.autograd.grad(values.sum(), meta_inputs, allow_unused=True, retain_graph=True)


def _from_graphs(graphs: List[Graph], weights: Tensors, meta_inputs: List[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """:func:`directional_gradients` from the steps' kept graphs (one task): one backward to the meta-inputs from
    every kept gradient, each seeded with its weight (the graphs stay for later products)."""
    used = [(g, weights[n][i, 0]) for i, graph in enumerate(graphs)
            for n, g in zip(graph.names, graph.grads) if g is not None and g.requires_grad]
    if not used:
        return (None,) * len(meta_inputs)
    # retain_graph: the support loss may reuse a graph built outside the closure (features computed
    # once per task), which later chunks and the rest of the backward differentiate again.
    return backprop.grad([g for g, _ in used], meta_inputs, [w for _, w in used], retain_graph=True)


def _plain_directional(loss_fn, points: Tensors, weights: Tensors, meta_inputs: List[torch.Tensor], tasks, context
                       ) -> Tuple[Optional[torch.Tensor], ...]:
    """:func:`directional_gradients` for one task with plain autograd: each point's gradient with its graph, weighted
    and summed, then one backward to the meta-inputs. No ``vmap`` over the points, so none of its per-call machinery
    and no routing around torch's gaps in autograd through ``vmap``."""
    with torch.enable_grad(), context:
        task = tasks.first()  # sliced with grad enabled: data computed by a body (features) carries its graph
        graphs = [Graph.at(loss_fn, {n: t[i, 0] for n, t in points.items()}, task)
                  for i in range(next(iter(points.values())).shape[0])]
        return _from_graphs(graphs, weights, meta_inputs)


def hyper_gradients(transpose: StepTranspose, adjoints: Dict[int, Tensors]) -> List[torch.Tensor]:
    """``sum_k (d step_k / d hyper)^T lambda_{k+1}`` for each learned hyperparameter of ``transpose``."""
    totals = {id(v): torch.zeros_like(v) for _, _, v in transpose.learned}
    for k, adjoint in adjoints.items():
        for key, cotangent in transpose.vjp(k, adjoint, with_hyper=True)[2].items():
            totals[key] = totals[key] + cotangent
    return list(totals.values())
