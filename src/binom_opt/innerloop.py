"""higher-style drop-in: ``with bo.innerloop_ctx(model, inner_opt) as (fmodel, diffopt)``.

A higher loop switches to binom_opt by changing the context manager and the step, which takes a
closure instead of a loss tensor::

    with bo.innerloop_ctx(model, inner_opt) as (fmodel, diffopt):    # was higher.innerloop_ctx(..., copy_initial_weights=False)
        for _ in range(steps):
            diffopt.step(lambda m: F.cross_entropy(m(x_s), y_s))    # was diffopt.step(F.cross_entropy(fmodel(x_s), y_s))
        F.cross_entropy(fmodel(x_q), y_q).backward()

Without ``estimator=`` the meta-gradient is higher's own (exact). Names mean what they mean in
higher: ``fmodel.parameters()`` / ``fast_params`` (the adapted parameters), ``fmodel.train()`` /
``eval()``, ``fmodel.state_dict()``, ``override`` (per parameter group, at creation or per
``diffopt.step``, kept for the later steps). Differences, on purpose:

* ``copy_initial_weights``: higher defaults to ``True``, which detaches the initial weights so
  that no meta-gradient reaches ``model`` (a common MAML bug). Here the meta-gradient always
  reaches ``model``'s parameters, which is what ``copy_initial_weights=False`` does in higher;
  passing ``True`` is an error that says so.
* ``diffopt.step`` takes a closure ``fmodel -> loss`` (the estimator replays it at recorded
  points); a loss tensor is a clear error.
* ``track_higher_grads=False`` (evaluation) takes plain steps with no meta-gradient at all.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .core.batching import Tasks
from .core.estimators import Estimator, Exact, FirstOrder, check_estimator
from .core.learner import Learner, module_loss
from .core.options import Options
from .core.recorder import InnerLoop, Setup
from .core.stats import DivergenceMonitor
from .core.update_rules import InnerOptimizer, read_optimizer

__all__ = ["innerloop_ctx", "FunctionalModel", "DifferentiableOptimizer"]

# One divergence warning per model, however many innerloop_ctx blocks (one per task) it goes through.
_MONITORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FunctionalModel:
    """The model at the current inner step (higher's ``fmodel``); callable like the model."""

    def __init__(self, loop: InnerLoop, model: nn.Module, bn: str, track_higher_grads: bool):
        self._loop, self._model, self._bn, self._track = loop, model, bn, track_higher_grads

    def __call__(self, *args, **kwargs):
        return Learner(self._model, self.params, self._bn)(*args, **kwargs)

    @property
    def params(self):
        """The adapted parameters after the steps so far, by name."""
        params = {n: t.squeeze(0) for n, t in self._loop.outputs().items()}
        return params if self._track else {n: t.detach() for n, t in params.items()}

    @property
    def fast_params(self) -> List[torch.Tensor]:
        """Every parameter of the model at this point, in the model's order (the adapted ones where they adapt)."""
        params = self.params
        return [params.get(n, p) for n, p in self._model.named_parameters()]

    def parameters(self) -> Iterator[torch.Tensor]:
        """An iterator over :attr:`fast_params`, as higher's ``fmodel.parameters()``."""
        return iter(self.fast_params)

    def state_dict(self) -> dict:
        """The model's state dict with the adapted parameters in place."""
        return {**self._model.state_dict(keep_vars=True), **self.params}

    def train(self, mode: bool = True) -> FunctionalModel:
        """Set the model's train/eval mode until the ``innerloop_ctx`` block ends (each step keeps the mode it ran in)."""
        self._model.train(mode)
        return self

    def eval(self) -> FunctionalModel:
        """Put the model in eval mode (``train(False)``); returns ``self``."""
        return self.train(False)

    @property
    def training(self) -> bool:
        """Whether the model is in train mode."""
        return self._model.training


class DifferentiableOptimizer:
    """higher's ``diffopt``: ``step(closure)`` takes one recorded inner step."""

    def __init__(self, loop: InnerLoop, read: InnerOptimizer):
        self._loop, self._read = loop, read

    def step(self, closure: Callable[[Learner], torch.Tensor], override: Optional[Mapping[str, Sequence]] = None) -> None:
        """One inner step on ``closure(fmodel)``, the support loss as a function of the model.

        ``override={"lr": [...]}`` (one value, or one per parameter group) sets the learning rates from
        this step on, as in higher; tensors that require grad are meta-learned.
        """
        self._loop.step(closure, hyper=None if override is None else self._read._replace(hyper=self._loop.hyper).override(override))


@contextlib.contextmanager
def innerloop_ctx(model: nn.Module, opt: torch.optim.Optimizer, *, estimator: Estimator = Exact(),
                  steps: Optional[int] = None, copy_initial_weights: bool = False, track_higher_grads: bool = True,
                  override: Optional[Mapping[str, Sequence]] = None, options: Optional[Options] = None,
                  **option_keywords: Any) -> Iterator[Tuple[FunctionalModel, DifferentiableOptimizer]]:
    """Yield ``(fmodel, diffopt)`` for one task's inner loop, as ``higher.innerloop_ctx`` does.

    Args:
        model: the model; the outer loss's ``backward()`` puts the meta-gradient on its parameters.
        opt: the inner optimizer over the parameters that adapt: ``torch.optim.SGD`` (momentum,
            dampening, nesterov, weight decay), ``Adam`` or ``AdamW``.
        estimator: the meta-gradient estimator (default ``Exact()``, higher's own meta-gradient).
        steps: if set, the number of ``diffopt.step`` calls required before backward.
        copy_initial_weights: must be ``False`` (see the module docstring).
        track_higher_grads: ``False`` for evaluation: plain steps, no meta-gradient.
        override: ``{"lr": [...]}``, one value or one per parameter group (or one per adapted parameter),
            as in higher; tensors that require grad are meta-learned (Meta-SGD).
        options: a :class:`~binom_opt.Options`; its fields may also be given as keyword arguments.

    Example:
        >>> import torch, torch.nn.functional as F, binom_opt as bo
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(6, 4), torch.arange(6) % 3
        >>> with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        ...     for _ in range(3):
        ...         diffopt.step(lambda m: F.cross_entropy(m(x), y))
        ...     F.cross_entropy(fmodel(x), y).backward()
        >>> model.weight.grad.shape
        torch.Size([3, 4])
    """
    if copy_initial_weights:
        raise ValueError(
            "copy_initial_weights=True would detach the initial weights so that no meta-gradient reaches the model "
            "(higher's default, and a common MAML bug). binom_opt always meta-learns the model's parameters: drop the "
            "argument or pass copy_initial_weights=False."
        )
    check_estimator(estimator)
    if steps is not None:
        estimator.plan(steps)
    options = Options.resolve(options, **option_keywords)
    named = dict(model.named_parameters())
    read = read_optimizer(named, opt, override)
    monitor = _MONITORS.setdefault(model, DivergenceMonitor())
    setup = Setup(estimator if track_higher_grads else FirstOrder(), options, module_loss(model, options.bn, False), steps,
                  on_stats=monitor)
    loop = InnerLoop(setup, {n: named[n] for n in read.adapted}, read.rules, read.hyper, Tasks())
    modes = [m.training for m in model.modules()]
    try:
        yield FunctionalModel(loop, model, options.bn, track_higher_grads), DifferentiableOptimizer(loop, read)
    finally:  # fmodel.train()/eval() last as long as the block, as higher's own copy of the model does
        for module, mode in zip(model.modules(), modes):
            module.training = mode
