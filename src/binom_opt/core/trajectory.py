"""A recorded inner loop: the points the estimators take Hessian-vector products at.

One point per inner step (or every m-th, recomputing the others), optimizer state only where it
is read, no gradient and no graph (docs/design.md, "Storage and memory").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import backprop
from .batching import stack
from .update_rules import plain_sgd_step

Tensors = Dict[str, torch.Tensor]
States = Dict[str, Tensors]
LossFn = Callable[..., Any]

__all__ = ["Trajectory", "Stored", "Graph", "products", "chain_adjoints", "DROPPED", "check_recomputed"]


class Stored:
    """A stored point ``phi_k`` and, when kept, the optimizer state there.

    ``update``: the point is one task's update as a step took it (with its graph where linked, :attr:`Graph.out`),
    detached and given its task axis when first read: the next step takes the update's tensors as its leaves (or, chained,
    as they are), and no estimator that differentiates kept graphs reads the point at all."""

    __slots__ = ("_phi", "_update", "state")

    def __init__(self, phi: Optional[Tensors] = None, state: Optional[States] = None,
                 update: Optional[Tuple[List[str], List[torch.Tensor]]] = None):
        self._phi, self.state, self._update = phi, state, update

    @property
    def phi(self) -> Tensors:
        if self._phi is None:
            names, out = self._update  # pyright: ignore[reportGeneralTypeIssues]  # set where phi is not
            self._phi = {n: (t.detach() if t.requires_grad else t).unsqueeze(0) for n, t in zip(names, out)}
        return self._phi

    def one(self) -> Tensors:
        """One task's point without its task axis: the update's own tensors (a step may make them its leaves), else
        views of the point."""
        if self._update is not None:
            names, out = self._update
            return dict(zip(names, out))
        return {n: t.squeeze(0) for n, t in self.phi.items()}


DROPPED = Stored({})  # a point before the estimator's window: never stored, never read


@dataclass
class Graph:
    """An inner step's gradient with the graph that computed it, kept where it is small (``memory.keeps_graphs``):
    ``leaves`` are the step's point (one tensor per adapted parameter, named by ``names``), ``grads`` the support
    loss's gradient in them, ``None`` where it does not depend on one. ``H v`` is then one backward of ``grads`` against
    ``v``, and a mixed term one backward to the other meta-parameters, instead of a replay of the step.

    Plain SGD steps may be chained as unrolled autograd chains them: ``out`` is the step's update ``leaves - lr *
    grads`` with its graph, and the next step's leaves are ``out`` itself (``chained``), so that one backward from the
    last ``out`` takes the adjoints of every step (:func:`chain_adjoints`). A chained graph's leaves depend on the
    earlier steps' graphs."""

    names: List[str]
    leaves: List[torch.Tensor]
    grads: List[Optional[torch.Tensor]]
    chained: bool = False
    out: Optional[List[torch.Tensor]] = None

    @classmethod
    def at(cls, loss_fn: LossFn, point: Tensors, task) -> Graph:
        """The graph of ``loss_fn(point, task)``'s gradient, taken now with plain autograd (a replayed step)."""
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in point.values()]
            grads = backprop.grad([loss_fn(dict(zip(point, leaves)), task)], leaves, create_graph=True)
        return cls(list(point), leaves, list(grads))

    def hvp(self, vector: Tensors, first: Optional[Tensors] = None) -> Tensors:
        """``H v`` (``first + H v``) at this point for ``vector`` (by name); the graph stays for later products."""
        return products([self], [vector], first=None if first is None else [first])[0]

    def link(self, lr: float) -> None:
        """Set :attr:`out`, a plain-SGD step's update ``leaves - lr * grads`` with its graph (:func:`plain_sgd_step`,
        as every update of the inner loop). Not where a parameter has no gradient (its point would be the next step's
        leaf as it is, one tensor shared by two graphs)."""
        grads = [g for g in self.grads if g is not None]
        if len(grads) == len(self.grads):
            with torch.enable_grad():
                self.out = plain_sgd_step(self.leaves, grads, lr)


def products(graphs: List[Graph], vectors: List[Tensors], task_dim: bool = False, first: Optional[List[Tensors]] = None,
             bare: bool = False) -> List[Tensors]:
    """``H_i v_i`` for each kept graph and its vector, in one backward: the graphs share no node, so each product is
    the one its graph alone gives, bit for bit, without an engine call per point (a round of the binomial schedule).
    Chained graphs do share nodes (a later one's leaves are computed from an earlier one's): each takes its own
    backward. ``task_dim``: vectors and products are ``[1, ...]`` (one task's), the graphs' own tensors without it.

    ``first``: ``first_i + H_i v_i`` instead, ``first_i`` handed to the leaves as the backward starts, before any term
    of the product reaches them: the order in which a backward through the update ``phi - lr * grad`` that chains two
    steps (unrolled autograd's, :func:`chain_adjoints`) sums the direct path and the product, so the same bits.
    ``bare``: the products without the task axis all the same (for a sum that broadcasts them)."""
    if len(graphs) > 1 and any(graph.chained for graph in graphs):
        return [products([graph], [vector], task_dim, None if first is None else [first[i]], bare)[0]
                for i, (graph, vector) in enumerate(zip(graphs, vectors))]
    views: Dict[int, torch.Tensor] = {}  # a round of the binomial schedule hands every graph the same vector
    squeezed = (lambda t: views[id(t)] if id(t) in views else views.setdefault(id(t), t.squeeze(0))) if task_dim else (lambda t: t)
    used = [(g, squeezed(vector[n])) for graph, vector in zip(graphs, vectors)
            for n, g in zip(graph.names, graph.grads) if g is not None and g.requires_grad]
    leaves = [t for graph in graphs for t in graph.leaves]
    if first is not None:  # each leaf as an output too: the backward's root hands it first_i before anything else
        used += [(leaf, squeezed(before[n])) for graph, before in zip(graphs, first) for n, leaf in zip(graph.names, graph.leaves)]
    found = (backprop.grad([g for g, _ in used], leaves, [v for _, v in used], retain_graph=True)
             if used else [None] * len(leaves))
    return _by_graph(graphs, found, task_dim and not bare)


def _by_graph(graphs: List[Graph], found, task_dim: bool) -> List[Tensors]:
    """One backward's gradients at the leaves of ``graphs`` (in their order), as one dict per graph by name: zeros where
    the backward did not reach a leaf, ``[1, ...]`` with ``task_dim``."""
    size = len(graphs[0].leaves)  # every graph is a point of the same adapted parameters
    return [dict(zip(graph.names, [m.unsqueeze(0) if task_dim else m
                                   for t, h in zip(graph.leaves, found[i * size:(i + 1) * size])
                                   for m in [torch.zeros_like(t) if h is None else h]]))
            for i, graph in enumerate(graphs)]


def chain_adjoints(graphs: List[Graph], g: Tensors, others: Sequence[torch.Tensor] = ()
                   ) -> Tuple[List[Tensors], Tuple[Optional[torch.Tensor], ...]]:
    """The adjoints ``dL/dphi_j`` at the leaves of each of ``graphs``, a chain of consecutive steps (each after the
    first ``chained`` to the one before, the last with its ``out``), for ``g = dL/dphi_K`` at the last ``out``: one
    backward through the whole chain, the computation unrolled autograd makes (``H_j`` applied to ``-lr`` times the
    adjoint, the direct path added where the two meet). One task: ``g`` and the adjoints without the task axis, as
    the graphs' tensors are; the graphs stay. ``others``: other meta-parameters the steps' gradients depend on (a
    body's features), whose gradients the same backward takes (``None`` where unreached): the sum of every step's
    mixed term, as unrolled autograd sums them."""
    names, last = graphs[0].names, graphs[-1].out
    assert last is not None and all(graph.chained for graph in graphs[1:]), "not a chain of kept graphs"
    leaves = [t for graph in graphs for t in graph.leaves]
    found = backprop.grad(last, [*leaves, *others], [g[n] for n in names], retain_graph=True)
    return _by_graph(graphs, found[:len(leaves)], task_dim=False), tuple(found[len(leaves):])


class Trajectory:
    """A finished inner loop of ``B`` tasks: what one meta-gradient reads.

    Args:
        stored: per step, a :class:`Stored` point (every step, or every ``every``-th one).
        loss_fns: the support loss of each step, ``loss(phi, task)`` for one task.
        losses: the support loss of every task at every step, ``[K, B]``.
        final: ``phi_K``, read lazily (:attr:`final`; one task's checks read ``final_task``).
        stepper: what took the steps; recomputes gradients and, with checkpoints, whole segments.
        every: the checkpoint interval (1: every point is stored).
        keep_grads: whether recomputed segments keep their gradients (for transposes that read them).
        keys: what identifies each step's support loss across adaptations (the same closure of the same model), so
            that a measurement of its activations is taken once (``None``: not known).
        graphs: the :class:`Graph` of the steps that kept theirs (one task), until :meth:`release`.
        final_task: one task without data: ``phi_K`` without the task axis (the node's outputs, its inputs the initial
            parameters themselves), else ``None``.
    """

    def __init__(self, stored: List[Optional[Stored]], loss_fns: List[LossFn], losses: torch.Tensor,
                 final: Stored, stepper, every: int = 1, keep_grads: bool = True, keys: Optional[List[object]] = None,
                 graphs: Optional[Dict[int, Graph]] = None, final_task: Optional[Tensors] = None):
        self.stored, self.loss_fns, self.losses, self._final, self.final_task = stored, loss_fns, losses, final, final_task
        self.keys = keys or [None] * len(loss_fns)
        self.graphs = graphs or {}
        self.stepper, self.every, self.keep_grads = stepper, every, keep_grads
        self._segments: Dict[int, List[Tuple[Tensors, States, Tensors]]] = {}
        self._grads: Dict[int, Tensors] = {}
        # each recomputation's agreement with the inner loop, ``(start, stop, what, device bool)``: read with the
        # other checks of a meta-gradient (one host read), then raised by :func:`check_recomputed`
        self.recomputed: List[Tuple[int, int, str, torch.Tensor]] = []

    @property
    def steps(self) -> int:
        return len(self.loss_fns)

    @property
    def final(self) -> Tensors:
        """``phi_K`` with the task axis, ``[B, ...]`` (made when first read)."""
        return self._final.phi

    def point(self, k: int) -> Tensors:
        stored = self.stored[k]
        assert stored is not DROPPED, f"point {k} is outside the estimator's window"
        return stored.phi if stored is not None else self._segment(k)[k % self.every][0]

    def available(self, k: int) -> bool:
        """Whether point ``k`` can be read (points before the estimator's window are not kept)."""
        return self.stored[k] is not DROPPED

    def replays(self, k: int) -> bool:
        """Whether a meta-gradient may run step ``k``'s support loss again: its point is kept without its graph, or the
        transposes read its gradient (recomputed). A step whose kept graph serves every product replays nothing."""
        return self.available(k) and (k not in self.graphs or self.keep_grads)

    def points(self, lo: int, hi: int) -> Tensors:
        """``phi_lo .. phi_{hi-1}`` stacked, ``[hi - lo, B, ...]`` per entry."""
        at = [self.point(k) for k in range(lo, hi)]
        return {n: stack([p[n] for p in at]) for n in at[0]}

    def values(self, k: int) -> Tuple[Tensors, States, Tensors]:
        """``(phi_k, state_k, grad_k)``; the gradient is recomputed (and kept until :meth:`release`)."""
        if self.every > 1:
            return self._segment(k)[k % self.every]
        if k not in self._grads:
            self._grads[k] = self.stepper.gradient(self.loss_fns[k], self.stored[k].phi, k, context=self.context(k)).grads  # pyright: ignore[reportOptionalMemberAccess]  # every point is stored
        return self.stored[k].phi, self.stored[k].state or {}, self._grads[k]  # pyright: ignore[reportOptionalMemberAccess]

    def context(self, k: int):
        """The :class:`~binom_opt.core.context.StepContext` step ``k`` ran in, which its replays run in."""
        return self.stepper.contexts[k]

    def together(self, j: int, k: int) -> bool:
        """Whether steps ``j`` and ``k`` can be replayed in one batched call: one support loss, one context (or both
        kept graphs, which no call replays: a kept step records its start's random state whether or not it drew)."""
        return self.loss_fns[j] is self.loss_fns[k] and (
            (j in self.graphs and k in self.graphs) or self.context(j).joins(self.context(k)))

    def runs(self, lo: int, hi: int, split=frozenset()) -> List[Tuple[int, int, LossFn]]:
        """``(start, stop, loss_fn)`` for each run of consecutive steps in ``[lo, hi)`` that can be replayed
        together (:meth:`together`; with ``split``, all in it or all outside it): a step that drew random
        numbers is a run of its own, replayed from its own random state."""
        out: List[Tuple[int, int, LossFn]] = []
        for k in range(lo, hi):
            if out and self.together(k - 1, k) and ((k - 1) in split) == (k in split):
                out[-1] = (out[-1][0], k + 1, out[-1][2])
            else:
                out.append((k, k + 1, self.loss_fns[k]))
        return out

    def alone(self, b: int, tasks) -> Trajectory:
        """Task ``b``'s part of this trajectory (views, ``[.., 1, ...]``), recomputed for ``tasks`` (that task alone)."""
        pick = lambda tensors: {n: t[b : b + 1] for n, t in tensors.items()}
        stored = [s if s is None or s is DROPPED else
                  Stored(pick(s.phi), None if s.state is None else {n: pick(st) for n, st in s.state.items()})
                  for s in self.stored]
        return Trajectory(stored, self.loss_fns, self.losses[:, b : b + 1], Stored(pick(self.final)),
                          dataclasses.replace(self.stepper, tasks=tasks), self.every, self.keep_grads)

    def release(self) -> None:
        """Drop what was recomputed for one meta-gradient, and the kept graphs (a later estimator replays the steps)."""
        self._segments.clear()
        self._grads.clear()
        self.graphs.clear()

    def _segment(self, k: int) -> List[Tuple[Tensors, States, Tensors]]:
        start = k - k % self.every
        if start not in self._segments:
            self._segments.clear()  # the estimators walk the steps in order: one segment at a time
            self._segments[start] = self._recompute(start)
        return self._segments[start]

    def _recompute(self, start: int) -> List[Tuple[Tensors, States, Tensors]]:
        stop = min(start + self.every, self.steps)
        phi, state = self.stored[start].phi, self.stored[start].state or {}  # pyright: ignore[reportOptionalMemberAccess]  # a checkpoint
        out = []
        for k in range(start, stop):
            grads, losses, *_ = self.stepper.gradient(self.loss_fns[k], phi, k, context=self.context(k))
            out.append((phi, state, grads if self.keep_grads else {}))
            self.recomputed.append((start, stop, f"support loss at step {k}", _same(losses, self.losses[k])))
            phi, state = self.stepper.update(k, phi, state, grads)
        expected = self.final if stop == self.steps else self.stored[stop].phi  # pyright: ignore[reportOptionalMemberAccess]  # a checkpoint
        self.recomputed.append((start, stop, f"point {stop}", torch.stack([_same(phi[n], expected[n]) for n in phi]).all()))
        return out


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether ``a`` and ``b`` agree, a device bool (not read here): bitwise on the CPU; elsewhere up to the order
    of floating-point sums (GPU atomics)."""
    if a.device.type == "cpu":
        return (a == b).all()
    return torch.isclose(a, b, rtol=1e-5, atol=0.0, equal_nan=True).all()


def check_recomputed(recomputed: List[Tuple[int, int, str, torch.Tensor]], agreed: List[bool]) -> None:
    """Raise for the first recomputation (``Trajectory.recomputed``) that did not agree with the inner loop."""
    for (start, stop, what, _), same in zip(recomputed, agreed):
        if not same:
            raise _not_reproduced(start, stop, what)


def _not_reproduced(start: int, stop: int, what: str) -> RuntimeError:
    return RuntimeError(
        f"Recomputing inner steps {start}..{stop - 1} from their checkpoint (checkpoint_every) gave another {what} "
        "than the inner loop: the support loss is not deterministic (random ops, or data that changed after the "
        "inner loop). Make it deterministic, or leave checkpoint_every=None."
    )
