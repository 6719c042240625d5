"""Write it for one task at one point, lift it over trajectory points and tasks with ``vmap``.

``fn(*args, task)`` for ONE task at ONE point becomes a function of ``[B, ...]`` (tasks) or
``[n, B, ...]`` (a round's points) arguments; random streams and error context live here too
(docs/design.md, "One task, written once, lifted over tasks").
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.func import vmap
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from .context import RandomState, devices_of
from .memory import loops_over_tasks, task_activations
from .norm_layers import module_policy

__all__ = ["Tasks", "stack", "over_tasks", "vmap_or_loop", "per_task",
           "refuse_random_ops", "map_points", "compiled",
           "autograd_through_vmap"]

# vmap's randomness for the task dimension and for a round's points, per user setting ("replay" replays a step
# that drew random numbers on its own, never vmapped: vmap refuses random ops there as under "error")
_TASK_RANDOMNESS = {"error": "error", "replay": "error", "same": "different", "different": "different"}
_POINT_RANDOMNESS = {"error": "error", "replay": "error", "same": "same", "different": "different"}


class Tasks:
    """The task axis: ``B`` tasks with their data (a pytree of tensors sharing a leading dimension
    ``B``), or one task without data (``data=None``, ``B = 1``, never vmapped over).

    ``loop``: the tasks run one after another, each exactly as a task of its own
    (:func:`~binom_opt.core.memory.loops_over_tasks` decides), instead of vmapped together.
    ``offset``: the index of the first of these tasks in the meta-batch the user passed (errors name tasks by it).

    >>> Tasks((torch.zeros(4, 5, 3), torch.zeros(4, 5))).size, Tasks().size
    (4, 1)
    """

    def __init__(self, data: Any = None, loop: bool = False, offset: int = 0):
        self.data = data
        self.size = 1 if data is None else task_count(data)
        self.loop = loop and data is not None
        self.offset = offset

    @property
    def batched(self) -> bool:
        return self.data is not None

    def planned(self, options, device: Optional[torch.device], loss_fn: Optional[Callable] = None, point=None,
                key: object = None) -> Tasks:
        """These tasks, run as ``options`` plan them on ``device`` (:func:`~binom_opt.core.memory.loops_over_tasks`),
        from the measured activations of their support loss ``loss_fn(point, task)`` (``key``: what identifies it)."""
        def activations() -> Optional[int]:
            one = task_activations(loss_fn, point, self.data, options.bn, key)  # pyright: ignore[reportArgumentType]  # given below
            return None if one is None else one * self.size

        return Tasks(self.data, loops_over_tasks(options, device, None if loss_fn is None or point is None else activations))

    @property
    def at_once(self) -> int:
        """How many tasks one call runs together."""
        return 1 if self.loop else self.size

    def first(self) -> Any:
        """Task 0's data (``None`` for a task without data)."""
        return self.task(0)

    def task(self, b: int) -> Any:
        """Task ``b``'s data (``None`` for a task without data)."""
        return None if self.data is None else pytree.tree_map(lambda t: t[b], self.data)

    def alone(self, b: int, detach: bool = False) -> Tasks:
        """Task ``b`` as a meta-batch of its own (run as the loop runs it, named as task ``b`` of these).

        ``detach``: its slices of tensors that require grad become leaves of their own (:meth:`requiring_grad`),
        so that differentiating task ``b`` stops at them, instead of running the backward of a graph that
        computed the whole meta-batch's data (a body's features) once per task."""
        cut = (lambda t: t.detach().requires_grad_(True) if t.requires_grad else t) if detach else (lambda t: t)
        return Tasks(pytree.tree_map(lambda t: cut(t[b : b + 1]), self.data), loop=True, offset=self.offset + b)

    def requiring_grad(self) -> list:
        """The tensors of the data that require grad, in a fixed order."""
        return [t for t in pytree.tree_leaves(self.data) if isinstance(t, torch.Tensor) and t.requires_grad]

    def through_data(self, per_task: Sequence[Sequence[Optional[torch.Tensor]]], inputs: Sequence[torch.Tensor]) -> tuple:
        """The gradients of ``inputs`` through the data that requires grad, from each task's gradients of its
        slices cut by :meth:`alone` (``detach=True``; one per tensor of :meth:`requiring_grad`, ``None`` for zero):
        one backward through the graph that computed the data, for the whole meta-batch (``None`` where unreached)."""
        shared = self.requiring_grad()
        given = lambda grad, data, b: torch.zeros_like(data[b : b + 1]) if grad is None else grad
        slices = [torch.cat([given(grads[j], data, b) for b, grads in enumerate(per_task)]) for j, data in enumerate(shared)]
        return torch.autograd.grad(shared, list(inputs), slices, allow_unused=True, retain_graph=True)

    def name(self, indices) -> list:
        """The indices of these tasks in the meta-batch the user passed."""
        return [self.offset + b for b in indices]


def task_count(data: Any) -> int:
    """``B``, the leading dimension every tensor of the ``data`` pytree shares (checked)."""
    leaves = pytree.tree_leaves(data)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError(
            "tasks must be a tensor or a tuple/list/dict of tensors with a leading task dimension, got "
            f"{type(data).__name__}" + ("" if leaves else " with no tensors") + "."
        )
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"Every tensor in tasks needs the same leading task dimension, got sizes {sorted(map(str, sizes))}.")
    size: int = sizes.pop()  # pyright: ignore[reportAssignmentType]  # None was refused above
    if size < 1:
        raise ValueError("tasks holds no task (its leading dimension is 0).")
    return size


def _squeeze(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.squeeze(0), tree)


def _unsqueeze(tree: Any) -> Any:
    return pytree.tree_map(lambda t: t.unsqueeze(0), tree)


def over_tasks(fn: Callable, tasks: Tasks, randomness: str, chunk: Optional[int] = None) -> Callable:
    """``fn(*args, task)`` for one task, as a function of ``[B, ...]`` arguments (``chunk``: tasks at once)."""
    if not tasks.batched:
        return lambda *args: _unsqueeze(fn(*_squeeze(args), None))
    if tasks.loop:
        return lambda *args: _loop(fn, (*args, tasks.data))
    batched = vmap_or_loop(fn, _TASK_RANDOMNESS[randomness], chunk, same=randomness == "same")
    return lambda *args: batched(*args, tasks.data)


def vmap_or_loop(fn: Callable, randomness: str, chunk: Optional[int] = None, same: bool = False) -> Callable:
    """``vmap(fn)`` over dimension 0 of every argument or, where torch has no batching rule for an operator
    of ``fn`` (``nn.LSTM``, ``nn.GRU``, a ``channels_last`` conversion), the same function in a Python loop over
    that dimension (slower, warned once). ``same``: ``randomness="same"``, whose streams a loop cannot replay,
    is then an error."""
    batched = vmap(fn, randomness=randomness, chunk_size=chunk)

    def call(*args):
        try:
            return batched(*args)
        except RuntimeError as error:
            if not any(gap in str(error) for gap in _VMAP_GAPS):
                raise
            if same:
                raise RuntimeError(
                    f"torch.func.vmap cannot batch an operator of this support loss ({error}), and randomness='same' "
                    "cannot be replayed in a loop. Use a deterministic support loss, randomness='different', or adapt "
                    "the tasks one by one with engine.adapt."
                ) from error
            if not _looped:
                _looped.append(True)
                warnings.warn(f"binom_opt: {error} Running it in a Python loop over the batch instead (slower).",
                              RuntimeWarning, stacklevel=2)
            return _loop(fn, args)

    return call


def refuse_random_ops(fn: Callable, args: tuple, tasks: Tasks) -> None:
    """Run ``fn(*args, task)`` for task 0 once under ``vmap(randomness="error")``, without a gradient: a loop
    over tasks (``tasks.loop``) refuses random ops as the vmapped tasks do, at the cost of one forward.

    Where vmap cannot run ``fn`` (an operator without a batching rule, a Python branch on the data's values such as
    transformers' padding-mask checks), task 0 runs without vmap and a draw from the generators is refused."""
    first = pytree.tree_map(lambda t: t[:1], (*args, tasks.data))
    with torch.no_grad():
        try:
            vmap(fn, randomness="error")(*first)
            return
        except RuntimeError as error:
            if not any(gap in str(error) for gap in _VMAP_GAPS):
                raise
        devices = devices_of([t for t in pytree.tree_leaves(first) if isinstance(t, torch.Tensor)])
        with torch.random.fork_rng(devices=list(devices)):  # the caller's streams stay as they were
            before = RandomState.capture(devices)
            _loop(fn, first)
            drew = before.moved(devices)
    if drew:
        raise RuntimeError("vmap: called random operation while in randomness error mode.")  # what calls() explains


def per_task(fn: Callable, loop: bool, bn: str) -> Callable:
    """``fn`` of one task (whose outputs autograd differentiates later: a query loss) over dimension 0 of
    its arguments, under the module policy ``bn`` (and :func:`autograd_through_vmap`): vmapped with independent random draws per task or,
    with ``loop`` (as :attr:`Tasks.loop` plans), one task after another, each under activation checkpointing.

    Checkpointed, a task keeps only its inputs and outputs until the backward, which recomputes its
    forward (under the same policy): the meta-batch then holds one task's graph at a time, as a loop of
    per-task meta-steps does, instead of ``B`` of them (one forward more per task; random ops replay their draws).
    The last task keeps its graph: autograd differentiates the tasks last to first, so its graph is gone
    before the first recomputation starts, and holding it costs no more memory than recomputing it.
    """
    def one(*args):  # the recomputation of a checkpointed task runs in these contexts too
        with module_policy(bn), autograd_through_vmap():
            return fn(*args)

    if not loop:
        return vmap_or_loop(one, "different")
    saved = lambda *args: checkpoint(one, *args, use_reentrant=False)
    return lambda *args: _loop(saved, args, last=one)


def _loop(fn: Callable, args: tuple, last: Optional[Callable] = None) -> Any:
    """``fn`` over dimension 0 of its arguments in a Python loop (``last``, if given, for the last index), outputs stacked.

    The arguments are unbound once, not indexed per call: the gradient of ``B`` indexed slices would be ``B``
    zero-filled tensors of the whole argument's size, one per slice; unbound, it is one stack of the slices
    (and of one slice, a view: squeezed).
    """
    leaves, spec = pytree.tree_flatten(args)
    n = leaves[0].shape[0]
    slices = [t.unbind(0) if n > 1 else (t.squeeze(0),) for t in leaves]
    outs = [(last if last is not None and i == n - 1 else fn)(*pytree.tree_unflatten([s[i] for s in slices], spec))
            for i in range(n)]
    return pytree.tree_map(lambda *ts: stack(list(ts)), *outs)


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; one contiguous tensor is only viewed with a new leading dimension (no copy: no kernel on a
    GPU). Others are copied: an expanded one (the initial point of every task) overlaps itself, which forward-mode
    AD refuses."""
    one = len(tensors) == 1 and tensors[0].is_contiguous()
    return tensors[0].unsqueeze(0) if one else torch.stack(list(tensors))


_looped: list = []  # the loop fallback warns once per process
# torch.func.vmap's own messages for what it cannot batch (not errors of the user's code)
_VMAP_GAPS = ("Batching rule not implemented", "inside of vmap for memory_format", "data-dependent control flow",
              "calling .item() on a Tensor")


def along_tasks(per_task: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``per_task`` (``[B]``) shaped to broadcast over ``like`` (``[B, ...]``)."""
    return per_task.view(-1, *[1] * (like.dim() - 1))


def map_points(
    fn: Callable, args: tuple, tasks: Tasks, randomness: str, limit: Optional[int] = None, compile_fn: Union[bool, str] = False,
    plain: Optional[Callable] = None,
) -> Any:
    """``fn(*one_point_args, task)`` at ``n`` points of ``B`` tasks; ``args`` are pytrees of ``[n, B, ...]``.

    ``limit`` caps the evaluations (points x tasks) run at once. With ``tasks.loop`` each task runs on
    its own, its points vmapped. Otherwise points are the outer ``vmap`` and tasks the inner one;
    below ``B`` at once the tasks are chunked, except under ``randomness="same"``, whose masks depend
    on how many tasks draw together. ``plain``: the same function for a call that is not lifted (one
    point of one task, not compiled), where plain autograd costs less host time than ``torch.func``; it
    takes and returns dicts of tensors, and one point of one task skips the pytree machinery too.
    """
    if tasks.loop:  # each task as a task of its own: its points vmapped, as the per-task path runs them
        alone = lambda f, b: (lambda *a: f(*a[:-1], tasks.task(b)))
        outs = [map_points(alone(fn, b), pytree.tree_map(lambda t: t[:, b : b + 1], args), Tasks(), randomness, limit, compile_fn,
                           None if plain is None else alone(plain, b)) for b in range(tasks.size)]
        return pytree.tree_map(lambda *ts: ts[0] if len(ts) == 1 else torch.cat(ts, dim=1), *outs)
    single = not tasks.batched and all(isinstance(a, dict) for a in args) and next(iter(args[0].values())).shape[0] == 1
    if plain is not None and single and not compile_fn:  # one point of one task: no lifting, no pytree walk
        out = plain(*({k: t[0, 0] for k, t in a.items()} for a in args), None)
        return {k: t[None, None] for k, t in out.items()}
    n = pytree.tree_leaves(args)[0].shape[0]
    B = tasks.size
    step_chunk, task_chunk = None, None
    if limit is not None and limit < n * B:
        step_chunk = max(1, limit // B)
        task_chunk = limit if limit < B and randomness != "same" else None
    if n == 1 or step_chunk == 1:  # a loop over points skips vmap's batching rules
        one = plain if plain is not None and not tasks.batched and not compile_fn else fn
        return _loop(compiled(over_tasks(one, tasks, randomness, task_chunk), compile_fn), args)
    per_point = over_tasks(fn, tasks, randomness, task_chunk)
    return compiled(vmap_or_loop(per_point, _POINT_RANDOMNESS[randomness], step_chunk, same=randomness == "same"), compile_fn)(*args)


class _AutogradThroughVmap(torch.overrides.TorchFunctionMode):
    """Routes around torch operators whose gradient is wrong when plain autograd (not ``torch.func``)
    differentiates through ``vmap``: ``F.embedding(padding_idx=p)`` then gives row ``p`` a gradient
    (found by the zoo tests: 0.33 relative error). Its forward is the plain lookup, so the lookup of
    a weight whose row ``p`` is detached computes the same values with the right gradient."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.embedding:
            names = ("input", "weight", "padding_idx")
            bound = {**dict(zip(names, args)), **kwargs}
            padding = bound.get("padding_idx")
            if padding is not None:
                weight = bound["weight"]
                row = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
                row[padding] = True
                bound.update(weight=torch.where(row, weight.detach(), weight), padding_idx=None)
                rest = {k: v for k, v in bound.items() if k not in names}
                return func(bound["input"], bound["weight"], None, **rest)
        return func(*args, **kwargs)


def autograd_through_vmap() -> contextlib.AbstractContextManager:
    """The context of a call whose vmapped outputs plain autograd differentiates (a batched query, the
    mixed terms): known torch gaps there are routed through operators that are right (:class:`_AutogradThroughVmap`)."""
    return _AutogradThroughVmap()


def compiled(fn: Callable, enabled) -> Callable:
    """``torch.compile(fn)`` when ``enabled`` (``True`` or a ``torch.compile`` mode name), else ``fn``.

    Compiled graphs are cached by code, not by closure: every later task with the same shapes
    reuses the first task's graph, so the compile time is paid once per shape.
    """
    if not enabled:
        return fn
    return torch.compile(fn, dynamic=False, mode=None if enabled is True else enabled)
