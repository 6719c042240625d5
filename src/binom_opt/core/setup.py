"""What stays fixed across the adaptations of one engine or drop-in: the estimator, the options, the support loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .estimators import Estimator
from .options import Options

__all__ = ["Setup"]


@dataclass
class Setup:
    """What stays fixed across the adaptations of one engine or drop-in.

    Attributes:
        estimator, options: how meta-gradients are computed.
        make_loss: turns a user closure into the support loss ``loss(phi, task)`` of one task.
        steps: the number of inner steps every adaptation must take before backward (``None``: any).
        allow_unused: adapted parameters the support loss does not use get zero gradients.
        on_stats: called with the :class:`~binom_opt.MetaGradientStats` of every meta-gradient.
        copied: the initial point is a copy that no meta-gradient reaches (higher's ``copy_initial_weights=True``):
            only the other meta-parameters get one.
    """

    estimator: Estimator
    options: Options
    make_loss: Callable[..., Callable]
    steps: Optional[int] = None
    allow_unused: bool = False
    on_stats: Optional[Callable] = None
    copied: bool = False
