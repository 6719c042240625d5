"""``MetaGradientEngine``: the functional core behind an ``nn.Module`` and a ``torch.optim.SGD``.

``engine.adapt(closure)`` runs the inner loop and returns a learner whose parameters are the
output of a custom ``torch.autograd.Function``; that Function's backward applies the estimator.
The meta-gradient therefore flows through ordinary autograd: ``outer_loss.backward()`` puts
it in ``.grad``, it adds up over the tasks of a meta-batch and composes with other loss terms.

Tensors other than the adapted parameters that the support loss depends on (a frozen body in
ANIL, a shared embedding) are meta-parameters too. Their meta-gradient through the inner loop
is ``sum_k -a d^2 l/(d phi d c)(phi_k) lambda_{k+1}``, with the adjoints ``lambda_{k+1}`` taken
from the same expansion at one Hessian factor less (so each kept term still has at most ``L``
second-order factors, and ``L = K`` is exact).
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from .batchnorm import BN_POLICIES, tracking_batchnorms, transductive_batchnorm
from .estimators import Binomial, Estimator, ExpansionPlan
from .expansion import expand
from .functional import check_estimator, check_finite, make_stats, step_sizes
from .hvp import resolve_hvp_mode, trajectory_hvp_oracle
from .stats import MetaGradientStats
from .trajectory import Trajectory, check_scalar_loss, run_sgd

Tensors = Dict[str, torch.Tensor]

__all__ = ["MetaGradientEngine", "Learner", "ExpansionDivergenceWarning"]


class ExpansionDivergenceWarning(RuntimeWarning):
    """The binomial series of a meta-gradient grows with the order (see ``MetaGradientStats.diverging``)."""


class Learner:
    """The model at a given point of the inner loop, callable like the model.

    ``learner(x)`` is ``torch.func.functional_call(model, params, x)``: the adapted parameters
    come from ``params``, every other parameter and buffer from the model itself.

    Attributes:
        params: the adapted parameters at this point, by name.
        module: the underlying model.
    """

    def __init__(self, module: nn.Module, params: Tensors, batchnorms: Sequence[nn.Module]):
        self.module = module
        self.params = params
        self._batchnorms = list(batchnorms)

    def __call__(self, *args, **kwargs):
        with transductive_batchnorm(self._batchnorms):
            return functional_call(self.module, self.params, args, kwargs)

    def __repr__(self) -> str:
        return f"Learner({type(self.module).__name__}, adapted={list(self.params)})"


class MetaGradientEngine:
    """Graph-free MAML meta-gradients for any ``nn.Module``, with a choice of estimator.

    Args:
        model: the model whose initialisation (and other parameters) are meta-learned.
        inner_opt: a ``torch.optim.SGD`` over the parameters that adapt in the inner loop (the
            learning rate of each parameter group is honoured; momentum, weight decay, nesterov
            and maximize are not supported yet). It is only read, never stepped.
        steps: ``K``, inner steps per adaptation.
        estimator: ``FirstOrder()``, ``Truncated(L)``, ``Binomial(L)``, ``Hybrid(L, C)`` or ``Exact()``.
        hvp: ``"auto"`` (reverse-over-reverse), ``"rev"`` or ``"fwd"``.
        chunk_size: at most this many HVPs at once in a batched round (``None``: all).
        bn: BatchNorm policy, ``"transductive"``: batch statistics everywhere, running buffers
            untouched.

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
        bn: str = "transductive",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        check_estimator(estimator)
        self.plan: ExpansionPlan = estimator.plan(steps)
        resolve_hvp_mode(hvp)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}.")
        if bn not in BN_POLICIES:
            raise ValueError(f"bn must be one of {BN_POLICIES}, got {bn!r}.")
        self._adapted_names = _adapted_names(model, inner_opt)
        self.model = model
        self.inner_opt = inner_opt
        self.steps = int(steps)
        self.estimator = estimator
        self.hvp = hvp
        self.chunk_size = chunk_size
        self.bn = bn
        self._batchnorms = tracking_batchnorms(model)
        self.last_stats: Optional[MetaGradientStats] = None
        self._warned_divergence = False

    def adapt(self, closure: Callable[[Learner], torch.Tensor]) -> Learner:
        """Run the ``K`` inner SGD steps on ``closure(learner)`` and return the adapted learner.

        The closure must be a pure function of the learner's parameters: the engine calls it
        again at recorded points to take Hessian-vector products.
        """
        if not callable(closure):
            raise TypeError(f"adapt needs a closure learner -> support loss, got {type(closure).__name__}.")
        params = dict(self.model.named_parameters())
        initial = {n: params[n] for n in self._adapted_names}
        step_size = _step_sizes_from(self.inner_opt, self.model, initial)

        def support_loss(point: Tensors) -> torch.Tensor:
            return closure(Learner(self.model, point, self._batchnorms))

        meta_inputs: List[torch.Tensor] = []

        def find_meta_inputs(loss: torch.Tensor, point: Tensors) -> None:
            meta_inputs.extend(_leaves_requiring_grad(loss, exclude={id(t) for t in point.values()}))

        trajectory = run_sgd(support_loss, initial, step_size, self.steps, inspect_first_loss=find_meta_inputs)
        run = _AdaptationRun(self, support_loss, trajectory, step_size, meta_inputs)
        outputs = _Adaptation.apply(run, *initial.values(), *meta_inputs)
        return Learner(self.model, dict(zip(initial, outputs)), self._batchnorms)

    def _record(self, stats: MetaGradientStats) -> None:
        self.last_stats = stats
        if stats.diverging and not self._warned_divergence:
            self._warned_divergence = True
            norms = ", ".join(f"{n:.3g}" for n in [stats.g_norm, *stats.contributions])
            warnings.warn(
                f"{stats.estimator!r}: the binomial series is diverging, its terms of order 0..{stats.levels} "
                f"have norms [{norms}], growing instead of shrinking (inner lr * ||Hessian|| is too large for "
                "this expansion, so the estimate can be far from the exact meta-gradient). Consider "
                "hessian_scale='paper', a smaller L, Truncated(L), or a smaller inner learning rate. "
                "Shown once per engine; engine.last_stats.diverging tells for each meta-gradient.",
                ExpansionDivergenceWarning,
                stacklevel=4,
            )

    def meta_backward(self, outer_loss: torch.Tensor) -> None:
        """Accumulate the meta-gradient of ``outer_loss`` into ``.grad``, like ``outer_loss.backward()``."""
        loss = check_scalar_loss(outer_loss, "meta_backward")
        if not loss.requires_grad:
            raise ValueError(
                "meta_backward got a loss with no autograd graph: compute it from the learner that "
                "engine.adapt returned, outside torch.no_grad()."
            )
        loss.backward()


class _AdaptationRun:
    """Everything one adaptation's backward needs; computes it on demand."""

    def __init__(self, engine, support_loss, trajectory: Trajectory, step_size, meta_inputs):
        self.engine = engine
        self.support_loss = support_loss
        self.trajectory = trajectory
        self.step_size = step_size
        self.meta_inputs = meta_inputs

    def backward(self, g: Tensors) -> Tuple[Tensors, List[Optional[torch.Tensor]]]:
        engine, plan = self.engine, self.engine.plan
        oracle = trajectory_hvp_oracle(self.support_loss, self.trajectory.points, engine.hvp, engine.chunk_size)
        result = expand(plan, g, self.step_size, oracle, steps=engine.steps, with_adjoints=bool(self.meta_inputs))
        check_finite(result)
        meta_grads = self._meta_input_gradients(result.adjoints, plan.hessian_scale)
        engine._record(make_stats(engine.estimator, plan, engine.steps, g, result, self.trajectory))
        return result.meta_grad, meta_grads

    def _meta_input_gradients(self, adjoints: Dict[int, Tensors], scale: float) -> List[Optional[torch.Tensor]]:
        """``sum_k -a d/dc <grad_phi l(phi_k, c), lambda_{k+1}>`` for the kept steps ``k``."""
        totals: List[Optional[torch.Tensor]] = [None] * len(self.meta_inputs)
        with torch.enable_grad():
            for k, adjoint in adjoints.items():
                point = {n: t[k].detach().requires_grad_(True) for n, t in self.trajectory.points.items()}
                loss = self.support_loss(point)
                grads = torch.autograd.grad(loss, list(point.values()), create_graph=True)
                inner = sum(
                    (g * (self.step_size[n] * scale * adjoint[n])).sum() for (n, g) in zip(point, grads)
                )
                mixed = torch.autograd.grad(-inner, self.meta_inputs, allow_unused=True, retain_graph=True)
                totals = [t if m is None else (m if t is None else t + m) for t, m in zip(totals, mixed)]
        return totals


class _Adaptation(torch.autograd.Function):
    """Identity-shaped node ``(phi_0, meta inputs) -> phi_K`` whose backward is the estimator."""

    @staticmethod
    def forward(ctx, run: _AdaptationRun, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.run = run
        return tuple(t.clone() for t in run.trajectory.final.values())

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Optional[torch.Tensor]):
        run: _AdaptationRun = ctx.run
        final = run.trajectory.final
        g = {n: torch.zeros_like(t) if go is None else go for (n, t), go in zip(final.items(), grad_outputs)}
        meta_grad, meta_input_grads = run.backward(g)
        return (None, *meta_grad.values(), *meta_input_grads)


def _adapted_names(model: nn.Module, inner_opt: torch.optim.Optimizer) -> List[str]:
    """Names in ``model`` of the parameters ``inner_opt`` adapts, after checking the optimizer."""
    if type(inner_opt) is not torch.optim.SGD:
        raise TypeError(
            f"inner_opt must be a torch.optim.SGD over the parameters that adapt; got "
            f"{type(inner_opt).__name__}. Other inner optimizers are not supported yet."
        )
    names = {id(p): n for n, p in model.named_parameters()}
    adapted: List[str] = []
    for group in inner_opt.param_groups:
        unsupported = {
            key: group[key]
            for key in ("momentum", "weight_decay", "dampening")
            if group.get(key, 0) != 0
        }
        unsupported.update({key: True for key in ("nesterov", "maximize") if group.get(key, False)})
        if unsupported:
            raise ValueError(
                f"inner_opt uses {unsupported}; only plain SGD (lr only) is supported yet. "
                "Build the inner optimizer as torch.optim.SGD(params, lr=...)."
            )
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"inner_opt holds a parameter of shape {tuple(p.shape)} that is not a parameter of "
                    "the model: build inner_opt over (a subset of) model.parameters()."
                )
            if not p.requires_grad:
                raise ValueError(
                    f"Parameter {names[id(p)]!r} is in inner_opt but has requires_grad=False: "
                    "it cannot adapt. Remove it from inner_opt or set requires_grad=True."
                )
            adapted.append(names[id(p)])
    if not adapted:
        raise ValueError("inner_opt holds no parameters: give it the parameters that adapt in the inner loop.")
    return adapted


def _step_sizes_from(inner_opt: torch.optim.SGD, model: nn.Module, initial: Tensors) -> Dict[str, float]:
    """The learning rate of each adapted parameter's group, read now (so schedulers apply)."""
    names = {id(p): n for n, p in model.named_parameters()}
    lr = {names[id(p)]: group["lr"] for group in inner_opt.param_groups for p in group["params"]}
    return step_sizes(lr, initial)


def _leaves_requiring_grad(loss: torch.Tensor, exclude: set) -> List[torch.Tensor]:
    """The leaf tensors requiring grad that ``loss`` depends on, except those in ``exclude`` (ids)."""
    found: List[torch.Tensor] = []
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in exclude:
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found
