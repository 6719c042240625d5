"""Hessian-vector products at recorded trajectory points, over steps x tasks in one call.

One HVP (``Options.hvp``: ``vjp`` or ``jvp`` of ``grad``) written for one task at one point, lifted
over the requested points and the tasks, chunked by :class:`~binom_opt.core.memory.Chunking`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.func import grad, jvp, vjp

from .batching import Tasks, map_points
from .calls import calls
from .memory import AUTO, ActivationBytes, Chunking, activation_bytes, measured_once
from .options import Options
from .trajectory import Graph, Trajectory, chain_adjoints, products

Tensors = Dict[str, torch.Tensor]
LossFn = Callable[[Tensors, object], torch.Tensor]

__all__ = ["hvp_function", "plain_hvp", "support_activations", "HVPOracle"]


def hvp_function(loss_fn: LossFn, mode: str, adds: bool = False) -> Callable[..., Tensors]:
    """``hvp(point, vector, task) -> H(point) @ vector`` for the scalar ``loss_fn(point, task)`` of one task; with
    ``adds``, ``hvp(point, vector, first, task) -> first + H(point) @ vector``.

    Example:
        >>> f = lambda p, task: (p["w"] ** 3).sum()           # Hessian diag(6 w)
        >>> hvp_function(f, "rev")({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}, None)["w"]
        tensor([ 6., 12.])
    """
    if mode == "rev":
        hvp = lambda point, vector, task: vjp(lambda p: grad(loss_fn)(p, task), point)[1](vector)[0]
    else:
        hvp = lambda point, vector, task: jvp(lambda p: grad(loss_fn)(p, task), (point,), (vector,))[1]
    if not adds:
        return hvp
    return lambda point, vector, first, task: {n: first[n] + h for n, h in hvp(point, vector, task).items()}


def plain_hvp(loss_fn: LossFn, adds: bool = False) -> Callable[..., Tensors]:
    """:func:`hvp_function`'s reverse-over-reverse product with plain autograd, for a call that is not lifted (one
    point of one task): the same double backward, without ``torch.func``'s per-call wrapping of every tensor; with
    ``adds``, ``first`` is added in that backward, as a kept graph's product adds it (:func:`products`).

    >>> f = lambda p, task: (p["w"] ** 3).sum()
    >>> plain_hvp(f)({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])}, None)["w"]
    tensor([ 6., 12.])
    """
    if adds:
        return lambda point, vector, first, task: Graph.at(loss_fn, point, task).hvp(vector, first)
    return lambda point, vector, task: Graph.at(loss_fn, point, task).hvp(vector)  # a kept graph's product, replayed


def support_activations(loss_fn: LossFn, point: Tensors, task, options: Options, context, key: object,
                        fallback: Optional[ActivationBytes] = None) -> ActivationBytes:
    """The activation bytes of one gradient and one HVP of ``loss_fn(point, task)`` in the step's ``context``, measured
    once per support loss ``key`` and shapes (:func:`~binom_opt.core.memory.measured_once`); ``fallback``, if given,
    stands for a measurement that failed (the error is then raised where the support loss runs next)."""
    def measure() -> ActivationBytes:
        try:
            with calls(options, context, "the measurement of one HVP's memory"):
                return activation_bytes(lambda p: loss_fn(p, task), point)
        except RuntimeError:
            if fallback is None:
                raise
            return fallback

    return measured_once(key, point, task, measure)


class HVPOracle:
    """``oracle(steps, vectors)``: ``H_j v_j`` for each step ``j`` of the ``range`` and every task.

    ``vectors`` and the result are stacked ``[len(steps), B, ...]``. Consecutive steps with the same
    support loss and context run in one lifted call, in that context (a step that drew random numbers
    alone, from its own random state); ``chunking`` caps how many HVPs run at once (its
    ``used``, ``per_hvp_bytes`` and ``fallbacks`` tell what ran). Products that run one at a time (kept graphs,
    one task's points one by one: :meth:`listed`) are taken as a list by :meth:`each`, never stacked.
    """

    def __init__(self, trajectory: Trajectory, tasks: Tasks, options: Options, chunking: Chunking, zero=frozenset()):
        self.trajectory, self.tasks, self.options, self.chunking, self.zero = trajectory, tasks, options, chunking, zero
        self._hvps: Dict[tuple, tuple] = {}  # per support loss and whether it adds: its lifted HVP and its plain one
        # "auto" with one task at a time: a round's points run one by one with plain autograd, the computation a kept
        # graph's product is (memory.keeps_graphs), so that kept and replayed steps give the same bits (checkpointed
        # or not, a meta-batch's CPU plan or its tasks one by one); one HVP's activations at a time. Not under
        # randomness="same", whose points replay one stream together (vmap's "same"), where a loop would draw on
        self.one_by_one = (options.memory_budget == AUTO and tasks.at_once == 1 and options.hvp_mode == "rev"
                           and not options.compile_hvps and options.randomness != "same")
        self.computed = 0  # HVPs per task actually taken (steps in ``zero`` have H = 0 and cost nothing)

    def __call__(self, steps: range, vectors: Tensors, first: Optional[Tensors] = None) -> Tensors:
        parts = []
        for lo, hi, loss_fn in self.trajectory.runs(steps.start, steps.stop, split=self.zero):
            at = {n: t[lo - steps.start : hi - steps.start] for n, t in vectors.items()}
            before = None if first is None else {n: t[lo - steps.start : hi - steps.start] for n, t in first.items()}
            if lo in self.zero:
                parts.append({n: torch.zeros_like(t) for n, t in at.items()} if before is None else before)
                continue
            parts.append(self._lifted(loss_fn, lo, lambda lo=lo, hi=hi: self.trajectory.points(lo, hi), at,
                                      f"the Hessian-vector products at steps {lo}..{hi - 1}", before))
        return parts[0] if len(parts) == 1 else {n: torch.cat([p[n] for p in parts]) for n in parts[0]}

    def listed(self, steps: range) -> bool:
        """Whether :meth:`each` takes the products at ``steps`` one at a time: kept graphs, or one task's points one by
        one (a round is then never stacked: no copy of its points or vectors)."""
        return self.kept(steps) or (self.one_by_one and not self.tasks.batched)

    def replays_alone(self, steps: range) -> bool:
        """Whether one task's points at ``steps`` are replayed one at a time, with no kept graph among them (whose
        products one backward takes together): a round may then ask :meth:`each` for one product at a time."""
        return self.one_by_one and not self.tasks.batched and not any(j in self.trajectory.graphs for j in steps)

    def each(self, steps: range, vectors: List[Tensors], first: Optional[List[Tensors]] = None, bare: bool = False
             ) -> List[Tensors]:
        """``H_j v_j`` (``first_j + H_j v_j``) for each step of ``steps`` (:meth:`listed`), as a list: from kept graphs
        (:meth:`from_graphs`), else each point replayed alone with plain autograd, the product a kept graph gives; one
        task's ``[1, ...]`` vectors in and products out (without the task axis where ``bare``). Neither the points nor
        the vectors are stacked, and each product is a tensor of its own: a caller that drops a product as soon as it
        has used it holds no more than one round's products."""
        out: List[Tensors] = []
        for lo, hi, loss_fn in self.trajectory.runs(steps.start, steps.stop, split=self.zero):
            at = vectors[lo - steps.start : hi - steps.start]
            before = None if first is None else first[lo - steps.start : hi - steps.start]
            if lo in self.zero:  # H = 0
                made = before if before is not None else [{n: torch.zeros_like(t) for n, t in v.items()} for v in at]
                out += [_one(m) for m in made] if bare else made
            elif self.kept(range(lo, hi)):
                out += self.from_graphs(range(lo, hi), at, before, bare)
            else:
                self.computed += hi - lo
                self.chunking.used = 1
                hvp = plain_hvp(loss_fn, adds=before is not None)  # each point's graph freed before the next is built
                with calls(self.options, self.trajectory.context(lo), f"the Hessian-vector products at steps {lo}..{hi - 1}"):
                    for i, k in enumerate(range(lo, hi)):
                        given = [at[i]] if before is None else [at[i], before[i]]
                        made = hvp(_one(self.trajectory.point(k)), *map(_one, given), None)
                        out.append(made if bare else {n: t.unsqueeze(0) for n, t in made.items()})
        return out

    def adds(self, steps: range) -> bool:
        """Whether the products at ``steps`` run with plain autograd (kept graphs, or points one by one), whose backward
        adds a vector to each product as the chain's does (``first``): elsewhere a sum after it is one call for every
        entry, where the backward's would be one per entry."""
        return self.one_by_one or self.kept(steps)

    def kept(self, steps: range) -> bool:
        """Whether every step of ``steps`` has a kept graph (and a Hessian): :meth:`from_graphs` can take them."""
        return all(j in self.trajectory.graphs and j not in self.zero for j in steps)

    def from_graphs(self, steps: range, vectors: List[Tensors], first: Optional[List[Tensors]] = None, bare: bool = False
                    ) -> List[Tensors]:
        """``H_j v_j`` (``first_j + H_j v_j``) from the kept graphs of ``steps`` (one task: ``[1, ...]`` vectors in and
        out, or out without the task axis where ``bare``), in one backward, without stacking a round's vectors into
        ``[n, B, ...]`` and back."""
        self.computed += len(steps)
        self.chunking.used = 1
        graphs = [self.trajectory.graphs[j] for j in steps]
        with calls(self.options, None, f"the Hessian-vector products at steps {steps.start}..{steps.stop - 1}", modules=False):
            return products(graphs, vectors, task_dim=True, first=first, bare=bare)

    def chain(self, steps: range, g: Tensors, others: Sequence[torch.Tensor] = ()
              ) -> Optional[Tuple[List[Tensors], Tuple[Optional[torch.Tensor], ...]]]:
        """The adjoints at the points of ``steps`` (the last steps) for ``g`` at the final point, in one backward through
        their kept graphs chained by their updates (:func:`~binom_opt.core.trajectory.chain_adjoints`), where the
        inner loop chained them (kept plain-SGD steps with a Hessian, every parameter with a gradient), and the
        gradients of ``others`` from it (the mixed terms of other meta-parameters, summed); else ``None``. One task's
        vectors, in and out without the task axis."""
        graphs = [self.trajectory.graphs.get(j) for j in steps]
        if (not graphs or steps.stop != self.trajectory.steps or not all(graphs) or any(j in self.zero for j in steps)
                or graphs[-1].out is None or not all(graph.chained for graph in graphs[1:])):  # pyright: ignore[reportOptionalMemberAccess]  # all kept
            return None
        self.computed += len(steps)
        self.chunking.used = 1
        with calls(self.options, None, f"the Hessian-vector products at steps {steps.start}..{steps.stop - 1}", modules=False):
            return chain_adjoints(graphs, g, others)  # pyright: ignore[reportArgumentType]  # all kept

    def at_final(self, vectors: Tensors) -> Tensors:
        """``H(phi_K) v`` for every task (``[B, ...]`` in and out), with the last step's support loss."""
        K = self.trajectory.steps
        final = {n: t.unsqueeze(0) for n, t in self.trajectory.final.items()}
        out = self._lifted(self.trajectory.loss_fns[-1], K - 1, lambda: final, {n: v.unsqueeze(0) for n, v in vectors.items()},
                           "the Hessian-vector products at the adapted point")
        return {n: t.squeeze(0) for n, t in out.items()}

    def _lifted(self, loss_fn, measured_at: int, points, at: Tensors, during: str, first: Optional[Tensors] = None) -> Tensors:
        """One lifted, chunked call of the HVP of ``loss_fn`` over ``points()`` x tasks (``[n, B, ...]``), added to
        ``first`` where given."""
        adds = first is not None
        hvp, plain = self._hvps.setdefault((id(loss_fn), adds), (hvp_function(loss_fn, self.options.hvp_mode, adds),
                                                                 plain_hvp(loss_fn, adds) if self.options.hvp_mode == "rev" else None))
        count = next(iter(at.values())).shape[0]
        self.computed += count

        def call(limit):
            with calls(self.options, self.trajectory.context(measured_at), during):
                return map_points(hvp, (points(), at) if first is None else (points(), at, first), self.tasks,
                                  self.options.randomness, limit, self.options.compile_hvps, plain=plain)

        if self.one_by_one:  # a task's points one at a time with plain autograd: each its own HVP, as from a kept graph
            self.chunking.used = 1
            return call(1)
        return self.chunking.run(count * self.tasks.at_once, lambda: self.measure(loss_fn, measured_at), call)

    def measure(self, loss_fn: LossFn, step: int):
        """The activation bytes of one gradient and one HVP of the first task at ``step``."""
        return support_activations(loss_fn, {n: t[0] for n, t in self.trajectory.point(step).items()}, self.tasks.first(),
                                   self.options, self.trajectory.context(step), self.trajectory.keys[step])


def _one(tensors: Tensors) -> Tensors:
    """One task's tensors without their task axis."""
    return {n: t.squeeze(0) for n, t in tensors.items()}
