"""learn2learn-style drop-in: ``MAML(model, lr)``, ``maml.clone()``, ``learner.adapt(closure)``.

A learn2learn loop switches to binom_opt by changing two lines: the wrapper's constructor and the
adapt call, which takes a closure instead of a loss tensor::

    maml = bo.MAML(model, lr=0.5)                               # was l2l.algorithms.MAML(model, lr=0.5)
    for task in tasks:
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(lambda m: loss(m(x_s), y_s))          # was learner.adapt(loss(learner(x_s), y_s))
        loss(learner(x_q), y_q).backward()

Without ``estimator=`` the meta-gradient is learn2learn's own (exact). Names mean what they mean in
learn2learn: ``first_order``, ``allow_unused`` and ``allow_nograd`` (also per ``clone`` and per
``adapt``), ``learner.module`` (the adapted model) and ``learner.parameters()`` (the adapted
parameters). ``adapt`` cannot take a loss tensor: the estimator replays the support loss at the
recorded points after the inner loop, and a tensor holds one value, not the function (learn2learn
keeps every step's graph alive instead, which is what makes its memory grow with the steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .core.batching import Tasks
from .core.estimators import Estimator, Exact, FirstOrder, check_estimator
from .core.learner import Learner, adapted_module, module_loss
from .core.options import Options
from .core.recorder import InnerLoop, Setup
from .core.stats import DivergenceMonitor, MetaGradientStats
from .core.update_rules import check_hyper, read_optimizer, sgd_rules

__all__ = ["MAML", "MAMLLearner"]


class MAML(nn.Module):
    """Wraps a model for MAML, learn2learn style.

    Args:
        model: the model whose parameters are meta-learned (``maml.parameters()`` are its).
        lr: the inner learning rate of plain SGD: a float, or a tensor (or a dict name -> float or
            tensor) whose tensors that require grad are meta-learned, as in Meta-SGD.
        steps: if set, every clone must be adapted exactly this many times before its loss is
            differentiated (a clear error otherwise); ``None`` takes as many steps as were made.
        estimator: the meta-gradient estimator (default ``Exact()``, learn2learn's own meta-gradient).
        first_order: ``True`` uses ``FirstOrder()`` whatever ``estimator`` says (learn2learn's flag).
        allow_unused: parameters the support loss does not use take no step instead of raising
            (default: ``allow_nograd``, as in learn2learn).
        allow_nograd: parameters with ``requires_grad=False`` are left out of the adaptation
            instead of raising.
        inner_opt: instead of plain SGD, a ``torch.optim`` SGD (momentum, nesterov, weight decay),
            Adam or AdamW built over the parameters that adapt; read at every ``clone()``, never stepped.
        options: a :class:`~binom_opt.Options`; its fields may also be given as keyword arguments.

    Example:
        >>> import torch, torch.nn.functional as F, binom_opt as bo
        >>> maml = bo.MAML(torch.nn.Linear(4, 3), lr=0.1)
        >>> x, y = torch.randn(6, 4), torch.arange(6) % 3
        >>> learner = maml.clone()
        >>> for _ in range(2):
        ...     learner.adapt(lambda m: F.cross_entropy(m(x), y))
        >>> F.cross_entropy(learner(x), y).backward()
        >>> maml.last_stats.hvp_count
        2
    """

    def __init__(self, model: nn.Module, lr: Union[None, float, torch.Tensor, Mapping[str, object]] = None,
                 steps: Optional[int] = None, estimator: Estimator = Exact(), first_order: bool = False,
                 allow_unused: Optional[bool] = None, allow_nograd: bool = False,
                 inner_opt: Optional[torch.optim.Optimizer] = None, options: Optional[Options] = None, **option_keywords: Any) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if (lr is None) == (inner_opt is None):
            raise ValueError("Give the inner step as exactly one of lr= (plain SGD) and inner_opt= (a torch.optim instance).")
        estimator = check_estimator(estimator)
        if steps is not None:
            estimator.plan(steps)  # validates steps and L, C <= steps now
        self.module, self.lr, self.estimator, self.inner_opt = model, lr, estimator, inner_opt
        self.first_order, self.allow_nograd = first_order, allow_nograd
        self.allow_unused = allow_nograd if allow_unused is None else allow_unused
        self.options = Options.resolve(options, **option_keywords)
        self._monitor = DivergenceMonitor()
        self._setup = Setup(estimator, self.options, module_loss(model, self.options.bn, False), steps, self.allow_unused,
                            self._monitor)
        self._rules(allow_nograd)  # validates now

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, with its own parameters (not adapted)."""
        return self.module(*args, **kwargs)

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> MAMLLearner:
        """A learner for one task, starting at the model's current parameters; the flags default to the wrapper's."""
        first_order = self.first_order if first_order is None else first_order
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        setup = dataclasses.replace(self._setup, estimator=FirstOrder() if first_order else self.estimator,
                                    allow_unused=self.allow_unused if allow_unused is None else allow_unused)
        named = dict(self.module.named_parameters())
        adapted, rules, hyper = self._rules(allow_nograd)
        loop = InnerLoop(setup, {n: named[n] for n in adapted}, rules, hyper, Tasks())
        return MAMLLearner(loop, self.module, self.options.bn, allow_nograd)

    def _rules(self, allow_nograd: bool):
        named = dict(self.module.named_parameters())
        if self.inner_opt is not None:
            adapted, rules, hyper, _ = read_optimizer(named, self.inner_opt)
        else:
            adapted = _adapted(self.module, allow_nograd)
            rules, hyper = sgd_rules(self.lr, adapted)  # pyright: ignore[reportArgumentType]  # lr is given when inner_opt is not
        check_hyper(hyper, named)
        return adapted, rules, hyper

    @property
    def last_stats(self) -> Optional[MetaGradientStats]:
        """Counts and norms of the last meta-gradient computed through one of this wrapper's clones."""
        return self._monitor.last_stats


class MAMLLearner:
    """One task's learner: ``adapt(closure)`` takes an inner step, calling it runs the adapted model.

    The gradient of a loss on its outputs with respect to the model's parameters is the chosen
    estimator of the MAML meta-gradient over the steps taken before the call.
    """

    def __init__(self, loop: InnerLoop, model: nn.Module, bn: str, allow_nograd: bool):
        self._loop, self._model, self._bn, self._allow_nograd = loop, model, bn, allow_nograd

    def adapt(self, closure: Callable[[Learner], torch.Tensor], first_order: Optional[bool] = None,
              allow_unused: Optional[bool] = None, allow_nograd: Optional[bool] = None) -> None:
        """One inner step on ``closure(learner)``, the support loss as a function of the learner.

        ``first_order=True`` drops this step's Hessian (its gradient counts as a constant, as in
        learn2learn); ``allow_unused`` and ``allow_nograd`` as in :class:`MAML`, for this step.
        """
        if allow_nograd is False and self._allow_nograd:
            frozen = [n for n, p in self._model.named_parameters() if not p.requires_grad]
            if frozen:
                raise ValueError(f"Parameter(s) {frozen} have requires_grad=False: they cannot adapt with allow_nograd=False.")
        self._loop.step(closure, first_order=bool(first_order), allow_unused=allow_unused)

    def __call__(self, *args, **kwargs):
        return Learner(self._model, self.params, self._bn)(*args, **kwargs)

    @property
    def params(self):
        """The adapted parameters after the steps so far (differentiable), by name."""
        return {n: t.squeeze(0) for n, t in self._loop.outputs().items()}

    @property
    def module(self) -> nn.Module:
        """The adapted model (learn2learn's ``learner.module``): the model with the adapted parameters in place,
        so that its submodules and methods (``learner.module.features(x)``) run with them; buffers are shared."""
        return adapted_module(self._model, self.params)

    def parameters(self) -> Iterator[torch.Tensor]:
        """The model's parameters at this point: the adapted ones where they adapt."""
        params = self.params
        return iter([params.get(n, p) for n, p in self._model.named_parameters()])

    def named_parameters(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """``(name, parameter)`` pairs of the model at this point: the adapted ones where they adapt."""
        params = self.params
        return iter([(n, params.get(n, p)) for n, p in self._model.named_parameters()])

    @property
    def steps_taken(self) -> int:
        """How many times this clone has been adapted."""
        return self._loop.steps_taken

    def __repr__(self) -> str:
        return f"MAMLLearner({type(self._model).__name__}, steps_taken={self.steps_taken})"


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
