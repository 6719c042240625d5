"""``MetaGradientEngine``: graph-free meta-gradients for any ``nn.Module`` and a ``torch.optim`` inner optimizer.

``engine.adapt(closure)`` (one task) and ``engine.adapt_batch(closure, tasks)`` (a meta-batch, vmapped)
run the inner loop and return learners whose parameters are outputs of the autograd node of
:mod:`binom_opt.core.node`, whose backward applies the estimator. The meta-gradient therefore
flows through ordinary autograd: ``outer_loss.backward()`` puts it in ``.grad``, it adds up over
tasks and composes with other loss terms.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .core.adaptation import meta_backward
from .core.batching import Tasks
from .core.estimators import Estimator, Exact, check_estimator
from .core.learner import BatchedLearner, Learner, module_loss, named_parameters
from .core.options import Options
from .core.recorder import InnerLoop, Setup
from .core.stats import DivergenceMonitor, MetaGradientStats
from .core.update_rules import check_hyper, read_optimizer

__all__ = ["MetaGradientEngine"]


class MetaGradientEngine:
    """Graph-free MAML meta-gradients for any ``nn.Module``, with a choice of estimator.

    Args:
        model: the model whose initialisation (and other parameters) are meta-learned.
        inner_opt: the inner optimizer over the parameters that adapt: ``torch.optim.SGD`` (with
            momentum, dampening, nesterov, weight decay), ``Adam`` or ``AdamW``; each group's
            hyperparameters are honoured and read at every ``adapt``. It is never stepped.
        steps: ``K``, inner steps per adaptation.
        estimator: ``FirstOrder()``, ``Truncated(L)``, ``Binomial(L)``, ``Hybrid(L, C)``, ``Implicit(cg_steps,
            reg)``, ``Reptile()`` or ``Exact()`` (the default: the meta-gradient of the loop itself; choosing an
            approximation is up to you).
        override: ``{"lr": [one per adapted parameter]}`` replaces the optimizer's learning rates, as
            in ``higher``; tensors that require grad are meta-learned (Meta-SGD), scalar or of the
            parameter's shape.
        options: a :class:`~binom_opt.Options` (HVP backend, memory, randomness, normalisation layers,
            NaN policy, checkpointing); its fields may also be given as keyword arguments.

    Example:
        >>> import torch, torch.nn.functional as F, binom_opt as bo
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        >>> inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> engine = bo.MetaGradientEngine(model, inner_opt, steps=3, estimator=bo.Binomial(1))
        >>> xs, ys, xq, yq = torch.randn(6, 4), torch.arange(6) % 3, torch.randn(9, 4), torch.arange(9) % 3
        >>> learner = engine.adapt(lambda m: F.cross_entropy(m(xs), ys))
        >>> engine.meta_backward(F.cross_entropy(learner(xq), yq))
        >>> engine.last_stats.hvp_count
        3
    """

    def __init__(self, model: nn.Module, inner_opt: torch.optim.Optimizer, steps: int, estimator: Estimator = Exact(),
                 override: Optional[Mapping[str, Sequence]] = None, options: Optional[Options] = None, **option_keywords: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.plan = check_estimator(estimator).plan(steps)
        self.options = Options.resolve(options, **option_keywords)
        named = dict(model.named_parameters())
        check_hyper(read_optimizer(named, inner_opt, override).hyper, named)  # validates now
        self.model, self.inner_opt, self.steps, self.estimator, self.override = model, inner_opt, int(steps), estimator, override
        self._monitor = DivergenceMonitor()
        self._skipped_losses = 0
        self._setups = {
            batched: Setup(estimator, self.options, module_loss(model, self.options.bn, batched), self.steps, on_stats=self._monitor)
            for batched in (False, True)
        }

    def adapt(self, closure: Callable[[Learner], torch.Tensor]) -> Learner:
        """Run the ``K`` inner steps on ``closure(learner)`` and return the adapted learner.

        The closure must be a pure function of the learner's parameters: the engine calls it
        again at recorded points to take Hessian-vector products.
        """
        loop = self._loop(Tasks())
        for _ in range(self.steps):
            loop.step(closure)
        return Learner(self.model, loop.outputs(), self.options.bn)

    def adapt_batch(self, closure: Callable[[Learner, Any], torch.Tensor],
                    tasks: Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]) -> BatchedLearner:
        """Adapt to every task of a meta-batch at once: one vmapped call per inner step and per HVP round.

        Args:
            closure: ``(learner, task) -> support loss`` for ONE task; ``task`` is that task's slice of
                ``tasks``. It must be a pure function of its arguments (it is vmapped and replayed).
            tasks: a tensor or a tuple/list/dict of tensors with a leading task dimension ``B`` (e.g.
                ``(x_support, y_support)`` of shapes ``[B, N, ...]`` and ``[B, N]``). Tensors in it that
                require grad (features from a body) get meta-gradients too.

        Returns:
            A :class:`~binom_opt.BatchedLearner`: ``learners(x_query)`` with ``x_query`` of shape
            ``[B, Q, ...]`` gives ``[B, Q, ...]`` outputs. The gradient of a loss on them is the sum over
            tasks of each task's meta-gradient, equal to the loop over :meth:`adapt` up to float rounding.

        Every inner optimizer, estimator and option works here as in :meth:`adapt`. Example:

            >>> import torch, torch.nn.functional as F, binom_opt as bo
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
            >>> engine = bo.MetaGradientEngine(model, torch.optim.Adam(model.parameters(), lr=0.1), steps=3)
            >>> xs, ys = torch.randn(8, 6, 4), torch.arange(6).repeat(8, 1) % 3      # 8 tasks
            >>> xq, yq = torch.randn(8, 9, 4), torch.arange(9).repeat(8, 1) % 3
            >>> learners = engine.adapt_batch(lambda m, task: F.cross_entropy(m(task[0]), task[1]), (xs, ys))
            >>> logits = learners(xq)                                                   # [8, 9, 3]
            >>> engine.meta_backward(F.cross_entropy(logits.flatten(0, 1), yq.flatten()))
            >>> engine.last_stats.hvp_count                                             # 3 per task
            24
        """
        first = next(iter(self.model.parameters()), None)
        named = dict(self.model.named_parameters())
        point = {n: named[n].detach() for n in read_optimizer(named, self.inner_opt, self.override).adapted}
        key = (id(self.model), getattr(closure, "__code__", None) or id(closure))  # the same support loss, for the measured plan
        planned = Tasks(tasks).planned(self.options, None if first is None else first.device,
                                       self._setups[True].make_loss(closure), point, key)
        loop = self._loop(planned)
        for _ in range(self.steps):
            loop.step(closure)
        return BatchedLearner(self.model, loop.outputs(), self.options.bn, planned.loop)

    def _loop(self, tasks: Tasks) -> InnerLoop:
        named = named_parameters(self.model)
        adapted, rules, hyper, _ = read_optimizer(named, self.inner_opt, self.override)
        return InnerLoop(self._setups[tasks.batched], {n: named[n] for n in adapted}, rules, hyper, tasks)

    @property
    def last_stats(self) -> Optional[MetaGradientStats]:
        """Counts and norms of the last meta-gradient this engine computed."""
        return self._monitor.last_stats

    @property
    def skipped_losses(self) -> int:
        """Losses whose meta-gradient ``meta_backward`` dropped under ``nan_policy="skip_task"``."""
        return self._skipped_losses

    def meta_backward(self, outer_loss: torch.Tensor) -> None:
        """Accumulate the meta-gradient of ``outer_loss`` into ``.grad``, like ``outer_loss.backward()``.

        Unlike ``backward()``, nothing reaches ``.grad`` unless the whole meta-gradient succeeds:
        an error (or, under ``nan_policy="skip_task"``, a non-finite gradient of the query loss
        itself) leaves every ``.grad`` as it was.
        """
        skipped_before = self._monitor.skipped_tasks
        if self.options.nan_policy == "raise":
            meta_backward(outer_loss)
            return
        # skip_task: the loss is dropped whole when any part of its gradient is not finite
        accumulate = meta_backward(outer_loss, accumulate=False)
        if accumulate is None or self._monitor.skipped_tasks > skipped_before or not accumulate.finite:
            self._skipped_losses += 1
            return
        accumulate()
