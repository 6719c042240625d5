"""The meta-gradient of a recorded inner loop: recorded trajectory -> expansion -> ``.grad``.

:meth:`Record.backward` is the one place a meta-gradient is computed: the replay check, the expansion (or the
implicit solve, or Reptile's direction), the NaN policy, the other meta-parameters, the stats, all read back
in one host read and checked (:mod:`~binom_opt.core.checks`) before anything is returned; the autograd node
that calls it is :class:`~binom_opt.core.adaptation.Adaptation` (docs/design.md, "What the node checks").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .adaptation import sum_present
from .batching import Tasks, along_tasks
from .checks import (
    all_finite,
    check_estimator_fits,
    check_inner_loop,
    check_replay,
    finite_flag,
    flags_from_norms,
    raise_bad_others,
    raise_bad_tasks,
    replay,
)
from .estimators import Estimator
from .expansion import ExpansionResult, expand
from .implicit import check_implicit, implicit_others, implicit_solve
from .memory import Chunking
from .mixed import MixedTerms, hyper_gradients
from .oracle import HVPOracle
from .readback import Readback
from .reductions import group_norms, nonfinite_groups, nonfinite_groups_and_norm
from .setup import Setup
from .stats import add_stats, merged, stats_when_due
from .trajectory import Trajectory, check_recomputed
from .update_rules import Hyper, StepTranspose, UpdateRule

Tensors = Dict[str, torch.Tensor]

__all__ = ["Status", "Record"]

# a meta-gradient: with respect to the initial point, the other meta-parameters, the learned hyperparameters
Gradients = Tuple[Tensors, Sequence[Optional[torch.Tensor]], List[torch.Tensor]]


@dataclass
class Status:
    finished: bool = False  # set once a meta-gradient went through the loop


@dataclass
class Record:
    """A snapshot of an inner loop: what one meta-gradient needs.

    It must not refer back to the recorder: the recorder holds the node's outputs, the node holds
    this record, and a cycle through an autograd node is never collected.
    """

    setup: Setup
    estimator: Estimator
    trajectory: Trajectory
    tasks: Tasks
    rules: Dict[str, UpdateRule]
    hyper: List[Dict[str, Hyper]]  # per step
    meta_inputs: List[torch.Tensor]
    hyper_inputs: List[Tuple[str, str, torch.Tensor]]
    status: Status
    initial: Tensors
    versions: Dict[str, int]
    first_order: frozenset = frozenset()  # steps whose Hessians are dropped
    proximal: Optional[float] = None  # the reg of the proximal term the inner loop added (Implicit)
    reads: Dict[int, Tuple[bool, Optional[float]]] = dataclasses.field(default_factory=dict)  # the recorder's, shared

    def backward(self, g: Tensors) -> Gradients:
        """The meta-gradient for the outer gradient ``g``: with respect to the initial point (``[B, ...]``), the
        other meta-parameters and the learned hyperparameters."""
        # every call of a support loss below takes the module policy in its own context (calls): a meta-gradient that
        # differentiates kept graphs, or FirstOrder's, calls none and pays none
        if self.tasks.loop and self.tasks.size > 1:
            return self._task_by_task(g)
        read, finish = self._compute(g)
        return finish(read.read())

    def _compute(self, g: Tensors) -> Tuple[Readback, Callable[[Dict[str, list]], Gradients]]:
        """Everything up to the host read: what to read, and what turns the host values into the result (the
        checks, raised in the order of their causes, and the stats)."""
        setup, options, K, B = self.setup, self.setup.options, self.trajectory.steps, self.tasks.size
        if setup.steps is not None and setup.steps != K:
            raise ValueError(
                f"This learner was adapted {K} time(s) but steps={setup.steps} was set: adapt exactly {setup.steps} "
                "times before computing the query loss (or leave steps=None)."
            )
        plan = self.estimator.plan(K)
        changed = [n for n, t in self.initial.items() if t._version != self.versions[n]]
        if changed:
            raise RuntimeError(
                f"The initial parameters {changed} were modified in place after the inner loop started (e.g. by "
                "optimizer.step()), so the recorded trajectory no longer starts from them. Compute the meta-gradient "
                "(backward) before changing the parameters."
            )
        check_estimator_fits(self.estimator, plan, self.proximal, self.hyper_inputs, self.meta_inputs)
        # Every check and the stats are read back at once (the one host sync of a meta-gradient, module
        # readback), then raised in the order of their causes: inner loop, replay, meta-gradient.
        read = Readback()
        read.add("losses", self.trajectory.losses)  # each step's loss; a non-finite gradient shows in the final point
        replayed = (replay(self.trajectory, self.tasks, options, read)
                    if (plan.levels > 0 or self.meta_inputs) and options.randomness != "different" else [])
        chunking = Chunking(options.chunk_size, options.memory_budget, inner_batch=B, device=next(iter(g.values())).device)
        oracle = HVPOracle(self.trajectory, self.tasks, options, chunking, self.first_order)
        transpose = StepTranspose(self.rules, self.hyper, self.trajectory.values, self.hyper_inputs, self.reads)
        stats_of = g if setup.on_stats is not None else None  # the outer gradient's norms, reduced with the checks
        try:
            if plan.schedule == "reptile":  # theta - phi_K per task; g only carries it
                final = self.trajectory.final
                result = ExpansionResult({n: self.initial[n].detach().unsqueeze(0) - final[n] for n in final})
                (bad, g_norms, flags), meta_grads, hyper_grads = self._bad_tasks(result, read, g=stats_of), [], []
            elif plan.schedule == "implicit":
                result = implicit_solve(self.estimator, g, oracle, read)
                bad, g_norms, flags = self._bad_tasks(result, read, g=stats_of)
                meta_grads, hyper_grads = implicit_others(self.estimator, result, oracle, self.trajectory, self.meta_inputs, read), []
            else:
                def expansion(drop: Optional[torch.Tensor] = None) -> Tuple[ExpansionResult, Optional[MixedTerms]]:
                    mixed = (MixedTerms(oracle, transpose, plan.hessian_scale, self.meta_inputs, self.first_order, drop)
                             if self.meta_inputs else None)
                    with torch.no_grad():
                        result = expand(plan, g, transpose, oracle, steps=K, on_adjoint=None if mixed is None else mixed.add,
                                        with_full_adjoints=bool(self.hyper_inputs), others=mixed.meta_inputs if mixed else ())
                    return result, mixed if mixed is None or result.others is None else mixed.taken(result.others)

                result, mixed = expansion()
                bad, g_norms, flags = self._bad_tasks(result, read, None if mixed is None else mixed.bad, stats_of)
                meta_grads, hyper_grads = self._other_gradients(result, bad, mixed, expansion, transpose, read)
            if g_norms is not None:  # with stats
                add_stats(read, g_norms, result.contributions)
            elif result.contributions is not None:  # the round a non-finite meta-gradient first showed in, for the error
                read.add("contributions", result.contributions)
        finally:
            self.trajectory.release()
        recomputed, self.trajectory.recomputed = self.trajectory.recomputed, []
        if recomputed:
            read.add("recomputed", torch.stack([same for *_, same in recomputed]))

        def finish(host: Dict[str, list]) -> Gradients:
            flags(host)
            check_inner_loop(host, self.tasks, list(self.initial), self.trajectory)
            check_replay(host, replayed, self.tasks)
            check_recomputed(recomputed, host.get("recomputed", []))
            residual, unsolved = (check_implicit(host, self.estimator, self.tasks, options.nan_policy)
                                  if plan.schedule == "implicit" else (None, ()))
            raise_bad_tasks(host, self.tasks, options.nan_policy)
            raise_bad_others(host)
            self.status.finished = True
            if setup.on_stats is not None:  # made from host values, when due
                setup.on_stats(stats_when_due(self.estimator, plan, host, B, oracle.computed, chunking, int(sum(host["bad"])), residual, unsolved))
            return result.meta_grad, meta_grads, hyper_grads

        return read, finish

    def _task_by_task(self, g: Tensors) -> Gradients:
        """The CPU plan (:attr:`Tasks.loop`): each task's meta-gradient computed whole, as a meta-batch of its own,
        before the next task's, so that one task's adjoints, HVP rounds and recomputed gradients live at a time,
        as in a loop over per-task meta-steps (not ``B`` of each). Per-task results are concatenated, the other
        meta-parameters' summed and the stats merged."""
        stats: List = []
        setup = dataclasses.replace(self.setup, on_stats=None if self.setup.on_stats is None else stats.append)
        # Task data that requires grad (a body's features, computed for the whole meta-batch) is cut at each
        # task's slice: each task's mixed terms stop there, and one backward takes them through that graph.
        shared = self.tasks.requiring_grad() if self.meta_inputs else []
        pending = []
        for b in range(self.tasks.size):
            tasks = self.tasks.alone(b, detach=bool(shared))
            one = dataclasses.replace(self, setup=setup, trajectory=self.trajectory.alone(b, tasks), tasks=tasks,
                                      meta_inputs=[*self.meta_inputs, *tasks.requiring_grad()])
            pending.append(one._compute({n: t[b : b + 1] for n, t in g.items()}))
        # every task's checks and stats in one host read, as for the vmapped meta-batch
        hosts = Readback.read_all([read for read, _ in pending])
        parts = [finish(host) for (_, finish), host in zip(pending, hosts)]
        if self.setup.on_stats is not None:
            self.setup.on_stats(merged(stats))
        count = len(self.meta_inputs)
        others = [sum_present(grads) for grads in zip(*(o[:count] for _, o, _ in parts))]
        if shared:
            data_grads = self.tasks.through_data([others_b[count:] for _, others_b, _ in parts], self.meta_inputs)
            others = [sum_present(pair) for pair in zip(others, data_grads)]
        return ({n: torch.cat([meta_grad[n] for meta_grad, _, _ in parts]) for n in g}, others,
                [sum_present(grads) for grads in zip(*(hyper for _, _, hyper in parts))])  # pyright: ignore[reportReturnType]  # hyper gradients exist

    def _bad_tasks(self, result: ExpansionResult, read: Readback, bad_adjoints: Optional[torch.Tensor] = None,
                   g: Optional[Tensors] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Callable[[dict], None]]:
        """Adds to ``read`` the tasks whose inner loop ended at a non-finite point and those whose meta-gradient (or an
        adjoint, ``bad_adjoints``) is not finite, ``[B]`` each. Under ``nan_policy="skip_task"`` the latter are zeroed
        without reading them first and their flags returned (``None`` under ``"raise"``), with the norms of the outer
        gradient ``g`` where it is given (for the stats: reduced with the flags; else ``None``), and what turns the host
        values into the flags (one task's come as norms, :func:`~binom_opt.core.checks.flags_from_norms`)."""
        vectors = [result.meta_grad, *result.full_adjoints.values()]
        final = self.trajectory.final_task or self.trajectory.final  # one task's without the axis it would be given here
        groups = [list(final.values()), [t for tensors in vectors for t in tensors.values()]]
        raising = self.setup.options.nan_policy == "raise"
        # g's norm is the last group's: its own, or the meta-gradient's where that is g itself (FirstOrder's)
        own = g is not None and (len(vectors) > 1 or len(result.meta_grad) != len(g) or any(result.meta_grad.get(n) is not t for n, t in g.items()))
        norms = group_norms(groups + ([list(g.values())] if own else []), self.tasks.size) if raising else None  # pyright: ignore[reportOptionalMemberAccess]  # own: g is given
        if norms is not None:  # flags and norms in one operator
            read.add("group_norms", norms[:2])
            if bad_adjoints is not None:
                read.add("bad_adjoints", bad_adjoints)
            return None, None if g is None else norms[-1:].view(1, 1), lambda host: flags_from_norms(host, *groups)
        if g is None:
            (final_bad, bad), g_norms = nonfinite_groups(groups, self.tasks.size), None
        else:
            (final_bad, bad), g_norms = nonfinite_groups_and_norm(groups, g.values(), self.tasks.size)
        read.add("final_bad", final_bad)
        if bad_adjoints is not None:
            bad = bad | bad_adjoints
        read.add("bad", bad)
        if raising:
            return None, g_norms, _flags_read
        for tensors in vectors:
            for n, t in tensors.items():
                tensors[n] = torch.where(along_tasks(bad, t), torch.zeros_like(t), t)
        return bad, g_norms, _flags_read

    def _other_gradients(self, result: ExpansionResult, bad: Optional[torch.Tensor], mixed: Optional[MixedTerms],
                         expansion: Callable, transpose: StepTranspose, read: Readback):
        meta_grads = [] if mixed is None else mixed.totals()
        hyper_grads = hyper_gradients(transpose, result.full_adjoints)
        if mixed is not None and bad is not None:  # nan_policy="skip_task"
            def without(drop: torch.Tensor) -> List[Optional[torch.Tensor]]:
                return expansion(drop)[1].totals()

            if bool(bad.any()):  # the sums streamed during the expansion hold the dropped tasks' terms: sum again without them
                meta_grads = without(bad)
            if not all_finite(meta_grads):  # a mixed term overflowed with finite adjoints: which tasks, one at a time (rare)
                for b in range(self.tasks.size):
                    if not bool(bad[b]):
                        bad[b] = not all_finite(without(torch.arange(len(bad), device=bad.device) != b))
                result.meta_grad = {n: torch.where(along_tasks(bad, t), torch.zeros_like(t), t) for n, t in result.meta_grad.items()}
                meta_grads = without(bad)
        finite = finite_flag([*meta_grads, *hyper_grads])
        if finite is not None:  # raised after the checks of earlier causes (inner loop, replay), as they are read at once
            read.add("others_bad", ~finite)
        return meta_grads, hyper_grads


def _flags_read(host: Dict[str, list]) -> None:
    """The flags were read as they are (a meta-batch's, or under ``nan_policy="skip_task"``)."""
