"""A whole meta-batch adapted at once: ``engine.adapt_batch(closure, tasks)``.

The inner loops of all ``B`` tasks run as one vmapped gradient per step, and each HVP round of
the estimator is one vmapped call over trajectory points and tasks (see :mod:`binom_opt.batched`)
instead of a Python loop over tasks. The adapted parameters, ``[B, ...]`` per entry, are the
outputs of one autograd node whose backward applies the estimator to every task, so the query
loss of the meta-batch is one ordinary ``backward()``.

Meta-parameters other than the initialisation are the model's parameters that do not adapt
(an ANIL body run inside the closure) and tensors of ``tasks`` that require grad (features
computed by a body before the inner loop). Their meta-gradients through the inner loop are the
mixed second-order terms, batched the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree

from .adaptation import ADAPTATION_NODES, AdaptationSettings, Learner, leaves_requiring_grad
from .batched import BatchedTrajectory, batched_hvp_oracle, mixed_gradients, run_sgd_batched, take_task, task_count
from .expansion import expand
from .functional import make_stats
from .memory import Chunking
from .trajectory import add_note, check_scalar_loss
from .update_rules import Hyper, SGDRule, UpdateRule

Tensors = Dict[str, torch.Tensor]

__all__ = ["BatchedLearner", "adapt_batch"]


class BatchedLearner:
    """The model adapted to every task of a meta-batch.

    ``learners(x)`` takes inputs with a leading task dimension ``B`` (``x[b]`` for task ``b``)
    and returns outputs with one, each task run with its own adapted parameters (a vmapped
    ``functional_call``). ``learners[b]`` is task ``b``'s :class:`~binom_opt.Learner`.

    Attributes:
        params: the adapted parameters, ``[B, ...]`` per entry, differentiable with respect to
            the meta-parameters.
        module: the underlying model.
    """

    def __init__(self, module: nn.Module, params: Tensors, bn):
        self.module = module
        self.params = params
        self.bn = bn

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __getitem__(self, index: int) -> Learner:
        return Learner(self.module, {n: t[index] for n, t in self.params.items()}, self.bn)

    def __call__(self, *args, **kwargs):
        sizes = {a.shape[0] for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        if sizes and sizes != {len(self)}:
            raise ValueError(
                f"The inputs of a batched learner need a leading task dimension of {len(self)} (one slice per "
                f"task), got leading sizes {sorted(sizes)}. To run one task, index the learner: learners[b](x)."
            )

        def one(params, a, kw):
            return functional_call(self.module, params, a, kw)

        with self.bn():  # random ops (dropout) draw independent numbers per task, as a loop over tasks would
            return vmap(one, randomness="different")(self.params, args, kwargs)

    def __repr__(self) -> str:
        return f"BatchedLearner({type(self.module).__name__}, tasks={len(self)}, adapted={list(self.params)})"


def adapt_batch(
    settings: AdaptationSettings,
    rules: Dict[str, UpdateRule],
    hyper: Dict[str, Hyper],
    closure: Callable[[Learner, object], torch.Tensor],
    tasks,
) -> BatchedLearner:
    """Run the inner loops of every task in ``tasks`` at once; see ``MetaGradientEngine.adapt_batch``."""
    _check_supported(settings, rules, hyper)
    if isinstance(closure, torch.Tensor) or not callable(closure):
        raise TypeError(
            "Pass a closure (learner, task) -> support loss, e.g. lambda m, t: F.cross_entropy(m(t[0]), t[1]), "
            f"not {type(closure).__name__}."
        )
    B = task_count(tasks)
    model = settings.model
    named = dict(model.named_parameters())
    initial = {n: named[n] for n in settings.adapted}
    extra = {n: p for n, p in named.items() if n not in initial and p.requires_grad}
    leaves, spec = pytree.tree_flatten(tasks)
    wrt_task = [t.requires_grad for t in leaves]
    detached_tasks = pytree.tree_unflatten([t.detach() for t in leaves], spec)

    def loss(phi: Tensors, ex: Tensors, task) -> torch.Tensor:
        return check_scalar_loss(closure(Learner(model, {**phi, **ex}, settings.batchnorm), task), "The support-loss closure")

    _check_closure(loss, initial, extra, take_task(tasks, 0))
    step_size = {n: hyper[n]["lr"] for n in initial}
    fixed_extra = {n: p.detach() for n, p in extra.items()}
    trajectory = run_sgd_batched(loss, initial, fixed_extra, detached_tasks, step_size, settings.steps, settings.randomness)
    record = _BatchRecord(settings, loss, trajectory, fixed_extra, detached_tasks, wrt_task, step_size, list(extra))
    inputs = [*initial.values(), *extra.values(), *(t for t, flag in zip(leaves, wrt_task) if flag)]
    outputs = _BatchedAdaptation.apply(record, *inputs)
    assert len(outputs) == len(initial) and B == outputs[0].shape[0]
    return BatchedLearner(model, dict(zip(initial, outputs)), settings.batchnorm)


def _check_supported(settings: AdaptationSettings, rules: Dict[str, UpdateRule], hyper: Dict[str, Hyper]) -> None:
    if settings.steps is None:
        raise ValueError("adapt_batch needs the number of inner steps: build the engine with steps=K.")
    plain = all(isinstance(r, SGDRule) and r.identity_direct for r in rules.values())
    learned = [n for n, h in hyper.items() if any(isinstance(v, torch.Tensor) and v.requires_grad for v in h.values())]
    if not plain or learned:
        raise NotImplementedError(
            "adapt_batch runs plain SGD inner loops (torch.optim.SGD without momentum or weight decay, fixed "
            "learning rates). For momentum, Adam, AdamW or learned learning rates, adapt the tasks one by one "
            "with engine.adapt."
        )
    if settings.randomness == "same":
        raise NotImplementedError(
            "randomness='same' replays each task's random stream one task at a time; adapt_batch cannot. "
            "Use engine.adapt per task, randomness='different', or a deterministic support loss."
        )


def _check_closure(loss, initial: Tensors, extra: Tensors, task) -> None:
    """One task's support loss with plain autograd, before anything is batched: clear errors early,
    and a refusal of differentiable tensors the closure captures (they would get no meta-gradient)."""
    try:
        value = loss(initial, extra, task)
    except Exception as error:
        add_note(error, "binom_opt: raised by the support-loss closure of adapt_batch on task 0; it is called "
                        "as closure(learner, task) with one task's slice of the batched tasks.")
        raise
    if not math.isfinite(float(value.detach())):
        raise FloatingPointError(f"The support loss of task 0 is {float(value)} at the initial parameters: check the data.")
    known = {id(t) for t in (*initial.values(), *extra.values())}
    captured = [t for t in leaves_requiring_grad(value, exclude=known) if not any(t is leaf for leaf in pytree.tree_leaves(task))]
    if captured and value.requires_grad:
        shapes = [tuple(t.shape) for t in captured]
        raise ValueError(
            f"The support-loss closure uses tensors that require grad but are neither model parameters nor part "
            f"of tasks (shapes {shapes}). adapt_batch only differentiates through those two: pass such tensors "
            "inside tasks (with a leading task dimension), or adapt task by task with engine.adapt."
        )


@dataclass
class _BatchRecord:
    """What one batched meta-gradient needs (no reference back to anything holding the node's outputs)."""

    settings: AdaptationSettings
    loss: Callable
    trajectory: BatchedTrajectory
    extra: Tensors
    tasks: object
    wrt_task: List[bool]
    step_size: Dict[str, float]
    extra_names: List[str]
    finished: bool = False

    def backward(self, g: Tensors) -> Tuple[Tensors, Tensors, List[Optional[torch.Tensor]]]:
        if self.finished:
            raise RuntimeError("This meta-batch's meta-gradient was already computed: run adapt_batch again.")
        settings, K = self.settings, self.trajectory.steps
        plan = settings.estimator.plan(K)
        if plan.levels > 0 and settings.randomness != "different":
            self._check_replay()
        chunking = Chunking(settings.chunk_size, settings.memory_budget, inner_batch=self.trajectory.tasks)
        oracle = batched_hvp_oracle(
            self.loss, self.trajectory, self.extra, self.tasks, settings.hvp, chunking, settings.randomness,
            settings.compile_hvps,
        )
        needs_mixed = bool(self.extra) or any(self.wrt_task)
        with torch.no_grad():
            result = expand(plan, g, self.step_size, oracle, steps=K, with_adjoints=needs_mixed)
        per_task = result.meta_grad
        d_extra, d_task = {}, []
        if needs_mixed:
            weights = {
                k: {n: -plan.hessian_scale * self.step_size[n] * t for n, t in adjoint.items()}
                for k, adjoint in result.adjoints.items()
            }
            d_extra, d_task = mixed_gradients(
                self.loss, self.trajectory, self.extra, self.tasks, weights, self.wrt_task, chunking, settings.randomness
            )
        bad = _bad_tasks([*per_task.values(), *d_extra.values(), *(t for t in d_task if t is not None)])
        if bool(bad.any()):
            if settings.nan_policy != "skip_task":
                raise FloatingPointError(
                    f"The meta-gradient is not finite for task(s) {torch.nonzero(bad).flatten().tolist()}: the "
                    "Hessian-vector products overflowed or the query loss is NaN/Inf. Lower the inner learning "
                    "rate, use a smaller L, or check those tasks' data (nan_policy='skip_task' drops them)."
                )
            per_task = {n: _zero_tasks(t, bad) for n, t in per_task.items()}
            d_extra = {n: _zero_tasks(t, bad) for n, t in d_extra.items()}
            d_task = [None if t is None else _zero_tasks(t, bad) for t in d_task]
        self.finished = True
        if settings.on_stats is not None:
            stats = make_stats(settings.estimator, plan, K, g, result, self.trajectory.mean_losses, oracle, self.trajectory.tasks)
            settings.on_stats(dataclasses.replace(stats, skipped=int(bad.sum())))
        return (
            {n: t.sum(0) for n, t in per_task.items()},
            {n: t.sum(0) for n, t in d_extra.items()},
            d_task,
        )

    def _check_replay(self) -> None:
        points = {n: t[0] for n, t in self.trajectory.points.items()}
        with torch.no_grad():
            now = vmap(self.loss, in_dims=(0, None, 0))(points, self.extra, self.tasks)
        recorded = self.trajectory.losses[0]
        if not torch.allclose(now, recorded, rtol=1e-5, atol=1e-7):
            raise RuntimeError(
                f"The support losses replayed for the meta-gradient ({now.tolist()}) differ from those of the inner "
                f"loop ({recorded.tolist()}): the closure is not a pure function of (learner, task). It reads a "
                "variable that changed after adapt_batch, or draws random numbers (dropout: make it deterministic "
                "or pass randomness='different')."
            )


def _bad_tasks(tensors: List[torch.Tensor]) -> torch.Tensor:
    bad = None
    for t in tensors:
        not_finite = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        bad = not_finite if bad is None else bad | not_finite
    return bad


def _zero_tasks(t: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``t`` (leading task dimension) with the ``bad`` tasks' slices zeroed."""
    return torch.where(bad.view(-1, *[1] * (t.dim() - 1)), torch.zeros_like(t), t)


class _BatchedAdaptation(torch.autograd.Function):
    """Node ``(phi_0, other parameters, task tensors) -> phi_K of every task`` whose backward is the estimator."""

    @staticmethod
    def forward(ctx, record: _BatchRecord, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.record = record
        return tuple(t.clone() for t in record.trajectory.final.values())

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Optional[torch.Tensor]):
        record: _BatchRecord = ctx.record
        final = record.trajectory.final
        g = {n: torch.zeros_like(t) if go is None else go for (n, t), go in zip(final.items(), grad_outputs)}
        initial, extra, task = record.backward(g)
        return (None, *initial.values(), *(extra[n] for n in record.extra_names), *(t for t in task if t is not None))


ADAPTATION_NODES.append(_BatchedAdaptation)
