"""What one meta-gradient computation did, for users who want to see the estimator at work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from .estimators import Estimator

__all__ = ["MetaGradientStats"]


@dataclass(frozen=True)
class MetaGradientStats:
    """Counts and norms of the last meta-gradient.

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
    """

    estimator: Estimator
    steps: int
    levels: int
    hvp_count: int
    rounds: int
    contributions: List[float] = field(default_factory=list)
    inner_losses: List[float] = field(default_factory=list)
