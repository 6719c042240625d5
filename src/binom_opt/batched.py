"""Task-batched core: a whole meta-batch's inner loops, HVP rounds and mixed terms as vmapped calls.

A support loss here is ``loss(phi, extra, task)``: ``phi`` the adapted parameters of ONE task,
``extra`` the other differentiable inputs shared by every task (a frozen body's parameters in
ANIL), ``task`` one task's slice of the meta-batch (a pytree of tensors with a leading task
dimension ``B``). Everything is vmapped over tasks; the HVPs of a round are vmapped over
trajectory points AND tasks, so a meta-batch costs one call per inner step and per round.

Trajectory tensors carry two leading dimensions, ``[K, B, ...]`` (steps, tasks); adjoint
vectors and ``g`` one, ``[B, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch.func import grad, grad_and_value, vmap
from torch.utils import _pytree as pytree

from .hvp import compiled, explained_replay_errors, hvp_function, resolve_hvp_mode
from .memory import ActivationBytes, Chunking, activation_bytes
from .trajectory import sgd_update, stack_points

Tensors = Dict[str, torch.Tensor]
TaskLoss = Callable[[Tensors, Tensors, object], torch.Tensor]

__all__ = ["BatchedTrajectory", "task_count", "run_sgd_batched", "batched_hvp_oracle", "mixed_gradients", "take_task"]


@dataclass
class BatchedTrajectory:
    """A meta-batch's finished inner loops.

    Attributes:
        points: ``phi_0 .. phi_{K-1}`` of every task, ``[K, B, ...]`` per entry (detached).
        final: ``phi_K`` of every task, ``[B, ...]`` (detached).
        losses: the support loss of every task at every step, ``[K, B]``.
    """

    points: Tensors
    final: Tensors
    losses: torch.Tensor

    @property
    def steps(self) -> int:
        return self.losses.shape[0]

    @property
    def tasks(self) -> int:
        return self.losses.shape[1]

    @property
    def mean_losses(self) -> List[float]:
        """The support loss at each step, averaged over the tasks."""
        return [float(v) for v in self.losses.double().mean(1)]


def task_count(tasks) -> int:
    """``B``, the leading dimension every tensor of the ``tasks`` pytree shares (checked)."""
    leaves = pytree.tree_leaves(tasks)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError(
            "tasks must be a tensor or a tuple/list/dict of tensors with a leading task dimension, got "
            f"{type(tasks).__name__}" + ("" if leaves else " with no tensors") + "."
        )
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"Every tensor in tasks needs the same leading task dimension, got sizes {sorted(map(str, sizes))}."
        )
    size = sizes.pop()
    if size < 1:
        raise ValueError("tasks holds no task (its leading dimension is 0).")
    return size


def take_task(tasks, index: int):
    """The ``index``-th task of a batched ``tasks`` pytree."""
    return pytree.tree_map(lambda t: t[index], tasks)


def run_sgd_batched(
    loss: TaskLoss, params: Mapping[str, torch.Tensor], extra: Tensors, tasks, step_size: Mapping[str, float], steps: int,
    randomness: str = "error",
) -> BatchedTrajectory:
    """``K`` plain SGD steps of every task at once, from the shared initial point ``params``.

    ``randomness`` is ``torch.func.vmap``'s, for random ops (dropout) in the support loss.

    Raises:
        FloatingPointError: a task's support loss or gradient is not finite (naming the step and tasks).
    """
    B = task_count(tasks)
    inner_grad = vmap(grad_and_value(loss), in_dims=(0, None, 0), randomness=randomness)
    phi = {n: p.detach().unsqueeze(0).expand(B, *p.shape) for n, p in params.items()}
    points, losses = [], []
    with torch.no_grad(), explained_replay_errors("rev", randomness):
        for k in range(steps):
            grads, values = inner_grad(phi, extra, tasks)
            bad = ~torch.isfinite(values)
            for g in grads.values():
                bad |= ~torch.isfinite(g.reshape(B, -1)).all(1)
            if bool(bad.any()):
                raise FloatingPointError(
                    f"The support loss or its gradient is not finite at inner step {k} for task(s) "
                    f"{torch.nonzero(bad).flatten().tolist()}: lower the inner learning rate or check those tasks' data."
                )
            points.append(phi)
            losses.append(values)
            phi = sgd_update(phi, grads, step_size)
    return BatchedTrajectory(stack_points(points), phi, torch.stack(losses))


def _nested_vmap(fn: Callable, point_dims: tuple, task_dims: tuple, count: int, B: int, limit: Optional[int], randomness: str):
    """``vmap`` over steps of ``vmap`` over tasks, chunked so that at most ``limit`` calls run at once."""
    over_steps, over_tasks = None, None
    if limit is not None and limit < count * B:
        over_steps, over_tasks = (limit // B, None) if limit >= B else (1, limit)
    per_task = vmap(fn, in_dims=task_dims, chunk_size=over_tasks, randomness=randomness)
    return vmap(per_task, in_dims=point_dims, chunk_size=over_steps, randomness=randomness)


def _first_task_activations(loss: TaskLoss, trajectory: BatchedTrajectory, extra: Tensors, tasks) -> ActivationBytes:
    task = take_task(tasks, 0)
    return activation_bytes(lambda p: loss(p, extra, task), {n: t[0, 0] for n, t in trajectory.points.items()})


def batched_hvp_oracle(
    loss: TaskLoss,
    trajectory: BatchedTrajectory,
    extra: Tensors,
    tasks,
    mode: str = "auto",
    chunking: Optional[Chunking] = None,
    randomness: str = "error",
    compile_hvps: bool = False,
):
    """An oracle for :func:`~binom_opt.expansion.expand` over a meta-batch: ``H_{j,b} v_{j,b}`` for
    the steps ``j`` asked and every task ``b``, in one call (steps x tasks, chunked by ``chunking``)."""
    mode = resolve_hvp_mode(mode)
    B = task_count(tasks)
    chunking = chunking or Chunking(inner_batch=B)

    def task_hvp(point: Tensors, vector: Tensors, task) -> Tensors:
        return hvp_function(lambda p: loss(p, extra, task), mode)(point, vector)

    def oracle(steps: range, vectors: Tensors) -> Tensors:
        at = {n: t[steps.start : steps.stop] for n, t in trajectory.points.items()}
        count = steps.stop - steps.start

        def call(limit: Optional[int]) -> Tensors:
            batched = _nested_vmap(task_hvp, (0, 0, None), (0, 0, 0), count, B, limit, randomness)
            return compiled(batched, compile_hvps)(at, vectors, tasks)

        with explained_replay_errors(mode, randomness):
            return chunking.run(count * B, lambda: _first_task_activations(loss, trajectory, extra, tasks), call)

    oracle.chunking = chunking
    return oracle


def mixed_gradients(
    loss: TaskLoss,
    trajectory: BatchedTrajectory,
    extra: Tensors,
    tasks,
    weights: Mapping[int, Tensors],
    wrt_task: List[bool],
    chunking: Optional[Chunking] = None,
    randomness: str = "error",
) -> Tuple[Tensors, List[Optional[torch.Tensor]]]:
    """``sum_k d/dc <grad_phi loss(phi_{k,b}, c), w_{k,b}>`` for ``c`` the extra inputs and task leaves.

    ``weights`` maps consecutive steps ``k`` to ``[B, ...]`` vectors (``B_k^T lambda_{k+1}`` times the
    Hessian scale). Returns per-task gradients: ``{name: [B, ...]}`` for ``extra`` and, for each task
    leaf flagged in ``wrt_task``, a ``[B, ...]`` tensor (``None`` for the others).
    """
    leaves, spec = pytree.tree_flatten(tasks)
    B, ks = task_count(tasks), sorted(weights)
    if not ks:
        return {n: torch.zeros(B, *t.shape, dtype=t.dtype, device=t.device) for n, t in extra.items()}, [
            torch.zeros_like(t) if flag else None for t, flag in zip(leaves, wrt_task)
        ]
    free = [t for t, flag in zip(leaves, wrt_task) if flag]
    rest = [t for t, flag in zip(leaves, wrt_task) if not flag]

    def directional(phi: Tensors, ex: Tensors, free: List[torch.Tensor], rest: List[torch.Tensor], w: Tensors):
        free_it, rest_it = iter(free), iter(rest)
        task = pytree.tree_unflatten([next(free_it) if flag else next(rest_it) for flag in wrt_task], spec)
        g = grad(loss)(phi, ex, task)
        return sum((g[n] * w[n]).sum() for n in g)

    def per_point(phi: Tensors, ex: Tensors, free: List[torch.Tensor], rest: List[torch.Tensor], w: Tensors):
        return grad(directional, argnums=(1, 2))(phi, ex, free, rest, w)

    at = {n: t[ks[0] : ks[-1] + 1] for n, t in trajectory.points.items()}
    stacked = {n: torch.stack([weights[k][n] for k in ks]) for n in next(iter(weights.values()))}
    count = len(ks)

    def call(limit: Optional[int]):
        return _nested_vmap(per_point, (0, None, None, None, 0), (0, None, 0, 0, 0), count, B, limit, randomness)(
            at, extra, free, rest, stacked
        )

    with explained_replay_errors("rev", randomness):  # a mixed term costs about what an HVP does
        measure = lambda: _first_task_activations(loss, trajectory, extra, tasks)
        d_extra, d_free = (chunking or Chunking(inner_batch=B)).run(count * B, measure, call)
    it = iter(t.sum(0) for t in d_free)
    return {n: t.sum(0) for n, t in d_extra.items()}, [next(it) if flag else None for flag in wrt_task]
