"""higher-style drop-in: ``with bo.innerloop_ctx(model, inner_opt) as (fmodel, diffopt)``.

A higher loop switches to binom_opt by changing the context manager and the step, which takes a
closure instead of a loss tensor; every argument keeps its meaning::

    with bo.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):  # was higher.innerloop_ctx
        for _ in range(steps):
            diffopt.step(lambda m: F.cross_entropy(m(x_s), y_s))    # was diffopt.step(F.cross_entropy(fmodel(x_s), y_s))
        F.cross_entropy(fmodel(x_q), y_q).backward()

Without ``estimator=`` the meta-gradient is higher's own (exact), on every tensor higher gives one to.
Names mean what they mean in higher: ``copy_initial_weights`` (default ``True``: the initial weights are
copied when the block starts, so no meta-gradient reaches the model's parameters, only the other tensors
the loop uses that require grad, such as per-example weights or a weighting network; ``False`` for MAML,
which meta-learns the initialisation), ``fmodel`` (a module of its own: ``fmodel.train()`` / ``eval()``,
``parameters()`` / ``fast_params``, ``state_dict()``, its submodules, attributes and methods, with the
adapted weights), ``diffopt.param_groups`` (each group's learning rate writable between steps; a tensor
that requires grad there is meta-learned), ``override``, ``track_higher_grads``. A backward that
reaches an adaptation with ``copy_initial_weights=True`` and nothing to meta-learn warns, naming the fix.

``diffopt.step`` takes a closure ``fmodel -> loss`` (the estimator replays it at recorded points); a
loss tensor is a clear error.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .core.batching import Tasks
from .core.estimators import Estimator, Exact, FirstOrder, check_estimator
from .core.learner import AdaptedModule, Learner, module_loss
from .core.options import Options
from .core.recorder import InnerLoop, Setup
from .core.stats import DivergenceMonitor
from .core.update_rules import InnerOptimizer, read_optimizer

__all__ = ["innerloop_ctx", "FunctionalModel", "DifferentiableOptimizer"]

# One divergence warning per model, however many innerloop_ctx blocks (one per task) it goes through.
_MONITORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FunctionalModel(AdaptedModule):
    """The model at the current inner step (higher's ``fmodel``), a module of its own (:class:`~binom_opt.core.learner.AdaptedModule`)."""

    @property
    def fast_params(self) -> List[torch.Tensor]:
        """Every parameter of the model at this point, in the model's order (the adapted ones where they adapt)."""
        return list(self.parameters())


class DifferentiableOptimizer:
    """higher's ``diffopt``: ``step(closure)`` takes one recorded inner step.

    Attributes:
        param_groups: the inner optimizer's parameter groups, as in higher: each group's ``"lr"`` may be set
            between steps (a tensor that requires grad is meta-learned: a learned per-step learning rate) and
            holds from the next step on; the other hyperparameters are fixed by the optimizer.
    """

    def __init__(self, loop: InnerLoop, read: InnerOptimizer, opt: torch.optim.Optimizer, fmodel: FunctionalModel):
        self._loop, self._read, self._fmodel = loop, read, fmodel
        self.param_groups = [{k: v for k, v in group.items()} for group in opt.param_groups]
        self._fixed = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in self.param_groups]
        self._lrs = [group["lr"] for group in self.param_groups]

    def step(self, closure: Callable[[Learner], torch.Tensor], override: Optional[Mapping[str, Sequence]] = None) -> None:
        """One inner step on ``closure(fmodel)``, the support loss as a function of the model.

        ``override={"lr": [...]}`` (one value, or one per parameter group) sets the learning rates from
        this step on, as in higher; tensors that require grad are meta-learned.
        """
        if override is None and self._written():
            override = {"lr": [group["lr"] for group in self.param_groups]}
        hyper = None if override is None else self._read._replace(hyper=self._loop.hyper).override(override)
        self._loop.step(closure, hyper=hyper, modes=self._fmodel.modes, modules=self._fmodel._model_modules)
        if hyper is not None:
            self._lrs = [group["lr"] for group in self.param_groups]

    def _written(self) -> bool:
        """Whether a learning rate in :attr:`param_groups` changed since the last step (other hyperparameters cannot)."""
        for group, fixed in zip(self.param_groups, self._fixed):
            changed = [k for k, v in fixed.items() if not _same_value(group.get(k), v)]
            if changed:
                raise ValueError(
                    f"diffopt.param_groups: {changed} changed between inner steps; only 'lr' may change during the inner "
                    "loop (set the others on the torch.optim instance before the block)."
                )
        return any(group["lr"] is not lr for group, lr in zip(self.param_groups, self._lrs))


def _same_value(a: object, b: object) -> bool:
    """The same hyperparameter: the same tensor, or equal plain values (a float written again is no change)."""
    return a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)


@contextlib.contextmanager
def innerloop_ctx(model: nn.Module, opt: torch.optim.Optimizer, *, estimator: Estimator = Exact(),
                  steps: Optional[int] = None, copy_initial_weights: bool = True, track_higher_grads: bool = True,
                  override: Optional[Mapping[str, Sequence]] = None, options: Optional[Options] = None,
                  **option_keywords: Any) -> Iterator[Tuple[FunctionalModel, DifferentiableOptimizer]]:
    """Yield ``(fmodel, diffopt)`` for one task's inner loop, as ``higher.innerloop_ctx`` does.

    Args:
        model: the model; the outer loss's ``backward()`` puts the meta-gradient on its parameters.
        opt: the inner optimizer over the parameters that adapt: ``torch.optim.SGD`` (momentum,
            dampening, nesterov, weight decay), ``Adam`` or ``AdamW``.
        estimator: the meta-gradient estimator (default ``Exact()``, higher's own meta-gradient).
        steps: if set, the number of ``diffopt.step`` calls required before backward.
        copy_initial_weights: ``True`` (higher's default) copies the model's weights when the block starts: no
            meta-gradient reaches them, only the other tensors the loop uses that require grad (learned example
            weights, a weighting network); the model may then change in place before the backward. ``False``
            meta-learns the model's parameters (MAML).
        track_higher_grads: ``False`` for evaluation: plain steps, no meta-gradient.
        override: ``{"lr": [...]}``, one value or one per parameter group (or one per adapted parameter),
            as in higher; tensors that require grad are meta-learned (Meta-SGD).
        options: a :class:`~binom_opt.Options`; its fields may also be given as keyword arguments.

    Example:
        >>> import torch, torch.nn.functional as F, binom_opt as bo
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(6, 4), torch.arange(6) % 3
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with bo.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     for _ in range(3):
        ...         diffopt.step(lambda m: F.cross_entropy(m(x), y))
        ...     F.cross_entropy(fmodel(x), y).backward()
        >>> model.weight.grad.shape
        torch.Size([3, 4])
    """
    check_estimator(estimator)
    if steps is not None:
        estimator.plan(steps)
    options = Options.resolve(options, **option_keywords)
    named = dict(model.named_parameters())
    read = read_optimizer(named, opt, override)
    if copy_initial_weights:  # as higher: copies made now, which later in-place changes of the model do not reach
        named = {n: p.detach().clone().requires_grad_(n in read.adapted) for n, p in named.items()}
    monitor = _MONITORS.setdefault(model, DivergenceMonitor())
    fixed = {n: p for n, p in named.items() if n not in read.adapted} if copy_initial_weights else None
    setup = Setup(estimator if track_higher_grads else FirstOrder(), options, module_loss(model, options.bn, False, fixed), steps,
                  on_stats=monitor, copied=copy_initial_weights)
    loop = InnerLoop(setup, {n: named[n] for n in read.adapted}, read.rules, read.hyper, Tasks())
    fmodel = FunctionalModel(loop, model, options.bn, fixed, detach=not track_higher_grads)
    yield fmodel, DifferentiableOptimizer(loop, read, opt, fmodel)
