"""How many Hessian-vector products run at once: a user cap, a memory budget, and halving after OOM.

A round's memory is (HVPs at once) x (activations of one HVP). :class:`Chunking` bounds the first
factor by ``chunk_size``, by ``memory_budget`` divided by one HVP's activations (measured once with
``saved_tensors_hooks``; ``"inner_step"``: the inner step's own activations, i.e. first-order's
memory), and by halving the chunk after an out-of-memory error. Sequential estimators run one HVP
per round and never need a budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, TypeVar, Union

import torch
from torch.utils import _pytree as pytree

from .closures import tensor_shapes
from .context import RandomState, devices_of
from .norm_layers import module_policy

Tensors = Dict[str, torch.Tensor]
T = TypeVar("T")

__all__ = ["Chunking", "ActivationBytes", "parse_memory_budget", "auto_budget", "loops_over_tasks", "activation_bytes",
           "check_chunk_size", "AUTO_VMAP_TASKS_CAP", "AUTO_CPU_CAP", "AUTO_KEEP_GRAPH_CAP", "task_activations", "measured_once",
           "keeps_graphs"]

INNER_STEP = "inner_step"
AUTO = "auto"
AUTO_CUDA_CAP = 512 * 2**20  # "auto" on CUDA: a quarter of the free memory, at most this
# "auto" elsewhere: the activations the HVPs of a round (and the mixed terms of other meta-parameters) hold at once,
# measured for one HVP, at least one: a ResNet-12's or a LoRA base's one at a time, an MLP's or an ANIL head's all K
# at once (fewer calls cost less host time, and the mixed terms' backward through a body's features runs once)
AUTO_CPU_CAP = 64 * 2**20
# "auto" on the CPU: a meta-batch's tasks are vmapped together where one HVP of every task at once holds at most this
# many bytes of activations (measured for the first task, times B); a loop over the tasks above. Small models gain
# most from one call per meta-batch; large per-task activations run faster task by task (grouped convolutions, caches);
# calibrated by benchmarks/task_plan.py (benchmarks/results/task_plan_cpu.md)
AUTO_VMAP_TASKS_CAP = 16 * 2**20
# "auto", one task at a time: each inner step keeps its gradient's graph (as unrolled autograd does) while the graphs
# one adaptation keeps stay within this many bytes (measured activations of an HVP per step): a small model's HVPs then
# differentiate the kept graph instead of replaying the step's forward and backward, which is most of their time there
AUTO_KEEP_GRAPH_CAP = 4 * 2**20

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}.")


def parse_memory_budget(budget: Union[None, int, str]) -> Union[None, int, str]:
    """Bytes from an integer or a string such as ``"512MiB"``; ``None``, ``"inner_step"`` and ``"auto"`` pass through.

    >>> parse_memory_budget("1.5GiB"), parse_memory_budget("200 MB"), parse_memory_budget(4096)
    (1610612736, 200000000, 4096)
    """
    if budget is None or budget in (INNER_STEP, AUTO):
        return budget
    if isinstance(budget, bool):
        raise ValueError(f"memory_budget must be None, a number of bytes or a string like '1GiB', got {budget!r}.")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        unit = match and _UNITS.get(match.group(2).lower())
        if unit is None:
            raise ValueError(
                f"memory_budget {budget!r} is not understood: give bytes as an integer or a string such as "
                "'512MiB', '2GB' (units B, kB, MB, GB, KiB, MiB, GiB), 'inner_step' or 'auto'."
            )
        value = int(float(match.group(1)) * unit)  # pyright: ignore[reportOptionalMemberAccess]  # a unit implies a match
    else:
        raise ValueError(f"memory_budget must be None, a number of bytes or a string like '1GiB', got {budget!r}.")
    if value < 1:
        raise ValueError(f"memory_budget must be positive, got {budget!r}.")
    return value


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes of one support-loss gradient (what an inner step keeps) and of one HVP."""

    gradient: int
    hvp: int


def activation_bytes(loss_fn: Callable[[Tensors], torch.Tensor], point: Tensors) -> ActivationBytes:
    """Measure the tensors a gradient and an HVP of ``loss_fn`` at ``point`` keep alive.

    Runs the forward, ``grad`` with ``create_graph=True`` and the product with a vector of ones
    under ``saved_tensors_hooks``, and sums the distinct storages saved, leaving out the point
    itself (it is in memory anyway); tensors are counted by their own size, not their storage's,
    so a slice of a large data tensor counts as the slice. The forward's share is what a plain gradient needs.

    >>> sizes = activation_bytes(lambda p: (p["w"].exp() * 2).sum(), {"w": torch.ones(1000)})
    >>> sizes.gradient >= 1000 * 4, sizes.hvp > sizes.gradient
    (True, True)
    """
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in point.items()}
    inputs = {t.untyped_storage().data_ptr() for t in leaves.values()}
    saved: Dict[Tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in inputs:  # a tensor saved twice (or a view) counts once
            size = t.numel() * t.element_size()
            saved[(t.data_ptr(), size)] = size
        # not t itself: a node that saved its own output through a hook returning it would hold it strongly, a cycle
        # (output -> node -> output) that only the cycle collector frees, with the closure's data in it
        return t.detach()

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(leaves)
        forward = sum(saved.values())
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
        dot = sum((g * torch.ones_like(g)).sum() for g in grads if g is not None)
        if isinstance(dot, torch.Tensor) and dot.requires_grad:
            torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
    return ActivationBytes(gradient=max(1, forward), hvp=max(1, sum(saved.values())))


_MEASURED: Dict[tuple, object] = {}  # measured activations, by support loss and shapes


def measured_once(key: object, point: Tensors, data, measure: Optional[Callable[[], T]] = None) -> T:
    """``measure()`` once per ``key`` (what identifies a support loss across adaptations, ``None``: not known, always
    measured) and the shapes of one task's ``point`` and ``data``: the activations of a model and shapes do not change
    from one meta-batch to the next, so their probe (a forward and two backwards) is paid once. Without ``measure``:
    what was measured, or ``None``."""
    if key is None:
        return None if measure is None else measure()  # pyright: ignore[reportReturnType]  # None only when not asked to measure
    full = (key, tensor_shapes(point), tensor_shapes(data))
    if measure is None:
        return _MEASURED.get(full)  # pyright: ignore[reportReturnType]  # None when not measured yet
    if full not in _MEASURED:
        if len(_MEASURED) >= 256:  # bounded: shapes that change every call measure again
            _MEASURED.clear()
        _MEASURED[full] = measure()
    return _MEASURED[full]  # pyright: ignore[reportReturnType]  # what measure() returned for this key


def task_activations(loss_fn: Callable, point: Tensors, data, bn: str, key: object) -> Optional[int]:
    """The activation bytes of one HVP of ``loss_fn(point, task)`` for the first task of ``data`` (a pytree with a
    leading task dimension), measured once per ``key`` (what identifies the support loss) and shapes.

    ``None`` where the support loss draws random numbers (the caller's generators are left as they were) or fails:
    the plan that runs it then is the loop over tasks, whose first inner step names any error.
    """
    first = pytree.tree_map(lambda t: t[0] if isinstance(t, torch.Tensor) else t, data)

    def measure() -> Optional[int]:
        devices = devices_of([*point.values(), *(t for t in pytree.tree_leaves(data) if isinstance(t, torch.Tensor))])
        with torch.random.fork_rng(devices=list(devices)):
            before = RandomState.capture(devices)
            try:
                with module_policy(bn):
                    hvp: Optional[int] = activation_bytes(lambda p: loss_fn(p, first), point).hvp
            except Exception:  # the loop plan runs it and its first inner step raises the error in context
                return None
            return None if before.moved(devices) else hvp

    return measured_once(("tasks", key), point, first, measure)


def keeps_graphs(options, batched: bool) -> bool:
    """Whether an inner loop may keep its steps' graphs (within :data:`AUTO_KEEP_GRAPH_CAP`): ``memory_budget="auto"``,
    one task at a time, reverse-over-reverse HVPs in eager mode, each replay the step itself (``randomness`` "replay" or
    "error": a kept graph holds the step's own random draws) and every point stored.

    >>> from binom_opt import Options
    >>> keeps_graphs(Options(), batched=False), keeps_graphs(Options(memory_budget="inner_step"), batched=False)
    (True, False)
    """
    return (options.memory_budget == AUTO and not batched and not options.compile_hvps and options.hvp_mode == "rev"
            and options.randomness in ("replay", "error") and (options.checkpoint_every or 1) == 1)


def auto_budget(device: Optional[torch.device]) -> int:
    """``memory_budget="auto"``: on CUDA a quarter of the device's free memory, at most 512 MiB, so that the
    HVPs a round runs at once leave room for the rest of a training step; elsewhere :data:`AUTO_CPU_CAP`
    (an out-of-memory error still halves the chunk).

    >>> auto_budget(torch.device("cpu")) == AUTO_CPU_CAP
    True
    """
    if device is None or torch.device(device).type != "cuda":
        return AUTO_CPU_CAP
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(free // 4, AUTO_CUDA_CAP))


def loops_over_tasks(options, device: Optional[torch.device], activations: Optional[Callable[[], Optional[int]]] = None) -> bool:
    """Whether a meta-batch runs its tasks one after another (a Python loop) instead of vmapped together.

    ``memory_budget="auto"`` on the CPU: a loop, unless ``activations()`` (the measured activation bytes of one HVP
    of every task at once; ``None``: not measured) is at most :data:`AUTO_VMAP_TASKS_CAP`. Vmapped over tasks,
    per-task weights turn every convolution into a grouped one, and a meta-batch's activations (480 MB a layer for
    32 Omniglot query sets on Conv4-64) leave the cache; on a CPU both make the vmapped meta-batch slower than
    the loop and several times heavier (benchmarks/results/task_batching_cpu.md), while a small model (the MAML
    paper's sine MLP, a linear head) runs several times faster in one call per meta-batch
    (benchmarks/results/task_plan_cpu.md). Each looped task then
    runs exactly the per-task path (its round's points still vmapped), so the result does not
    depend on how many tasks the batch holds, and its meta-gradient is taken whole before the next
    task's (:meth:`~binom_opt.core.batching.Tasks.alone`). On CUDA, and with any other budget, the tasks are
    vmapped together: one launch for the whole meta-batch. The vmap is also kept where the options
    ask for it: an explicit ``chunk_size`` (HVPs of points x tasks at once), ``compile_hvps`` (one
    compiled graph for the meta-batch) and ``randomness="same"`` (its masks are drawn for the tasks
    together).

    >>> from binom_opt import Options
    >>> loops_over_tasks(Options(), torch.device("cpu")), loops_over_tasks(Options(memory_budget=None), torch.device("cpu"))
    (True, False)
    """
    cpu = device is None or torch.device(device).type == "cpu"
    if not (options.memory_budget == AUTO and cpu and options.chunk_size is None and not options.compile_hvps
            and options.randomness != "same"):
        return False
    measured = None if activations is None else activations()
    return measured is None or measured > AUTO_VMAP_TASKS_CAP


class Chunking:
    """The chunk size for batched HVP rounds, fixed by a cap, a budget and out-of-memory retries.

    Args:
        chunk_size: at most this many HVPs at once (``None``: no cap).
        memory_budget: bytes (or a string, see :func:`parse_memory_budget`) for one round's
            activations, ``"inner_step"`` for the activations of the inner step, ``"auto"``
            (:func:`auto_budget`, read when a round first needs it: on CUDA a query of free memory) or ``None``.
        inner_batch: tasks one inner step runs at once (for ``"inner_step"``).
        device: where the HVPs run (for ``"auto"``).

    Attributes:
        fallbacks: the chunk sizes retried with after out-of-memory errors.
        per_hvp_bytes: the measured activation bytes of one HVP (``None`` until a budget needs it).
    """

    def __init__(self, chunk_size: Optional[int] = None, memory_budget: Union[None, int, str] = None, inner_batch: int = 1,
                 device: Optional[torch.device] = None):
        check_chunk_size(chunk_size)
        self.cap = chunk_size
        self.budget = parse_memory_budget(memory_budget)  # "auto" in bytes once a round needs it (not for kept graphs)
        self.device = device
        self.inner_batch = inner_batch
        self.per_hvp_bytes: Optional[int] = None
        self.budget_bytes: Optional[int] = None  # the budget in bytes, once known
        self.fallbacks: List[int] = []
        self.used: Optional[int] = None  # the largest number of HVPs one call ran at once

    def limit(self, measure: Callable[[], ActivationBytes]) -> Optional[int]:
        """The most HVPs at once (``None``: no limit); ``measure()`` is called once, when a budget needs it."""
        cap = self.cap
        if self.budget is not None:
            if self.per_hvp_bytes is None:
                sizes = measure()
                self.per_hvp_bytes = sizes.hvp
                self.budget_bytes = (self.inner_batch * sizes.gradient if self.budget == INNER_STEP
                                     else auto_budget(self.device) if self.budget == AUTO else self.budget)  # pyright: ignore[reportAttributeAccessIssue]  # bytes once parsed
            by_budget = max(1, self.budget_bytes // self.per_hvp_bytes)  # pyright: ignore[reportOptionalOperand]  # both set just above
            cap = by_budget if cap is None else min(cap, by_budget)
        return cap

    def run(self, count: int, measure: Callable[[], ActivationBytes], call: Callable[[Optional[int]], T]) -> T:
        """``call(limit)`` for a round of ``count`` HVPs; halves the limit and retries after an OOM.

        A single HVP needs no budget (nothing is measured for it)."""
        while True:
            limit = self.limit(measure) if count > 1 else 1
            try:
                out = call(None if limit is None or limit >= count else limit)
                self.used = max(self.used or 0, min(limit or count, count))
                return out
            except torch.OutOfMemoryError:
                size = min(limit or count, count)
                if size <= 1:
                    raise
                self.cap = size // 2  # kept for the rest of this computation
                self.fallbacks.append(self.cap)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
