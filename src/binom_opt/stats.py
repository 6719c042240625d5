"""What one meta-gradient computation did, for users who want to see the estimator at work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from .estimators import Estimator

__all__ = ["MetaGradientStats"]


@dataclass(frozen=True)
class MetaGradientStats:
    """Counts and norms of the last meta-gradient.

    For a task-batched meta-gradient (``engine.adapt_batch``) the counts cover the whole
    meta-batch and the norms are taken over all its tasks together, so the series of one task
    that diverges among many well-behaved ones may not show in ``diverging``.

    Attributes:
        estimator: the estimator used.
        steps: ``K``, the number of inner steps.
        levels: ``L``, the most Hessian factors a kept term may have.
        hvp_count: Hessian-vector products computed (the dominant cost).
        rounds: sequential HVP rounds (each one batched call).
        contributions: one norm per round; for Binomial/Hybrid, round ``l``'s entry is the norm
            of the terms with exactly ``l`` Hessian factors (over the steps the recursion has
            at that round, see :class:`binom_opt.expansion.ExpansionResult`). Entries that grow
            with ``l`` mean the expansion diverges (``alpha * ||H||`` too large for it).
        inner_losses: the support loss at each inner step.
        schedule: ``"binomial"`` (batched rounds) or ``"sequential"`` (one HVP per round).
        g_norm: the norm of the outer gradient ``g``, the order-0 term.
        chunk_fallbacks: chunk sizes the batched HVPs were retried with after running out of
            memory (empty when none did).
        skipped: the meta-gradient was not finite and ``nan_policy="skip_task"`` zeroed it
            (for a task-batched meta-gradient: the number of tasks zeroed).
        hvps_at_once: the most HVPs one batched call ran at once (``None`` when no round
            batched more than one), after ``chunk_size``, ``memory_budget`` and fallbacks.
        per_hvp_bytes: one HVP's measured activation bytes, when a ``memory_budget`` needed it.
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
    chunk_fallbacks: List[int] = field(default_factory=list)
    skipped: Union[bool, int] = False
    hvps_at_once: Optional[int] = None
    per_hvp_bytes: Optional[int] = None

    @property
    def diverging(self) -> bool:
        """Whether the binomial series grows with the order instead of shrinking.

        True when some order's norm exceeds the previous one's, starting from ``||g||``:
        the dropped higher orders are then not small and the estimate can be far off
        (``alpha * ||H||`` is too large for this expansion). Always False for the
        sequential estimators, whose per-round norms measure single factors.
        """
        if self.schedule != "binomial":
            return False
        norms = [self.g_norm, *self.contributions]
        return any(later > earlier for earlier, later in zip(norms, norms[1:]))
