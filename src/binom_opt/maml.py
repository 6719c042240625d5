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
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .core.batching import Tasks
from .core.estimators import Estimator, Exact, FirstOrder, check_estimator
from .core.learner import AdaptedModule, Learner, module_loss, named_parameters
from .core.options import Options
from .core.recorder import InnerLoop, Setup
from .core.stats import DivergenceMonitor, MetaGradientStats
from .core.update_rules import check_hyper, read_optimizer, sgd_rules

__all__ = ["MAML", "MAMLLearner", "MetaSGD"]


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
        self._rules_read: Optional[tuple] = None  # (key, rules) of the last read that a float step size makes reusable
        self._setups: dict = {}  # the clones' setups, by (estimator, allow_unused)
        self._rules(allow_nograd)  # validates now

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, with its own parameters (not adapted)."""
        return self.module(*args, **kwargs)

    def clone(self, first_order: Optional[bool] = None, allow_unused: Optional[bool] = None,
              allow_nograd: Optional[bool] = None) -> MAMLLearner:
        """A learner for one task, starting at the model's current parameters; the flags default to the wrapper's."""
        first_order = self.first_order if first_order is None else first_order
        allow_nograd = self.allow_nograd if allow_nograd is None else allow_nograd
        allow_unused = self.allow_unused if allow_unused is None else allow_unused
        estimator = FirstOrder() if first_order else self.estimator
        key = (estimator, allow_unused) if getattr(estimator, "__hash__", None) else None  # an unhashable estimator: no reuse
        setup = None if key is None else self._setups.get(key)  # one per setting, not one per clone
        if setup is None:
            setup = dataclasses.replace(self._setup, estimator=estimator, allow_unused=allow_unused)
            if key is not None:
                self._setups[key] = setup
        named = named_parameters(self.module)
        return self._learner(named, setup, allow_nograd, None, named)

    def _learner(self, initial: Mapping[str, torch.Tensor], setup: Setup, allow_nograd: bool,
                 modes: Optional[Sequence[bool]], named: Optional[Mapping[str, torch.Tensor]] = None) -> MAMLLearner:
        """A learner whose adaptation starts at ``initial`` (the model's parameters, or a learner's adapted ones);
        ``named``: the model's named parameters, where the caller has them."""
        adapted, rules, hyper = self._rules(allow_nograd, named)
        loop = InnerLoop(setup, {n: initial[n] for n in adapted}, rules, hyper, Tasks())
        return MAMLLearner(loop, self, setup, allow_nograd, modes)

    def _rules(self, allow_nograd: bool, named: Optional[Mapping[str, torch.Tensor]] = None):
        named = dict(self.module.named_parameters()) if named is None else named
        # a float step size over parameters of the same names and flags gives the same rules: read once, not per clone
        key = ((allow_nograd, self.lr, tuple((n, p.requires_grad) for n, p in named.items()))
               if self.inner_opt is None and isinstance(self.lr, float) else None)
        if key is not None and self._rules_read is not None and self._rules_read[0] == key:
            return self._rules_read[1]
        read = self._read_rules(named, allow_nograd)
        self._rules_read = (key, read)
        return read

    def _read_rules(self, named: Mapping[str, torch.Tensor], allow_nograd: bool):
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


class MAMLLearner(AdaptedModule):
    """One task's learner (learn2learn's): ``adapt(closure)`` takes an inner step, calling it runs the adapted model.

    A module of its own (:class:`~binom_opt.core.learner.AdaptedModule`): ``.eval()`` / ``.train()`` set its
    mode only, ``parameters()`` and ``state_dict()`` are the adapted ones, ``.module`` is the adapted model,
    and ``clone()`` starts a nested adaptation from here. The gradient of a loss on its outputs with respect
    to the model's parameters is the chosen estimator of the MAML meta-gradient over the steps taken before
    the call.
    """

    _loop: InnerLoop
    _maml: MAML
    _setup: Setup
    _allow_nograd: bool

    def __init__(self, loop: InnerLoop, maml: MAML, setup: Setup, allow_nograd: bool, modes: Optional[Sequence[bool]] = None):
        super().__init__(loop, maml.module, maml.options.bn)
        vars(self).update(_maml=maml, _setup=setup, _allow_nograd=allow_nograd)  # the wrapper is not a submodule
        if modes is not None:
            self._modes, self.training = list(modes), modes[0]

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
        self._loop.step(closure, first_order=bool(first_order), allow_unused=allow_unused, modes=self.modes, modules=self._model_modules)

    def clone(self) -> MAMLLearner:
        """A learner whose adaptation starts from this one's adapted parameters (a nested adaptation, as
        learn2learn's ``learner.clone()``): the meta-gradient flows through both."""
        return self._maml._learner(dict(self.named_parameters()), self._setup, self._allow_nograd, self.modes)

    @property
    def steps_taken(self) -> int:
        """How many times this clone has been adapted."""
        return self._loop.steps_taken


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


class MetaSGD(MAML):
    """learn2learn's ``MetaSGD(model, lr, first_order, lrs)``: MAML whose inner step has one learning rate per
    parameter entry, meta-learned with the model (Li et al., 2017).

    The rates are this wrapper's parameters (``meta_sgd.lrs``, one tensor of each parameter's shape, ``lr``
    everywhere unless ``lrs`` gives them), so a meta-optimizer over ``meta_sgd.parameters()`` learns them
    beside the model; each clone adapts with them, ``phi <- phi - lrs * grad``. Other arguments as in :class:`MAML`.

    Example:
        >>> import torch, torch.nn.functional as F, binom_opt as bo
        >>> meta = bo.MetaSGD(torch.nn.Linear(4, 3), lr=0.1)
        >>> x, y = torch.randn(6, 4), torch.arange(6) % 3
        >>> learner = meta.clone()
        >>> learner.adapt(lambda m: F.cross_entropy(m(x), y))
        >>> F.cross_entropy(learner(x), y).backward()
        >>> [tuple(r.grad.shape) for r in meta.lrs]
        [(3, 4), (3,)]
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False,
                 lrs: Optional[Sequence[torch.Tensor]] = None, **keywords: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        named = list(model.named_parameters())
        if lrs is None:
            lrs = [torch.full_like(p.detach(), float(lr)) for _, p in named]
        if len(lrs) != len(named):
            raise ValueError(f"lrs needs one tensor per parameter of the model ({len(named)}), got {len(lrs)}.")
        rates = nn.ParameterList([nn.Parameter(torch.as_tensor(t).detach().clone()) for t in lrs])
        super().__init__(model, lr={n: r for (n, _), r in zip(named, rates)}, first_order=first_order, **keywords)
        self.lrs = rates
