"""``MetaGradientEngine``: graph-free meta-gradients for any ``nn.Module`` and a ``torch.optim`` inner optimizer.

``engine.adapt(closure)`` runs the inner loop and returns a learner whose parameters are the
output of a custom ``torch.autograd.Function`` whose backward applies the estimator (see
:mod:`binom_opt.adaptation`). The meta-gradient therefore flows through ordinary autograd:
``outer_loss.backward()`` puts it in ``.grad``, it adds up over the tasks of a meta-batch and
composes with other loss terms.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .batch_adaptation import BatchedLearner, adapt_batch
from .adaptation import AdaptationSettings, InnerLoop, Learner, depends_on_adaptation, leaves_requiring_grad
from .update_rules import rule_from_optimizer
from .estimators import Binomial, Estimator, ExpansionPlan
from .functional import check_estimator
from .stats import MetaGradientStats
from .trajectory import check_scalar_loss

__all__ = ["MetaGradientEngine", "ExpansionDivergenceWarning", "DivergenceMonitor"]


class ExpansionDivergenceWarning(RuntimeWarning):
    """The binomial series of a meta-gradient grows with the order (see ``MetaGradientStats.diverging``)."""


class DivergenceMonitor:
    """Keeps the last stats and warns once when a binomial series diverges."""

    def __init__(self) -> None:
        self.last_stats: Optional[MetaGradientStats] = None
        self.skipped_losses = 0
        self.skipped_tasks = 0
        self._warned = False

    def __call__(self, stats: MetaGradientStats) -> None:
        self.last_stats = stats
        self.skipped_tasks += stats.skipped
        if stats.diverging and not self._warned:
            self._warned = True
            norms = ", ".join(f"{n:.3g}" for n in [stats.g_norm, *stats.contributions])
            warnings.warn(
                f"{stats.estimator!r}: the binomial series is diverging, its terms of order 0..{stats.levels} "
                f"have norms [{norms}], growing instead of shrinking (inner lr * ||Hessian|| is too large for "
                "this expansion, so the estimate can be far from the exact meta-gradient). Consider "
                "hessian_scale='paper', a smaller L, Truncated(L), or a smaller inner learning rate. "
                "Shown once; last_stats.diverging tells for each meta-gradient.",
                ExpansionDivergenceWarning,
                stacklevel=2,
            )


class MetaGradientEngine:
    """Graph-free MAML meta-gradients for any ``nn.Module``, with a choice of estimator.

    Args:
        model: the model whose initialisation (and other parameters) are meta-learned.
        inner_opt: the inner optimizer over the parameters that adapt: ``torch.optim.SGD`` (with
            momentum, dampening, nesterov, weight decay), ``Adam`` or ``AdamW``; each group's
            hyperparameters are honoured and read at every ``adapt``. It is never stepped.
        steps: ``K``, inner steps per adaptation.
        estimator: ``FirstOrder()``, ``Truncated(L)``, ``Binomial(L)``, ``Hybrid(L, C)`` or ``Exact()``.
        hvp: ``"auto"`` (reverse-over-reverse), ``"rev"`` or ``"fwd"``.
        chunk_size: at most this many HVPs at once in a batched round (``None``: all).
        memory_budget: bytes, or a string such as ``"1GiB"``, for the activations of one batched
            HVP round; the number of HVPs run at once follows from one HVP's measured activations
            (see :mod:`binom_opt.memory`). ``None``: no budget (a round runs at once unless
            ``chunk_size`` says otherwise; an out-of-memory error still halves it).
        compile_hvps: run the HVP rounds through ``torch.compile``: the first meta-gradient pays
            the compile time (about a minute for Conv4 on a CPU), later tasks of the same shapes
            reuse the graph; HVP rounds measured 2.3x faster for Conv4 on a 2-core CPU.
        randomness: for random ops (dropout) in the support loss: ``"error"`` (default: a clear
            error), ``"same"`` (every inner step and replay of a task draws the same random numbers,
            so the meta-gradient is exact for that fixed-mask loss) or ``"different"`` (the HVP
            replays draw new random numbers); forwarded to ``torch.func.vmap``.
        bn: BatchNorm policy: ``"transductive"`` (batch statistics everywhere, running buffers
            untouched), ``"frozen"`` (running statistics, not updated) or ``"error"`` (refuse
            BatchNorm layers that track running statistics); see :mod:`binom_opt.batchnorm`.
        nan_policy: ``"raise"`` (default: a NaN/Inf meta-gradient is a ``FloatingPointError`` naming
            where it appeared) or ``"skip_task"``: ``meta_backward(loss)`` adds nothing to ``.grad``
            when any part of the loss's gradient is not finite (counted in ``skipped_losses``; call
            it once per task to skip tasks one by one). A non-finite inner loss raises under both.
        override: ``{"lr": [one per adapted parameter]}`` replaces the optimizer's learning rates,
            as in ``higher``; tensors that require grad are meta-learned (Meta-SGD), scalar or
            of the parameter's shape.

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

    def __init__(
        self,
        model: nn.Module,
        inner_opt: torch.optim.Optimizer,
        steps: int,
        estimator: Estimator = Binomial(1),
        hvp: str = "auto",
        chunk_size: Optional[int] = None,
        randomness: str = "error",
        bn: str = "transductive",
        nan_policy: str = "raise",
        override: Optional[Mapping[str, Sequence]] = None,
        memory_budget: Union[None, int, str] = None,
        compile_hvps: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        check_estimator(estimator)
        self.plan: ExpansionPlan = estimator.plan(steps)
        adapted, _, _ = rule_from_optimizer(model, inner_opt, override)
        self.model = model
        self.inner_opt = inner_opt
        self.steps = int(steps)
        self.estimator = estimator
        self.hvp = hvp
        self.chunk_size = chunk_size
        self.bn = bn
        self.override = override
        self._monitor = DivergenceMonitor()
        self._settings = AdaptationSettings(
            model, adapted, estimator, hvp=hvp, chunk_size=chunk_size, randomness=randomness, steps=self.steps,
            bn=bn, nan_policy=nan_policy, on_stats=self._monitor, memory_budget=memory_budget,
            compile_hvps=compile_hvps,
        )

    def adapt(self, closure: Callable[[Learner], torch.Tensor]) -> Learner:
        """Run the ``K`` inner SGD steps on ``closure(learner)`` and return the adapted learner.

        The closure must be a pure function of the learner's parameters: the engine calls it
        again at recorded points to take Hessian-vector products.
        """
        _, rules, hyper = rule_from_optimizer(self.model, self.inner_opt, self.override)
        loop = InnerLoop(self._settings, rules, hyper)
        for _ in range(self.steps):
            loop.step(closure)
        return loop.learner()

    def adapt_batch(self, closure: Callable[[Learner, object], torch.Tensor], tasks) -> BatchedLearner:
        """Adapt to every task of a meta-batch at once: one vmapped call per inner step and per HVP round.

        Args:
            closure: ``(learner, task) -> support loss`` for ONE task; ``task`` is that task's slice
                of ``tasks``. It must be a pure function of its arguments (it is vmapped and replayed).
            tasks: a tensor or a tuple/list/dict of tensors with a leading task dimension ``B``
                (e.g. ``(x_support, y_support)`` of shapes ``[B, N, ...]`` and ``[B, N]``). Tensors in
                it that require grad (features from a body) get meta-gradients too.

        Returns:
            A :class:`~binom_opt.batch_adaptation.BatchedLearner`: ``learners(x_query)`` with
            ``x_query`` of shape ``[B, Q, ...]`` gives ``[B, Q, ...]`` outputs. The gradient of a
            loss on them is the sum over tasks of each task's meta-gradient, equal to the loop
            over :meth:`adapt` up to float rounding.

        Plain SGD inner optimizers only (no momentum, weight decay or learned learning rates);
        use :meth:`adapt` for the others. Example:

            >>> import torch, torch.nn.functional as F, binom_opt as bo
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
            >>> engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3)
            >>> xs, ys = torch.randn(8, 6, 4), torch.arange(6).repeat(8, 1) % 3      # 8 tasks
            >>> xq, yq = torch.randn(8, 9, 4), torch.arange(9).repeat(8, 1) % 3
            >>> learners = engine.adapt_batch(lambda m, task: F.cross_entropy(m(task[0]), task[1]), (xs, ys))
            >>> logits = learners(xq)                                                   # [8, 9, 3]
            >>> engine.meta_backward(F.cross_entropy(logits.flatten(0, 1), yq.flatten()))
            >>> engine.last_stats.hvp_count                                             # 3 per task
            24
        """
        _, rules, hyper = rule_from_optimizer(self.model, self.inner_opt, self.override)
        return adapt_batch(self._settings, rules, hyper, closure, tasks)

    @property
    def last_stats(self) -> Optional[MetaGradientStats]:
        """Counts and norms of the last meta-gradient this engine computed."""
        return self._monitor.last_stats

    @property
    def skipped_losses(self) -> int:
        """Losses whose meta-gradient ``meta_backward`` dropped under ``nan_policy="skip_task"``."""
        return self._monitor.skipped_losses

    def meta_backward(self, outer_loss: torch.Tensor) -> None:
        """Accumulate the meta-gradient of ``outer_loss`` into ``.grad``, like ``outer_loss.backward()``."""
        loss = check_scalar_loss(outer_loss, "meta_backward")
        if not loss.requires_grad:
            raise ValueError(
                "meta_backward got a loss with no autograd graph: compute it from the learner that "
                "engine.adapt returned, outside torch.no_grad()."
            )
        if not depends_on_adaptation(loss):
            raise ValueError(
                "meta_backward got a loss that does not depend on an adapted learner (no engine.adapt output "
                "in its graph): compute the query loss from the learner engine.adapt returned, e.g. "
                "F.cross_entropy(learner(x_query), y_query), not from the model itself."
            )
        if self._settings.nan_policy != "skip_task":
            loss.backward()
            return
        # skip_task: differentiate first, accumulate only if every part is finite, so that no
        # NaN reaches .grad through the query forward either (the same sums loss.backward() makes).
        leaves = leaves_requiring_grad(loss)
        skipped_before = self._monitor.skipped_tasks
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if bool(torch.isfinite(loss.detach())) else None
        if grads is None or self._monitor.skipped_tasks > skipped_before or not all(
            g is None or bool(torch.isfinite(g).all()) for g in grads
        ):
            self._monitor.skipped_losses += 1
            return
        with torch.no_grad():
            for leaf, g in zip(leaves, grads):
                if g is not None:
                    leaf.grad = g.clone() if leaf.grad is None else leaf.grad.add_(g)

