"""The autograd node whose backward is the estimator: recorded trajectory -> expansion -> ``.grad``.

:meth:`Record.backward` is the one place a meta-gradient is computed: the replay check, the
expansion, the NaN policy, the other meta-parameters, the stats, in that order, all checked
before anything is returned (docs/design.md, "What the node checks").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, AbstractSet, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from .batching import Tasks, along_tasks, calls, over_tasks
from .estimators import Estimator
from .expansion import ExpansionResult, expand, nonfinite_tasks, task_norms
from .implicit import conjugate_gradient
from .memory import Chunking
from .mixed import MixedTerms, directional_gradients, hyper_gradients
from .norm_layers import module_policy
from .oracle import HVPOracle
from .readback import Readback
from .stats import make_stats, merge_stats, stats_tensor
from .trajectory import Trajectory, check_recomputed
from .update_rules import Hyper, StepTranspose, UpdateRule

if TYPE_CHECKING:  # the recorder imports this module
    from .recorder import Setup

Tensors = Dict[str, torch.Tensor]

__all__ = ["ImplicitSolveWarning", "Status", "Record", "Adaptation", "meta_backward", "check_scalar_loss", "depends_on_adaptation",
           "leaves_requiring_grad"]


class ImplicitSolveWarning(RuntimeWarning):
    """Conjugate gradient for an implicit meta-gradient met negative curvature or did not reduce the residual."""


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
    inner_bad: torch.Tensor  # [K, 1 + entries, B]: each step's loss, then each gradient, not finite
    first_order: frozenset = frozenset()  # steps whose Hessians are dropped
    proximal: Optional[float] = None  # the reg of the proximal term the inner loop added (Implicit)

    def backward(self, g: Tensors) -> Gradients:
        """The meta-gradient for the outer gradient ``g``: with respect to the initial point (``[B, ...]``), the
        other meta-parameters and the learned hyperparameters."""
        with module_policy(self.setup.options.bn):  # entered once: every replay below nests in it at no cost
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
        self._check_estimator_fits(plan)
        # Every check and the stats are read back at once (the one host sync of a meta-gradient, module
        # readback), then raised in the order of their causes: inner loop, replay, meta-gradient.
        read = Readback()
        read.add("inner_bad", self.inner_bad)
        read.add("losses", self.trajectory.losses)
        replayed = self._replay(read) if (plan.levels > 0 or self.meta_inputs) and options.randomness != "different" else []
        chunking = Chunking(options.chunk_size, options.memory_budget, inner_batch=B, device=next(iter(g.values())).device)
        oracle = HVPOracle(self.trajectory, self.tasks, options, chunking, self.first_order)
        transpose = StepTranspose(self.rules, self.hyper, self.trajectory.values)
        try:
            if plan.schedule == "reptile":  # theta - phi_K per task; g only carries it
                final = self.trajectory.final
                result = ExpansionResult({n: self.initial[n].detach().unsqueeze(0) - final[n] for n in final})
                bad, meta_grads, hyper_grads = self._bad_tasks(result, read), [], []
            elif plan.schedule == "implicit":
                result = self._implicit(g, oracle, read)
                bad = self._bad_tasks(result, read)
                meta_grads, hyper_grads = self._implicit_others(result, oracle, read), []
            else:
                def expansion(drop: Optional[torch.Tensor] = None) -> Tuple[ExpansionResult, Optional[MixedTerms]]:
                    mixed = (MixedTerms(oracle, transpose, plan.hessian_scale, self.meta_inputs, self.first_order, drop)
                             if self.meta_inputs else None)
                    with torch.no_grad():
                        return expand(plan, g, transpose, oracle, steps=K, on_adjoint=None if mixed is None else mixed.add,
                                      with_full_adjoints=bool(self.hyper_inputs)), mixed

                result, mixed = expansion()
                bad = self._bad_tasks(result, read, None if mixed is None else mixed.bad)
                meta_grads, hyper_grads = self._other_gradients(result, bad, mixed, expansion, transpose, read)
            if setup.on_stats is not None:
                read.add("stats", stats_tensor(task_norms(g), result.contributions, self.trajectory.losses))
        finally:
            self.trajectory.release()
        recomputed, self.trajectory.recomputed = self.trajectory.recomputed, []
        if recomputed:
            read.add("recomputed", torch.stack([same for *_, same in recomputed]))

        def finish(host: Dict[str, list]) -> Gradients:
            self._check_inner_loop(host)
            self._check_replay(host, replayed)
            check_recomputed(recomputed, host.get("recomputed", []))
            residual, unsolved = self._check_implicit(host) if plan.schedule == "implicit" else (None, ())
            self._raise_bad_tasks(host)
            if host.get("implicit_others_bad", 0.0):
                raise FloatingPointError(
                    "The implicit meta-gradient of a meta-parameter other than the initialisation is not finite: raise reg "
                    "or check the data."
                )
            if host.get("others_bad", 0.0):
                raise FloatingPointError(
                    "The meta-gradient of a meta-parameter other than the initialisation (a tensor the support loss uses, "
                    "or a learned learning rate) is not finite: lower the inner learning rate or check the data."
                )
            self.status.finished = True
            if setup.on_stats is not None:
                skipped = int(sum(host["bad"]))
                setup.on_stats(make_stats(self.estimator, plan, host["stats"], B, len(result.contributions), oracle.computed,
                                          chunking, skipped, residual, unsolved))
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
                                      inner_bad=self.inner_bad[..., b : b + 1], meta_inputs=[*self.meta_inputs, *tasks.requiring_grad()])
            pending.append(one._compute({n: t[b : b + 1] for n, t in g.items()}))
        # every task's checks and stats in one host read, as for the vmapped meta-batch
        hosts = Readback.read_all([read for read, _ in pending])
        parts = [finish(host) for (_, finish), host in zip(pending, hosts)]
        if self.setup.on_stats is not None:
            self.setup.on_stats(merge_stats(stats))
        count = len(self.meta_inputs)
        others = [sum_present(grads) for grads in zip(*(o[:count] for _, o, _ in parts))]
        if shared:
            data_grads = self.tasks.through_data([others_b[count:] for _, others_b, _ in parts], self.meta_inputs)
            others = [sum_present(pair) for pair in zip(others, data_grads)]
        return ({n: torch.cat([meta_grad[n] for meta_grad, _, _ in parts]) for n in g}, others,
                [sum_present(grads) for grads in zip(*(hyper for _, _, hyper in parts))])  # pyright: ignore[reportReturnType]  # hyper gradients exist

    def _check_estimator_fits(self, plan) -> None:
        """Refuse an estimator this recorded loop cannot serve: another proximal term, or inputs it has no meta-gradient for."""
        wanted = self.estimator.reg if plan.schedule == "implicit" else None  # pyright: ignore[reportAttributeAccessIssue]  # Implicit's schedule
        if self.proximal != wanted:
            recorded = "without the proximal term" if self.proximal is None else f"with Implicit's proximal term (reg={self.proximal})"
            raise ValueError(
                f"This inner loop was recorded {recorded}, but its meta-gradient was asked of {self.estimator!r}: Implicit's "
                "inner loop minimises the support loss plus reg/2 ||phi - theta||^2, so it is a different loop. Adapt with the "
                "estimator the meta-gradient uses."
            )
        if plan.schedule in ("implicit", "reptile") and self.hyper_inputs:
            raise ValueError(
                f"{self.estimator!r} has no meta-gradient for learned learning rates: at the fixed point Implicit "
                "differentiates they do not matter, and Reptile is not a gradient. Use another estimator, or leave the "
                "learning rates fixed (requires_grad=False)."
            )
        if plan.schedule == "reptile" and self.meta_inputs:
            raise ValueError(
                "Reptile() gives a direction to the adapted parameters only, but the support loss also uses "
                f"{len(self.meta_inputs)} other tensor(s) that require grad (the model's parameters that do not adapt, such "
                "as an ANIL body, or features computed outside the closure). Adapt every parameter the support loss uses, "
                "detach the others, or use another estimator."
            )

    def _implicit(self, g: Tensors, oracle: HVPOracle, read: Readback) -> ExpansionResult:
        """Solve ``(I + H/reg) x = g`` at ``phi_K`` by conjugate gradient; its breakdowns go to ``read``, for
        :meth:`_check_implicit`."""
        reg = self.estimator.reg  # pyright: ignore[reportAttributeAccessIssue]  # Implicit here
        with torch.no_grad():  # the recorded loss is the proximal one: its Hessian is H + reg I
            cg = conjugate_gradient(lambda v: {n: t / reg for n, t in oracle.at_final(v).items()}, g, self.estimator.cg_steps)  # pyright: ignore[reportAttributeAccessIssue]
        tol = self.estimator.tol  # pyright: ignore[reportAttributeAccessIssue]  # Implicit here
        read.add("cg_residual", cg.residual)
        read.add("cg_negative", cg.negative_curvature)
        read.add("cg_failed", cg.negative_curvature | ~torch.isfinite(cg.residual) | (cg.residual > (float("inf") if tol is None else tol)))
        return ExpansionResult(cg.x, contributions=cg.residuals)

    def _check_implicit(self, host: Dict[str, list]) -> Tuple[float, Tuple[int, ...]]:
        """Raise or warn when conjugate gradient broke down; the largest relative residual and the tasks it failed."""
        tol = self.estimator.tol  # pyright: ignore[reportAttributeAccessIssue]  # Implicit here
        residuals, negative = host["cg_residual"], host["cg_negative"]
        unsolved = tuple(b for b, failed in enumerate(host["cg_failed"]) if failed)
        if unsolved:
            residual = _max([residuals[b] for b in unsolved])
            why = ("met negative curvature (H + reg I is not positive definite at the adapted point)"
                   if any(negative) else f"left a residual above tol={tol}")
            message = (f"{self.estimator!r}: conjugate gradient {why}{self._naming(unsolved)}; relative residual "
                       f"||g - (I + H/reg) x|| / ||g|| = {residual:.3g}, so the implicit meta-gradient is unreliable. Raise "
                       "reg or cg_steps, take more inner steps (the inner loop must reach the proximal minimum), or use "
                       "another estimator.")
            if self.setup.options.nan_policy == "raise":
                raise FloatingPointError(message + " (with nan_policy='skip_task' this is a warning)")
            warnings.warn(message, ImplicitSolveWarning, stacklevel=2)
        return _max(residuals), unsolved

    def _implicit_others(self, result: ExpansionResult, oracle: HVPOracle, read: Readback):
        """``-d/dc <grad F(phi_K, c), x> / reg`` for the other meta-parameters ``c`` (the proximal term has no ``c``);
        ``x`` is already zero for the tasks :meth:`_bad_tasks` dropped."""
        if not self.meta_inputs:
            return []
        weight = {n: -t / self.estimator.reg for n, t in result.meta_grad.items()}  # pyright: ignore[reportAttributeAccessIssue]  # Implicit here
        final = {n: t.unsqueeze(0) for n, t in self.trajectory.final.items()}
        grads = directional_gradients(oracle, self.trajectory.loss_fns[-1], final, {n: t.unsqueeze(0) for n, t in weight.items()},
                                      self.meta_inputs, "the mixed second-order terms at the adapted point",
                                      self.trajectory.context(self.trajectory.steps - 1))
        finite = _finite_flag(grads)
        if finite is not None:
            read.add("implicit_others_bad", ~finite)
        return grads

    def _bad_tasks(self, result: ExpansionResult, read: Readback, bad_adjoints: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tasks whose meta-gradient (or an adjoint, ``bad_adjoints``) is not finite, ``[B]`` on the device, added
        to ``read``; under ``nan_policy="skip_task"`` they are zeroed (and their adjoints) without reading them first."""
        vectors = [result.meta_grad, *result.full_adjoints.values()]
        bad = torch.zeros(self.tasks.size, dtype=torch.bool, device=next(iter(result.meta_grad.values())).device)
        if bad_adjoints is not None:
            bad |= bad_adjoints
        for tensors in vectors:
            bad |= nonfinite_tasks(tensors)
        read.add("bad", bad)
        if self.setup.options.nan_policy == "raise":  # which round went bad first, for the message
            finite = [torch.isfinite(c).all() for c in result.contributions]
            if finite:
                read.add("finite_rounds", torch.stack(finite))
            return bad
        for tensors in vectors:
            for n, t in tensors.items():
                tensors[n] = torch.where(along_tasks(bad, t), torch.zeros_like(t), t)
        return bad

    def _raise_bad_tasks(self, host: Dict[str, list]) -> None:
        """Under ``nan_policy="raise"``, raise for the tasks whose meta-gradient is not finite."""
        flags = host["bad"]
        if self.setup.options.nan_policy != "raise" or not any(flags):
            return
        rounds = [r + 1 for r, ok in enumerate(host.get("finite_rounds", [])) if not ok]
        where = f"in HVP round {rounds[0]}" if rounds else "in the outer-loss gradient"
        raise FloatingPointError(
            f"The meta-gradient is not finite{self._naming([b for b, f in enumerate(flags) if f])} (first seen {where}): "
            "the Hessian-vector products overflowed or the query loss is NaN/Inf. Lower the inner learning rate, use a "
            "smaller L, or check the data (nan_policy='skip_task' drops such tasks)."
        )

    def _other_gradients(self, result: ExpansionResult, bad: torch.Tensor, mixed: Optional[MixedTerms], expansion: Callable,
                         transpose: StepTranspose, read: Readback):
        meta_grads = [] if mixed is None else mixed.totals()
        hyper_grads = hyper_gradients(transpose, result.full_adjoints)
        if mixed is not None and self.setup.options.nan_policy == "skip_task":
            def without(drop: torch.Tensor) -> List[Optional[torch.Tensor]]:
                return expansion(drop)[1].totals()

            if bool(bad.any()):  # the sums streamed during the expansion hold the dropped tasks' terms: sum again without them
                meta_grads = without(bad)
            if not _finite(meta_grads):  # a mixed term overflowed with finite adjoints: which tasks, one at a time (rare)
                for b in range(self.tasks.size):
                    if not bool(bad[b]):
                        bad[b] = not _finite(without(torch.arange(len(bad), device=bad.device) != b))
                result.meta_grad = {n: torch.where(along_tasks(bad, t), torch.zeros_like(t), t) for n, t in result.meta_grad.items()}
                meta_grads = without(bad)
        finite = _finite_flag([*meta_grads, *hyper_grads])
        if finite is not None:  # raised after the checks of earlier causes (inner loop, replay), as they are read at once
            read.add("others_bad", ~finite)
        return meta_grads, hyper_grads

    def _check_inner_loop(self, host: Dict[str, list]) -> None:
        """Raise for the first inner step whose loss or gradient was not finite (flags recorded by the inner loop)."""
        steps = host.get("inner_bad", [])
        k = next((k for k, flags in enumerate(steps) if any(map(any, flags))), None)
        if k is None:
            return
        flags, names = steps[k], list(self.initial)
        tasks = "" if not self.tasks.batched else f" for task(s) {self.tasks.name(b for b in range(self.tasks.size) if any(f[b] for f in flags))}"
        if any(flags[0]):
            value = host["losses"][k][flags[0].index(1.0)]
            raise FloatingPointError(
                f"The inner loss is {value} at inner step {k}{tasks}: the inner loop diverged or the support data holds "
                "NaN/Inf (or is empty). Lower the inner learning rate or check the support set."
            )
        raise FloatingPointError(
            f"The inner gradient of {[n for n, row in zip(names, flags[1:]) if any(row)]} is not finite at inner step "
            f"{k}{tasks} although the loss is finite: an operation in the support loss has an infinite derivative there "
            "(e.g. sqrt or log at 0). Clamp its input away from the singularity."
        )

    def _replay(self, read: Readback) -> List[int]:
        """Replay each distinct support loss at its first kept point, for :meth:`_check_replay`.

        The estimators replay the support loss at recorded points; a closure that reads a variable that has
        changed since (a loop variable captured by a lambda, a later batch) would silently differentiate
        another loss. One forward per distinct support loss catches that.
        """
        trajectory, options = self.trajectory, self.setup.options
        firsts: Dict[int, int] = {}  # the first step of each support loss whose point is kept
        for k, fn in enumerate(trajectory.loss_fns):
            if trajectory.available(k):
                firsts.setdefault(id(fn), k)
        if not firsts:
            return []
        replayed = []
        for k in firsts.values():
            with torch.no_grad(), calls(options, trajectory.context(k), f"the replay check at step {k}"):
                replayed.append(over_tasks(trajectory.loss_fns[k], self.tasks, options.randomness)(trajectory.point(k)))
        now, then = torch.stack(replayed), trajectory.losses[list(firsts.values())]
        tolerance = 1e-9 if then.dtype == torch.float64 else 1e-5
        read.add("replay_now", now)
        read.add("replay_then", then)
        read.add("replay_close", torch.isclose(now, then, rtol=tolerance, atol=tolerance))
        return list(firsts.values())

    def _check_replay(self, host: Dict[str, list], steps: List[int]) -> None:
        """Raise if a support loss replayed by :meth:`_replay` differs from its value in the inner loop."""
        close = host.get("replay_close", [])
        row = next((r for r, flags in enumerate(close) if not all(flags)), None)
        if row is None:
            return
        pure = "(learner, task)" if self.tasks.batched else "the learner"
        raise RuntimeError(
            f"The support loss replayed for the meta-gradient is {host['replay_now'][row]}, but it was "
            f"{host['replay_then'][row]} at inner step {steps[row]}: the closure is not a pure "
            f"function of {pure}. Either it reads a "
            "variable that changed after the inner loop, such as a loop variable captured by a lambda (bind the data "
            "when you build it, e.g. lambda m, x=x_s, y=y_s: F.cross_entropy(m(x), y)), or it draws random numbers, "
            "e.g. dropout, which randomness='error' does not replay (leave the default randomness='replay', or pass "
            "'same' or 'different'; see binom_opt.Options)."
        )

    def _naming(self, tasks: Sequence[int]) -> str:
        return f" for task(s) {self.tasks.name(tasks)}" if self.tasks.batched else ""


class Adaptation(torch.autograd.Function):
    """Node ``(phi_0 [B, ...], other meta-parameters) -> phi_K [B, ...]`` whose backward is the estimator."""

    @staticmethod
    def forward(ctx, record: Record, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.record = record
        # Aliases, not the record's own tensors: an output refers to this node, and the node must
        # not refer back to its outputs (a reference cycle through autograd is never collected).
        return tuple(t.detach() for t in record.trajectory.final.values())

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Optional[torch.Tensor]):  # pyright: ignore[reportIncompatibleMethodOverride]  # as once_differentiable wraps it
        record: Record = ctx.record
        final = record.trajectory.final
        copies = (None,) * len(final) if record.setup.copied else None  # the initial point is a copy: no meta-gradient
        if copies is not None and not record.meta_inputs and not record.hyper_inputs:
            warnings.warn(_NOTHING_META_LEARNED, UserWarning, stacklevel=2)
            record.status.finished = True
            return (None, *copies)
        g = {n: torch.zeros_like(t) if go is None else go for (n, t), go in zip(final.items(), grad_outputs)}
        meta_grad, meta_input_grads, hyper_grads = record.backward(g)
        return (None, *(copies or meta_grad.values()), *meta_input_grads, *hyper_grads)


_NOTHING_META_LEARNED = (
    "A backward went through an innerloop_ctx block with copy_initial_weights=True, and nothing receives a "
    "meta-gradient: the model's initial weights are copied when the block starts (as higher copies them), and the "
    "inner loop uses no other tensor that requires grad. To meta-learn the model's initialisation (MAML), pass "
    "copy_initial_weights=False."
)


class _Accumulation:
    """Gradients computed by :func:`meta_backward`, added into ``.grad`` when called."""

    def __init__(self, leaves: List[torch.Tensor], grads):
        self.leaves, self.grads = leaves, grads

    @property
    def finite(self) -> bool:  # read only when asked (nan_policy="skip_task"): each read is a host sync
        return _finite(self.grads)

    def __call__(self) -> None:
        with torch.no_grad():
            for leaf, g in zip(self.leaves, self.grads):
                if g is not None:
                    leaf.grad = g.clone() if leaf.grad is None else leaf.grad.add_(g)


def meta_backward(loss: torch.Tensor, accumulate: bool = True) -> Optional[_Accumulation]:
    """``loss.backward()``, all or nothing: the gradients of every leaf are computed first and added into
    ``.grad`` only when the whole meta-gradient succeeded (with ``loss.backward()`` a tensor the loss reaches
    without going through an adaptation may already have its ``.grad`` when the meta-gradient fails).

    ``accumulate=False`` returns the computed gradients (``None`` for a non-finite loss) to add later.

    Example:
        >>> import torch, torch.nn.functional as F, binom_opt as bo
        >>> maml = bo.MAML(torch.nn.Linear(4, 3), lr=0.1)
        >>> x, y = torch.randn(6, 4), torch.arange(6) % 3
        >>> learner = maml.clone()
        >>> learner.adapt(lambda m: F.cross_entropy(m(x), y))
        >>> bo.meta_backward(F.cross_entropy(learner(x), y))
        >>> maml.module.weight.grad.shape
        torch.Size([3, 4])
    """
    loss = check_scalar_loss(loss, "meta_backward")
    if not loss.requires_grad:
        raise ValueError(
            "meta_backward got a loss with no autograd graph: compute it from an adapted learner, outside torch.no_grad()."
        )
    if not depends_on_adaptation(loss):
        raise ValueError(
            "meta_backward got a loss that does not depend on an adapted learner (no adaptation in its graph): compute the "
            "query loss from the learner an adaptation returned, e.g. F.cross_entropy(learner(x_query), y_query), not "
            "from the model itself."
        )
    leaves = leaves_requiring_grad(loss)
    if not accumulate and not bool(torch.isfinite(loss.detach())):
        return None
    done = _Accumulation(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))
    if not accumulate:
        return done
    done()
    return None


def check_scalar_loss(loss: object, what: str) -> torch.Tensor:
    """Raise a clear error unless ``loss`` is a real floating-point scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must return a scalar torch.Tensor, got {type(loss).__name__}.")
    if loss.dim() != 0:
        raise ValueError(
            f"{what} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}. Reduce it, e.g. with .mean() or .sum()."
        )
    if not loss.is_floating_point():
        raise TypeError(f"{what} must return a floating-point loss, got dtype {loss.dtype}.")
    return loss


def sum_present(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The sum of the tensors that are not ``None`` (``None`` if all are)."""
    present = [t for t in tensors if t is not None]
    return None if not present else functools.reduce(torch.add, present)


def _finite_flag(tensors) -> Optional[torch.Tensor]:
    """Whether every tensor (``None`` for an unreached input) holds only finite values, as a device bool
    (``None`` when there is no tensor)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return torch.stack(flags).all() if flags else None


def _finite(tensors) -> bool:
    """:func:`_finite_flag` read back (one host sync)."""
    flag = _finite_flag(tensors)
    return flag is None or bool(flag)


def _max(values: Sequence[float]) -> float:
    """``max`` as ``torch.max`` takes it: NaN when any value is NaN."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def depends_on_adaptation(loss: torch.Tensor) -> bool:
    """Whether the autograd graph of ``loss`` contains an :class:`Adaptation` node (a learner's parameters)."""
    return any(isinstance(node, Adaptation._backward_cls) for node in _nodes(loss))


def leaves_requiring_grad(loss: torch.Tensor, exclude: AbstractSet[int] = frozenset()) -> List[torch.Tensor]:
    """The leaf tensors requiring grad that ``loss`` depends on, except those in ``exclude`` (ids)."""
    found = (getattr(node, "variable", None) for node in _nodes(loss))
    return [v for v in found if v is not None and id(v) not in exclude]


def _nodes(loss: torch.Tensor):
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)
