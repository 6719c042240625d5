"""One task's inner loop on an ``nn.Module``, recorded step by step, and the autograd node that
turns it into differentiable adapted parameters.

Every object-shaped entry point (``MetaGradientEngine``, ``MAML``, ``innerloop_ctx``) is a thin
shell over :class:`InnerLoop`: ``step(closure)`` takes one graph-free SGD step and records the
point and the closure; ``params()`` returns the adapted parameters as outputs of a custom
``torch.autograd.Function`` whose backward applies the estimator to the steps recorded so far.

Tensors other than the adapted parameters that the support loss depends on (a frozen body in
ANIL, a shared embedding) are found by walking the loss's autograd graph and are inputs of the
node as well. Their meta-gradient through the inner loop is
``sum_k -a d^2 l/(d phi d c)(phi_k) lambda_{k+1}``, with the adjoints ``lambda_{k+1}`` taken from
the same expansion at one Hessian factor less, so each kept term has at most ``L``
second-order factors and ``L = K`` is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from .batchnorm import BatchNormPolicy
from .estimators import Estimator
from .expansion import expand
from .functional import check_finite, make_stats
from .hvp import check_randomness, resolve_hvp_mode, trajectory_hvp_oracle
from .memory import check_chunk_size, parse_memory_budget
from .stats import MetaGradientStats
from .trajectory import Trajectory, check_replay, gradient_at, stack_points
from .update_rules import Hyper, RuleAdjoint, UpdateRule

Tensors = Dict[str, torch.Tensor]

__all__ = ["Learner", "AdaptationSettings", "InnerLoop", "depends_on_adaptation", "leaves_requiring_grad", "NAN_POLICIES", "ADAPTATION_NODES"]

NAN_POLICIES = ("raise", "skip_task")


class Learner:
    """The model at a given point of the inner loop, callable like the model.

    ``learner(x)`` is ``torch.func.functional_call(model, params, x)``: the adapted parameters
    come from ``params``, every other parameter and buffer from the model itself.

    Attributes:
        params: the adapted parameters at this point, by name.
        module: the underlying model.
    """

    def __init__(self, module: nn.Module, params: Tensors, bn: BatchNormPolicy):
        self.module = module
        self.params = params
        self.bn = bn

    def __call__(self, *args, **kwargs):
        with self.bn():
            return functional_call(self.module, self.params, args, kwargs)

    def __repr__(self) -> str:
        return f"Learner({type(self.module).__name__}, adapted={list(self.params)})"


@dataclass
class AdaptationSettings:
    """What stays fixed across the tasks adapted with one model.

    Attributes:
        model: the model whose parameters are meta-learned.
        adapted: names of the parameters that take inner steps.
        estimator: the meta-gradient estimator.
        hvp, chunk_size, memory_budget: HVP backend and batching bounds (see :mod:`binom_opt.hvp`
            and :mod:`binom_opt.memory`).
        compile_hvps: run the HVPs through ``torch.compile`` (:func:`binom_opt.hvp.compiled`).
        steps: the number of inner steps every adaptation must take (``None``: any number).
        allow_unused: adapted parameters the support loss does not use get zero gradients
            instead of an error.
        randomness: random ops (dropout) in the support loss: ``"error"`` (an error under the
            batched HVPs), ``"same"`` (every inner step and every replay of a task draws the same
            random numbers, so replays are exact; vmap's ``"same"``) or ``"different"`` (replays draw
            new random numbers, each HVP is that of a resampled loss; vmap's ``"different"``).
        bn: BatchNorm policy, see :mod:`binom_opt.batchnorm`.
        nan_policy: ``"raise"`` (a NaN/Inf meta-gradient is a ``FloatingPointError`` naming where it
            first appeared) or ``"skip_task"`` (that task's meta-gradient through the adaptation is
            zero and ``stats.skipped`` is set). A non-finite inner loss raises under both.
        on_stats: called with the :class:`MetaGradientStats` of every meta-gradient.
    """

    model: nn.Module
    adapted: List[str]
    estimator: Estimator
    hvp: str = "auto"
    chunk_size: Optional[int] = None
    memory_budget: Union[None, int, str] = None
    compile_hvps: bool = False
    steps: Optional[int] = None
    allow_unused: bool = False
    randomness: str = "error"
    bn: str = "transductive"
    nan_policy: str = "raise"
    on_stats: Optional[Callable[[MetaGradientStats], None]] = None
    batchnorm: BatchNormPolicy = field(init=False)

    def __post_init__(self) -> None:
        resolve_hvp_mode(self.hvp)
        check_chunk_size(self.chunk_size)
        parse_memory_budget(self.memory_budget)
        check_randomness(self.randomness)
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}.")
        self.batchnorm = BatchNormPolicy(self.model, self.bn)


class InnerLoop:
    """One task's inner loop, recorded so that its meta-gradient can be estimated later.

    Args:
        settings: the shared :class:`AdaptationSettings`.
        rules: the update rule of each adapted parameter (see :mod:`binom_opt.update_rules`).
        hyper: its hyperparameters (``{"lr": ...}``), tensors requiring grad being meta-parameters.
    """

    def __init__(self, settings: AdaptationSettings, rules: Dict[str, UpdateRule], hyper: Dict[str, Hyper]):
        params = dict(settings.model.named_parameters())
        self.settings = settings
        self.rules = rules
        self.hyper = hyper
        self._initial = {n: params[n] for n in settings.adapted}
        self._phi = {n: p.detach() for n, p in self._initial.items()}
        self._state = {n: rules[n].init_state(p) for n, p in self._phi.items()}
        self._records: List[Tuple[Tensors, Dict[str, Tensors], Tensors]] = []  # (phi_k, state_k, grad_k)
        self._loss_fns: List[Callable] = []
        self._losses: List[float] = []
        self._closures: Dict[int, Tuple[Callable, Callable]] = {}  # id -> (closure, loss_fn)
        self._meta_inputs: Dict[int, torch.Tensor] = {}
        self._sealed: Optional[Tensors] = None
        self._status = _Status()
        self._rng: Optional[_RandomState] = None  # randomness="same": the task's one random stream

    @property
    def steps_taken(self) -> int:
        return len(self._records)

    @property
    def finished(self) -> bool:
        """Whether a meta-gradient already went through this loop."""
        return self._status.finished

    def step(self, closure: Callable[[Learner], torch.Tensor]) -> None:
        """One SGD step on ``closure(learner)``; records the point and the closure, keeps no graph."""
        if self.finished:
            raise RuntimeError(
                "This adaptation's meta-gradient was already computed (backward ran through it): "
                "adapting it further would count its steps twice. Start a new one for the next task "
                "(maml.clone(), a new innerloop_ctx, or engine.adapt)."
            )
        if isinstance(closure, torch.Tensor) or not callable(closure):
            raise TypeError(
                "Pass a closure learner -> support loss, e.g. lambda m: F.cross_entropy(m(x), y), not "
                f"{type(closure).__name__}: binom_opt replays the support loss at recorded points to take "
                "Hessian-vector products after the inner loop, so it needs the function, not one value."
            )
        if self.settings.randomness == "same" and self._rng is None:
            self._rng = _RandomState.capture(self._phi.values())
        known = self._closures.get(id(closure))
        if known is None:
            loss_fn = _support_loss(self.settings, closure, self._rng)
            self._closures[id(closure)] = (closure, loss_fn)
        else:
            loss_fn = known[1]

        def find_meta_inputs(loss: torch.Tensor, leaves: Tensors) -> None:
            for t in leaves_requiring_grad(loss, exclude={id(v) for v in leaves.values()}):
                self._meta_inputs.setdefault(id(t), t)

        grads, value = gradient_at(
            loss_fn,
            self._phi,
            step=self.steps_taken,
            allow_unused=self.settings.allow_unused,
            inspect=find_meta_inputs if known is None else None,
        )
        self._records.append((self._phi, self._state, grads))
        self._loss_fns.append(loss_fn)
        self._losses.append(value)
        k = self.steps_taken - 1
        with torch.no_grad():
            updated = {
                n: rule.update(k, self._phi[n], self._state[n], grads[n], _detached(self.hyper[n]))
                for n, rule in self.rules.items()
            }
        self._phi = {n: new[0] for n, new in updated.items()}
        self._state = {n: new[1] for n, new in updated.items()}
        self._sealed = None

    def params(self) -> Tensors:
        """The adapted parameters after the steps so far, differentiable with respect to the meta-parameters."""
        if not self._records:
            return dict(self._initial)
        if self._sealed is None:
            record = _Record(
                settings=self.settings,
                hyper=self.hyper,
                status=self._status,
                trajectory=Trajectory(stack_points([r[0] for r in self._records]), dict(self._phi), list(self._losses)),
                loss_fns=list(self._loss_fns),
                meta_inputs=list(self._meta_inputs.values()),
                adjoint=RuleAdjoint(self.rules, self.hyper, list(self._records)),
                hyper_inputs=[
                    (n, h, v) for n, hs in self.hyper.items() for h, v in hs.items()
                    if isinstance(v, torch.Tensor) and v.requires_grad
                ],
            )
            outputs = _Adaptation.apply(
                record, *self._initial.values(), *record.meta_inputs, *(v for _, _, v in record.hyper_inputs)
            )
            self._sealed = dict(zip(self._initial, outputs))
        return self._sealed

    def learner(self) -> Learner:
        return Learner(self.settings.model, self.params(), self.settings.batchnorm)


def _support_loss(settings: AdaptationSettings, closure: Callable, rng: Optional["_RandomState"]) -> Callable[[Tensors], torch.Tensor]:
    def support_loss(point: Tensors) -> torch.Tensor:
        if rng is None:
            return closure(Learner(settings.model, point, settings.batchnorm))
        with rng.replay():
            return closure(Learner(settings.model, point, settings.batchnorm))

    return support_loss


@dataclass
class _RandomState:
    """The random-number state a task's support loss always starts from (``randomness="same"``).

    Every inner step and every replay draws the same random numbers (the same dropout masks),
    so the replayed loss is exactly the one the inner loop differentiated. The caller's own
    random stream is left as it was.
    """

    cpu: torch.Tensor
    cuda: Dict[int, torch.Tensor]

    @classmethod
    def capture(cls, tensors) -> "_RandomState":
        devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices})

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


@dataclass
class _Status:
    finished: bool = False  # set once a meta-gradient went through the loop


@dataclass
class _Record:
    """A snapshot of an inner loop: what one meta-gradient needs.

    It must not refer back to the :class:`InnerLoop`: the loop holds the node's outputs, the
    node holds this record, and a cycle through an autograd node is never collected.
    """

    settings: AdaptationSettings
    hyper: Dict[str, Hyper]
    status: _Status
    trajectory: Trajectory
    loss_fns: List[Callable]
    meta_inputs: List[torch.Tensor]
    adjoint: RuleAdjoint
    hyper_inputs: List[Tuple[str, str, torch.Tensor]]

    def backward(self, g: Tensors) -> Tuple[Tensors, List[Optional[torch.Tensor]]]:
        settings, steps = self.settings, self.trajectory.steps
        if settings.steps is not None and steps != settings.steps:
            raise ValueError(
                f"This learner was adapted {steps} time(s) but steps={settings.steps} was set: call adapt "
                f"exactly {settings.steps} times before computing the query loss (or leave steps=None)."
            )
        plan = settings.estimator.plan(steps)
        if plan.levels > 0 and settings.randomness != "different":
            check_replay(self.loss_fns, self.trajectory)
        oracle = trajectory_hvp_oracle(
            self.loss_fns, self.trajectory.points, settings.hvp, settings.chunk_size, settings.randomness,
            settings.memory_budget, settings.compile_hvps,
        )
        step_size = {n: _detached(h)["lr"] for n, h in self.hyper.items()}
        result = expand(
            plan, g, step_size, oracle, steps=steps, rule=self.adjoint,
            with_adjoints=bool(self.meta_inputs), with_full_adjoints=bool(self.hyper_inputs),
        )
        skipped = False
        try:
            check_finite(result)
            meta_grads = self._meta_input_gradients(result.adjoints, plan.hessian_scale)
            meta_grads += self._hyper_gradients(result.full_adjoints)
            if not all(m is None or bool(torch.isfinite(m).all()) for m in meta_grads):
                raise FloatingPointError(
                    "The meta-gradient of a meta-parameter other than the initialisation (a tensor the support "
                    "loss uses, or a learned learning rate) is not finite: lower the inner learning rate or "
                    "check the data."
                )
        except FloatingPointError:
            if settings.nan_policy != "skip_task":
                raise
            skipped = True  # this task contributes nothing; recorded in the stats
            result.meta_grad = {n: torch.zeros_like(t) for n, t in result.meta_grad.items()}
            meta_grads = [None] * len(self.meta_inputs) + [torch.zeros_like(v) for _, _, v in self.hyper_inputs]
        self.status.finished = True
        if settings.on_stats is not None:
            stats = make_stats(settings.estimator, plan, steps, g, result, self.trajectory.losses, oracle)
            settings.on_stats(dataclasses.replace(stats, skipped=skipped))
        return result.meta_grad, meta_grads

    def _meta_input_gradients(self, adjoints: Dict[int, Tensors], scale: float) -> List[Optional[torch.Tensor]]:
        """``sum_k -a d/dc <grad_phi l(phi_k, c), lambda_{k+1}>`` for the kept steps ``k``."""
        totals: List[Optional[torch.Tensor]] = [None] * len(self.meta_inputs)
        with torch.enable_grad():
            for k, adjoint in adjoints.items():
                through_grad = self.adjoint.vjp(k, adjoint)[1]  # B_k^T lambda_{k+1}: -lr lambda for SGD
                point = {n: t[k].detach().requires_grad_(True) for n, t in self.trajectory.points.items()}
                loss = self.loss_fns[k](point)
                grads = torch.autograd.grad(loss, list(point.values()), create_graph=True, allow_unused=True)
                inner = sum((g * (scale * through_grad[n])).sum() for n, g in zip(point, grads) if g is not None)
                # retain_graph: the support loss may reuse a graph built outside the closure
                # (features computed once per task), which later steps differentiate again.
                mixed = torch.autograd.grad(inner, self.meta_inputs, allow_unused=True, retain_graph=True)
                totals = [t if m is None else (m if t is None else t + m) for t, m in zip(totals, mixed)]
        return totals


    def _hyper_gradients(self, adjoints: Dict[int, Tensors]) -> List[torch.Tensor]:
        """``sum_k (d step_k / d hyper)^T lambda_{k+1}`` (no Hessian factor, so at the full order)."""
        totals = [torch.zeros_like(v) for _, _, v in self.hyper_inputs]
        for k, adjoint in adjoints.items():
            hyper_grads = self.adjoint.vjp(k, adjoint, with_hyper=True)[2]
            totals = [t + hyper_grads[n][h] for t, (n, h, _) in zip(totals, self.hyper_inputs)]
        return totals


class _Adaptation(torch.autograd.Function):
    """Node ``(phi_0, meta inputs) -> phi_K`` whose backward is the estimator."""

    @staticmethod
    def forward(ctx, record: _Record, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.record = record
        return tuple(t.clone() for t in record.trajectory.final.values())

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Optional[torch.Tensor]):
        record: _Record = ctx.record
        final = record.trajectory.final
        g = {n: torch.zeros_like(t) if go is None else go for (n, t), go in zip(final.items(), grad_outputs)}
        meta_grad, meta_input_grads = record.backward(g)
        return (None, *meta_grad.values(), *meta_input_grads)


# The autograd Functions whose outputs are adapted parameters (the task-batched one registers too).
ADAPTATION_NODES: List[type] = [_Adaptation]


def depends_on_adaptation(loss: torch.Tensor) -> bool:
    """Whether the autograd graph of ``loss`` contains an adaptation node (a learner's parameters)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if isinstance(node, tuple(f._backward_cls for f in ADAPTATION_NODES)):
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def leaves_requiring_grad(loss: torch.Tensor, exclude: frozenset = frozenset()) -> List[torch.Tensor]:
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


def _detached(hyper: Hyper) -> Hyper:
    return {h: v.detach() if isinstance(v, torch.Tensor) else v for h, v in hyper.items()}
