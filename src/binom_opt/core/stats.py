"""What one meta-gradient computation did, and the warning when a binomial series diverges."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .estimators import Estimator, ExpansionPlan

__all__ = ["MetaGradientStats", "ExpansionDivergenceWarning", "DivergenceMonitor", "LaterStats", "made", "merged", "stats_when_due",
           "add_stats", "make_stats", "merge_stats"]


@dataclass(frozen=True)
class MetaGradientStats:
    """Counts and norms of the last meta-gradient (of one task, or of a meta-batch).

    Attributes:
        estimator: the estimator used.
        steps: ``K``, the number of inner steps.
        levels: ``L``, the most Hessian factors a kept term may have.
        hvp_count: Hessian-vector products computed, over all tasks (the dominant cost).
        rounds: sequential HVP rounds (each one batched call).
        contributions: one norm per round, over all tasks; for Binomial/Hybrid, round ``l``'s entry is
            the norm of the terms with exactly ``l`` Hessian factors (over the steps the recursion has
            at that round, see :class:`binom_opt.core.expansion.ExpansionResult`). Entries that grow
            with ``l`` mean the expansion diverges (``alpha * ||H||`` too large for it). For Implicit,
            the relative residual after each conjugate-gradient iteration.
        inner_losses: the support loss at each inner step (the mean over the tasks).
        schedule: ``"binomial"`` (batched rounds), ``"sequential"`` (one HVP per round), ``"implicit"``
            or ``"reptile"``.
        g_norm: the norm of the outer gradient ``g``, the order-0 term, over all tasks.
        tasks: how many tasks the meta-gradient covers.
        diverging_tasks: the tasks whose own series grows with the order (see :attr:`diverging`).
        chunk_fallbacks: chunk sizes the HVPs were retried with after running out of memory.
        skipped: tasks whose meta-gradient was not finite and that ``nan_policy="skip_task"`` zeroed.
        hvps_at_once: the most HVPs (points x tasks) one call ran at once (``None`` when no HVP ran),
            after ``chunk_size``, ``memory_budget`` and fallbacks.
        per_hvp_bytes: one HVP's measured activation bytes, when a ``memory_budget`` needed it.
        cg_residual: for :class:`~binom_opt.Implicit`, the largest relative residual
            ``||g - (I + H/reg) x|| / ||g||`` over the tasks after the conjugate-gradient iterations
            (``contributions`` then holds it per iteration); ``None`` for the other estimators.
        unsolved_tasks: for Implicit, the tasks whose conjugate gradient met negative curvature or left a
            residual above ``tol`` (see :attr:`unreliable_solve`).
    """

    estimator: Estimator
    steps: int
    levels: int
    hvp_count: int
    rounds: int
    contributions: List[float] = field(default_factory=list)
    inner_losses: List[float] = field(default_factory=list)
    schedule: str = "sequential"
    g_norm: float = 0.0
    tasks: int = 1
    diverging_tasks: Tuple[int, ...] = ()
    chunk_fallbacks: List[int] = field(default_factory=list)
    skipped: int = 0
    hvps_at_once: Optional[int] = None
    per_hvp_bytes: Optional[int] = None
    cg_residual: Optional[float] = None
    unsolved_tasks: Tuple[int, ...] = ()

    @property
    def diverging(self) -> bool:
        """Whether the binomial series of some task grows with the order instead of shrinking.

        True when, for some task, some order's norm exceeds the previous one's, starting from
        ``||g||``: the dropped higher orders are then not small and the estimate can be far off.
        Always False for the sequential estimators, whose per-round norms measure single factors.
        """
        return bool(self.diverging_tasks)

    @property
    def unreliable_solve(self) -> bool:
        """Whether Implicit's conjugate gradient broke down for some task (an ``ImplicitSolveWarning`` under
        ``nan_policy="skip_task"``, an error under ``"raise"``): its meta-gradient is then unreliable.
        Always False for the other estimators."""
        return bool(self.unsolved_tasks)


def add_stats(read, g_norms: torch.Tensor, contributions: Optional[torch.Tensor]) -> None:
    """Add to ``read`` (a :class:`~binom_opt.core.readback.Readback`) what :func:`make_stats` reads besides the inner
    losses: the norms of ``g`` per task (of each entry, ``[entries, B]``, or of all, ``[1, B]``) and each round's per-task
    norms (``[rounds, B]``, ``None`` for no round), as they are. Their sums over entries and tasks are taken on the host,
    a few floats, instead of by a dozen operators on the device."""
    read.add("g_norms", g_norms)
    if contributions is not None:
        read.add("contributions", contributions)


def make_stats(estimator: Estimator, plan: ExpansionPlan, host: dict, tasks: int, hvp_count: int, chunking, skipped: int,
               cg_residual: Optional[float] = None, unsolved_tasks: Tuple[int, ...] = ()) -> MetaGradientStats:
    """The stats from the host values :func:`add_stats` added (and the inner ``"losses"``, ``[K, B]``), for ``tasks``
    tasks: norms over entries and tasks in float64 (``math.hypot``: no overflow of the squares)."""
    B = tasks
    g_rows, rounds = host["g_norms"], host.get("contributions", [])
    per_task = [[math.hypot(*(row[b] for row in g_rows)) for b in range(B)], *rounds]  # [1 + rounds][B]
    totals = [math.hypot(*row) for row in per_task]
    inner_losses = [math.fsum(row) / len(row) for row in host["losses"]]
    growing = tuple(b for b in range(B) if any(per_task[r + 1][b] > per_task[r][b] for r in range(len(rounds))))
    return MetaGradientStats(
        estimator=estimator, steps=len(inner_losses), levels=plan.levels, hvp_count=hvp_count * B, rounds=len(rounds),
        contributions=totals[1:], inner_losses=inner_losses, schedule=plan.schedule, g_norm=totals[0],
        tasks=B, diverging_tasks=growing if plan.schedule == "binomial" else (),
        chunk_fallbacks=list(chunking.fallbacks), skipped=skipped, hvps_at_once=chunking.used,
        per_hvp_bytes=chunking.per_hvp_bytes, cg_residual=cg_residual, unsolved_tasks=unsolved_tasks,
    )


def merge_stats(per_task: Sequence[MetaGradientStats]) -> MetaGradientStats:
    """The stats of a meta-batch from the stats of its tasks computed one by one, as if computed together:
    counts added, norms over all tasks, losses averaged, task indices in meta-batch order.

    >>> import binom_opt as bo
    >>> one = MetaGradientStats(bo.Exact(), steps=2, levels=2, hvp_count=2, rounds=2, contributions=[3.0, 0.0], g_norm=4.0)
    >>> merged = merge_stats([one, one])
    >>> merged.hvp_count, merged.tasks, merged.g_norm, merged.contributions
    (4, 2, 5.656854249492381, [4.242640687119285, 0.0])
    """
    first = per_task[0]
    norm = lambda values: math.sqrt(sum(v * v for v in values))
    indices = lambda has: tuple(b for b, s in enumerate(per_task) if has(s))
    residuals = [s.cg_residual for s in per_task if s.cg_residual is not None]
    at_once = [s.hvps_at_once for s in per_task if s.hvps_at_once is not None]
    return dataclasses.replace(
        first, hvp_count=sum(s.hvp_count for s in per_task), tasks=sum(s.tasks for s in per_task),
        contributions=[norm(values) for values in zip(*(s.contributions for s in per_task))],
        inner_losses=[sum(values) / len(per_task) for values in zip(*(s.inner_losses for s in per_task))],
        g_norm=norm(s.g_norm for s in per_task), diverging_tasks=indices(lambda s: s.diverging),
        chunk_fallbacks=[c for s in per_task for c in s.chunk_fallbacks], skipped=sum(s.skipped for s in per_task),
        hvps_at_once=max(at_once) if at_once else None, cg_residual=max(residuals) if residuals else None,
        unsolved_tasks=indices(lambda s: s.unreliable_solve),
    )


class LaterStats:
    """Stats made when first read, from host values already read: a schedule that cannot diverge (every one but the
    binomial) warns of nothing, so a loop that never reads ``last_stats`` pays no host work for them per meta-gradient.
    ``skipped`` is known at once (the engine reads it after every meta-gradient).

    >>> later = LaterStats(lambda: MetaGradientStats(None, steps=1, levels=0, hvp_count=0, rounds=0), skipped=0)
    >>> made(later).steps, made(later) is made(later)
    (1, True)
    """

    __slots__ = ("_make", "_stats", "skipped")

    def __init__(self, make: Callable[[], MetaGradientStats], skipped: int) -> None:
        self._make, self.skipped = make, skipped
        self._stats: Optional[MetaGradientStats] = None

    def __call__(self) -> MetaGradientStats:
        if self._stats is None:
            self._stats = self._make()
        return self._stats


Stats = Union[MetaGradientStats, LaterStats]


def made(stats: Optional[Stats]) -> Optional[MetaGradientStats]:
    """``stats`` made, where they are :class:`LaterStats`."""
    return stats() if isinstance(stats, LaterStats) else stats


def stats_when_due(estimator: Estimator, plan: ExpansionPlan, host: dict, tasks: int, hvp_count: int, chunking, skipped: int,
                   cg_residual: Optional[float] = None, unsolved_tasks: Tuple[int, ...] = ()) -> Stats:
    """:func:`make_stats` now where the series may diverge (a binomial schedule: its warning is due now), else when read
    (from these host values and counts only: no tensor of the meta-gradient is held for it)."""
    make = lambda: make_stats(estimator, plan, host, tasks, hvp_count, chunking, skipped, cg_residual, unsolved_tasks)
    return make() if plan.schedule == "binomial" else LaterStats(make, skipped)


def merged(per_task: Sequence[Stats]) -> Stats:
    """:func:`merge_stats` of stats that may be made later: later too where every one is."""
    merge = lambda: merge_stats([made(s) for s in per_task])  # pyright: ignore[reportArgumentType]  # made: stats given
    return LaterStats(merge, sum(s.skipped for s in per_task)) if all(isinstance(s, LaterStats) for s in per_task) else merge()


class ExpansionDivergenceWarning(RuntimeWarning):
    """The binomial series of a meta-gradient grows with the order (see ``MetaGradientStats.diverging``)."""


class DivergenceMonitor:
    """Keeps the last stats of one engine or drop-in and warns once when a binomial series diverges."""

    def __init__(self) -> None:
        self._last: Optional[Stats] = None
        self.skipped_tasks = 0
        self._warned = False

    @property
    def last_stats(self) -> Optional[MetaGradientStats]:
        return made(self._last)

    def __call__(self, stats: Stats) -> None:
        self._last = stats
        self.skipped_tasks += stats.skipped
        if isinstance(stats, MetaGradientStats) and stats.diverging and not self._warned:
            self._warned = True
            norms = ", ".join(f"{n:.3g}" for n in [stats.g_norm, *stats.contributions])
            remedies = ["a smaller L", "Truncated(L)", "a smaller inner learning rate", "or Exact()"]
            if getattr(stats.estimator, "hessian_scale", "paper") != "paper":
                remedies.insert(0, "hessian_scale='paper'")
            where = f" on {len(stats.diverging_tasks)} of {stats.tasks} tasks" if stats.tasks > 1 else ""
            warnings.warn(
                f"{stats.estimator!r}: the binomial series is diverging{where}: its terms of order 0..{stats.levels} have "
                f"norms [{norms}], growing instead of shrinking (inner lr * ||Hessian|| is too large for this expansion, "
                f"so the estimate can be far from the exact meta-gradient). Consider {', '.join(remedies)}. Shown once "
                "per engine; last_stats.diverging tells for each meta-gradient.",
                ExpansionDivergenceWarning,
                stacklevel=_user_stacklevel(),
            )


_LIBRARIES = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside binom_opt and torch: the user's line that ran backward."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1  # backward on another thread (CUDA): no user frame above
