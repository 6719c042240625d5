"""learn2learn-style drop-in: ``MAML(model, lr)``, ``maml.clone()``, ``learner.adapt(closure)``.

A learn2learn loop switches to the binomial meta-gradient by changing two lines: the wrapper's
constructor and the adapt call, which takes a closure instead of a loss tensor::

    maml = bo.MAML(model, lr=0.5, estimator=bo.Binomial(2))     # was l2l.algorithms.MAML(model, lr=0.5)
    for task in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(lambda m: loss(m(x_s), y_s))          # was learner.adapt(loss(learner(x_s), y_s))
        loss(learner(x_q), y_q).backward()

``adapt`` cannot take a loss tensor: the estimator replays the support loss at the recorded
points after the inner loop to take Hessian-vector products, and a tensor holds one value, not
the function. (learn2learn keeps every step's graph alive instead, which is what makes its
memory grow with the number of steps.)
"""

from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch
from torch import nn

from .adaptation import AdaptationSettings, InnerLoop, Learner
from .engine import DivergenceMonitor
from .estimators import Binomial, Estimator, FirstOrder
from .functional import check_estimator, step_sizes
from .stats import MetaGradientStats
from .update_rules import SGDRule

__all__ = ["MAML", "MAMLLearner"]


class MAML(nn.Module):
    """Wraps a model for MAML with plain SGD inner steps, learn2learn style.

    Args:
        model: the model whose parameters are meta-learned (``maml.parameters()`` are its).
        lr: the inner learning rate.
        steps: if set, every clone must be adapted exactly this many times before its loss is
            differentiated (a clear error otherwise); ``None`` takes as many steps as were made.
        estimator: the meta-gradient estimator (default ``Binomial(1)``).
        first_order: ``True`` uses ``FirstOrder()`` whatever ``estimator`` says (learn2learn's flag).
        allow_unused: parameters the support loss does not use take no step instead of raising.
        allow_nograd: parameters with ``requires_grad=False`` are left out of the adaptation
            instead of raising.
        hvp, chunk_size, memory_budget, compile_hvps, randomness: HVP backend, batching bounds, compilation
            and vmap randomness (see :class:`MetaGradientEngine`).
        bn: BatchNorm policy (``"transductive"``, ``"frozen"``, ``"error"``; see :mod:`binom_opt.batchnorm`).

    Example:
        >>> import torch, torch.nn.functional as F, binom_opt as bo
        >>> maml = bo.MAML(torch.nn.Linear(4, 3), lr=0.1, estimator=bo.Exact())
        >>> x, y = torch.randn(6, 4), torch.arange(6) % 3
        >>> learner = maml.clone()
        >>> for _ in range(2):
        ...     learner.adapt(lambda m: F.cross_entropy(m(x), y))
        >>> F.cross_entropy(learner(x), y).backward()
        >>> maml.last_stats.hvp_count
        2
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        steps: Optional[int] = None,
        estimator: Estimator = Binomial(1),
        first_order: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
        hvp: str = "auto",
        chunk_size: Optional[int] = None,
        randomness: str = "error",
        bn: str = "transductive",
        memory_budget: Union[None, int, str] = None,
        compile_hvps: bool = False,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        estimator = FirstOrder() if first_order else estimator
        check_estimator(estimator)
        if steps is not None:
            estimator.plan(steps)  # validates steps and L, C <= steps now
        self.module = model
        self.lr = lr
        self.estimator = estimator
        adapted = _adapted(model, allow_nograd)
        step_sizes(lr, dict.fromkeys(adapted))  # validates lr now
        self._monitor = DivergenceMonitor()
        self._settings = AdaptationSettings(
            model, adapted, estimator, hvp=hvp, chunk_size=chunk_size, randomness=randomness, bn=bn, steps=steps,
            allow_unused=allow_unused, memory_budget=memory_budget, compile_hvps=compile_hvps, on_stats=self._monitor,
        )

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def clone(self) -> "MAMLLearner":
        """A learner for one task, starting at the model's current parameters."""
        adapted = self._settings.adapted
        return MAMLLearner(InnerLoop(self._settings, dict.fromkeys(adapted, SGDRule()), {n: {"lr": self.lr} for n in adapted}))

    @property
    def last_stats(self) -> Optional[MetaGradientStats]:
        """Counts and norms of the last meta-gradient computed through one of this wrapper's clones."""
        return self._monitor.last_stats


class MAMLLearner:
    """One task's learner: ``adapt(closure)`` takes an inner step, calling it runs the model.

    Calling the learner after some ``adapt`` steps gives outputs whose gradient with respect to
    the model's parameters is the chosen estimator of the MAML meta-gradient over those steps.
    """

    def __init__(self, loop: InnerLoop):
        self._loop = loop

    def adapt(self, closure: Callable[[Learner], torch.Tensor]) -> None:
        """One inner SGD step on ``closure(learner)``, the support loss as a function of the learner."""
        self._loop.step(closure)

    def __call__(self, *args, **kwargs):
        return self._loop.learner()(*args, **kwargs)

    @property
    def module(self) -> nn.Module:
        return self._loop.settings.model

    @property
    def params(self):
        """The adapted parameters after the steps so far (differentiable), by name."""
        return self._loop.params()

    @property
    def steps_taken(self) -> int:
        return self._loop.steps_taken

    def __repr__(self) -> str:
        return f"MAMLLearner({type(self.module).__name__}, steps_taken={self.steps_taken})"


def _adapted(model: nn.Module, allow_nograd: bool) -> List[str]:
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen and not allow_nograd:
        raise ValueError(
            f"Parameter(s) {frozen} have requires_grad=False and cannot adapt. Pass allow_nograd=True "
            "to leave them out of the inner loop (they stay fixed), or set requires_grad=True."
        )
    adapted = [n for n, p in model.named_parameters() if p.requires_grad]
    if not adapted:
        raise ValueError("The model has no parameter that requires grad: there is nothing to adapt.")
    return adapted
