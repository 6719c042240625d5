"""Inner-loop update rules (SGD with momentum, Adam, AdamW) as pure elementwise functions, and their transposes.

A step's Jacobian is ``D_k + B_k H_k`` (docs/design.md, "The math"); :class:`StepTranspose` applies
``D_k^T`` and ``B_k^T`` by ``torch.func.vjp`` of the rule, which also gives learned learning rates theirs.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.func import vjp

from .reductions import scaled_all

Tensors = Dict[str, torch.Tensor]
Hyper = Dict[str, Union[float, torch.Tensor]]
StepValues = Tuple[Tensors, Dict[str, Tensors], Tensors]  # (phi_k, state_k, grad_k), by parameter

__all__ = ["SUPPORTED_OPTIMIZERS", "UpdateRule", "SGDRule", "AdamRule", "InnerOptimizer", "read_optimizer", "sgd_rules", "StepTranspose",
           "plain_sgd_rate", "plain_sgd_step"]

SUPPORTED_OPTIMIZERS = ("torch.optim.SGD (momentum, dampening, nesterov, weight_decay)", "torch.optim.Adam", "torch.optim.AdamW")


class UpdateRule:
    """``update(k, phi, state, grad, hyper) -> (phi', state')`` for one parameter tensor, elementwise."""

    state_names: Tuple[str, ...] = ()
    identity_direct = False  # D_k = I, no state, B_k = -lr: the transpose needs no vjp
    linear = False  # the update is linear in (phi, state, grad): its Jacobians need no recorded values

    def init_state(self, phi: torch.Tensor) -> Tensors:
        return {s: torch.zeros_like(phi) for s in self.state_names}

    def update(self, k: int, phi, state: Tensors, grad, hyper: Hyper):  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class SGDRule(UpdateRule):
    """``torch.optim.SGD``: ``d = g + wd phi``; momentum buffer ``b = d`` at the first step, then
    ``b = mu b + (1 - dampening) d``; the step is ``b`` (or ``d + mu b`` with nesterov); ``phi -= lr step``."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    linear = True

    @property
    def state_names(self) -> Tuple[str, ...]:  # pyright: ignore[reportIncompatibleVariableOverride]  # read-only here
        return ("momentum_buffer",) if self.momentum else ()

    @property
    def identity_direct(self) -> bool:
        return not self.momentum and not self.weight_decay

    def update(self, k, phi, state, grad, hyper):
        d = grad + self.weight_decay * phi if self.weight_decay else grad
        if not self.momentum:
            return phi - hyper["lr"] * d, {}
        buf = d if k == 0 else self.momentum * state["momentum_buffer"] + (1 - self.dampening) * d
        direction = d + self.momentum * buf if self.nesterov else buf
        return phi - hyper["lr"] * direction, {"momentum_buffer": buf}


@dataclass(frozen=True)
class AdamRule(UpdateRule):
    """``torch.optim.Adam`` / ``AdamW`` (``decoupled``), without amsgrad:
    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``,
    ``phi -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)``; weight decay adds ``wd phi``
    to ``g`` (Adam) or scales ``phi`` by ``1 - lr wd`` first (AdamW)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    state_names: Tuple[str, ...] = ("exp_avg", "exp_avg_sq")

    def update(self, k, phi, state, grad, hyper):
        lr, t = hyper["lr"], k + 1
        if self.weight_decay and self.decoupled:
            phi = phi * (1 - lr * self.weight_decay)
        elif self.weight_decay:
            grad = grad + self.weight_decay * phi
        m = self.beta1 * state["exp_avg"] + (1 - self.beta1) * grad
        v = self.beta2 * state["exp_avg_sq"] + (1 - self.beta2) * grad * grad
        denom = _sqrt_flat_at_zero(v) / (1 - self.beta2**t) ** 0.5 + self.eps
        return phi - lr / (1 - self.beta1**t) * m / denom, {"exp_avg": m, "exp_avg_sq": v}


def _sqrt_flat_at_zero(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` whose derivative is 0 where ``v == 0`` rather than inf.

    Adam's ``v`` is exactly 0 for an entry whose gradients have all been 0 (a bias right before a
    BatchNorm): there ``d sqrt(v) = inf * 0`` would make the meta-gradient NaN, while the step's
    true derivative only needs the slope of ``sqrt(v)`` there to be finite (it multiplies ``g = 0``).
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def sgd_rules(lr: Union[float, torch.Tensor, Mapping[str, Any]], names: Sequence[str]) -> Tuple[Dict[str, UpdateRule], Dict[str, Hyper]]:
    """Plain SGD with step size ``lr`` (one value, or a dict with one per name) for every name."""
    per_name = dict(lr) if isinstance(lr, Mapping) else {n: lr for n in names}
    missing = sorted(set(names) - set(per_name))
    if missing:
        raise ValueError(f"lr gives no step size for {missing}.")
    return {n: SGDRule() for n in names}, {n: {"lr": per_name[n]} for n in names}


class InnerOptimizer(NamedTuple):
    """What a ``torch.optim`` instance says about the inner loop (:func:`read_optimizer`)."""

    adapted: List[str]  # the names of the parameters it holds, in its order
    rules: Dict[str, UpdateRule]
    hyper: Dict[str, Hyper]
    groups: List[List[str]]  # the names in each parameter group

    def override(self, override: Optional[Mapping[str, Sequence]]) -> Dict[str, Hyper]:
        """The hyperparameters with higher's ``override``: ``{"lr": [values]}``, one value for every group,
        one per parameter group, or one per adapted parameter; tensors that require grad are meta-learned."""
        hyper = {n: dict(h) for n, h in self.hyper.items()}
        for key, values in (override or {}).items():
            if key != "lr":
                raise ValueError(f"override supports only 'lr' (the step size of every inner optimizer), got {key!r}.")
            values = list(values)
            if len(values) == 1:
                per_name = dict.fromkeys(self.adapted, values[0])
            elif len(values) == len(self.groups):
                per_name = {n: v for names, v in zip(self.groups, values) for n in names}
            elif len(values) == len(self.adapted):
                per_name = dict(zip(self.adapted, values))
            else:
                raise ValueError(
                    f"override['lr'] needs one learning rate, one per parameter group ({len(self.groups)}) or one per "
                    f"adapted parameter ({len(self.adapted)}), got {len(values)}."
                )
            for name, lr in per_name.items():
                hyper[name]["lr"] = lr  # pyright: ignore[reportArgumentType]  # a float or a tensor, checked by check_hyper
        return hyper


def read_optimizer(
    named: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer, override: Optional[Mapping[str, Sequence]] = None,
    modules: bool = True,
) -> InnerOptimizer:
    """The adapted names, update rules, hyperparameters and groups of a ``torch.optim`` instance built over
    (some of) the tensors ``named``, with ``override`` applied (see :meth:`InnerOptimizer.override`).

    Learning rates are read now, so schedulers apply. Parameters with ``requires_grad=False`` are skipped, as
    ``torch.optim`` skips them: they do not adapt. ``modules=False`` (dicts of plain tensors) adapts every tensor.
    """
    kind = type(opt)
    if kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise TypeError(
            f"Unsupported inner optimizer {kind.__name__}; supported: {', '.join(SUPPORTED_OPTIMIZERS)}. "
            "Pass the torch.optim instance built over the parameters that adapt."
        )
    names = {id(p): n for n, p in named.items()}
    adapted: List[str] = []
    rules: Dict[str, UpdateRule] = {}
    hyper: Dict[str, Hyper] = {}
    groups: List[List[str]] = []
    for group in opt.param_groups:
        rule = _rule_for_group(kind, group)
        groups.append([])
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"inner_opt holds a parameter of shape {tuple(p.shape)} that is not a parameter of "
                    "the model: build inner_opt over (a subset of) model.parameters()."
                )
            name = names[id(p)]
            if not p.is_floating_point():
                raise TypeError(
                    f"Parameter {name!r} has dtype {p.dtype}: only real floating-point parameters can adapt. Leave it "
                    "out of inner_opt (complex parameters: adapt the real and imaginary parts as two real parameters)."
                )
            if modules and not p.requires_grad:  # frozen: as torch.optim and higher skip it, it does not adapt
                continue
            adapted.append(name)
            groups[-1].append(name)
            rules[name] = rule
            hyper[name] = {"lr": group["lr"]}
    if not adapted:
        raise ValueError("inner_opt holds no parameters that require grad: give it the parameters that adapt in the inner loop.")
    read = InnerOptimizer(adapted, rules, hyper, groups)
    return read._replace(hyper=read.override(override))


def check_hyper(hyper: Mapping[str, Hyper], named: Mapping[str, torch.Tensor]) -> None:
    """Learning rates must be finite, scalars or of their parameter's shape, and >= 0 unless meta-learned."""
    for name, h in hyper.items():
        lr = h["lr"]
        if type(lr) is float and 0.0 <= lr < float("inf"):  # the usual case, read at every adaptation: no ABC check
            continue
        if isinstance(lr, torch.Tensor):
            if lr.dim() and lr.shape != named[name].shape:
                raise ValueError(
                    f"The learning rate of {name!r} has shape {tuple(lr.shape)}; it must be a scalar or the "
                    f"parameter's shape {tuple(named[name].shape)}."
                )
            if not torch.isfinite(lr).all() or (not lr.requires_grad and (lr < 0).any()):  # learned rates may turn negative (Meta-SGD)
                raise ValueError(f"The learning rate of {name!r} must be finite and >= 0.")
        elif isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (0 <= lr < float("inf")):
            raise ValueError(f"The inner learning rate must be a finite float >= 0, got {lr!r} for {name!r}.")


def _rule_for_group(kind, group) -> UpdateRule:
    if group.get("maximize", False):
        raise ValueError("inner_opt has maximize=True, which is not supported: minimise the negated loss instead.")
    if kind is torch.optim.SGD:
        return SGDRule(group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"])
    if group.get("amsgrad", False):
        raise ValueError("inner_opt has amsgrad=True, which is not supported (its max is not differentiable in a useful way).")
    beta1, beta2 = group["betas"]
    return AdamRule(float(beta1), float(beta2), group["eps"], group["weight_decay"], kind is torch.optim.AdamW)


def plain_sgd_rate(rules: Mapping[str, UpdateRule], hyper: Mapping[str, Hyper]) -> Optional[float]:
    """The one float learning rate of a step whose every rule is plain SGD (no momentum, no weight decay), else ``None``:
    such a step is ``phi - lr * grad`` for every parameter, one ``torch._foreach_add`` call."""
    rates = {h["lr"] for h in hyper.values()}
    if len(rates) != 1 or not all(isinstance(r, SGDRule) and r.identity_direct for r in rules.values()):
        return None
    lr = rates.pop()
    return lr if type(lr) is float else float(lr) if isinstance(lr, numbers.Real) and not isinstance(lr, bool) else None


def plain_sgd_step(points: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float) -> List[torch.Tensor]:
    """``point - lr * grad`` for every parameter in one call, as ``torch.optim.SGD`` takes it: the one computation of a
    plain-SGD step wherever it is taken (with a graph or without, on a task axis or not), so the same bits everywhere.

    >>> plain_sgd_step([torch.tensor([1.0, 2.0])], [torch.tensor([2.0, 2.0])], 0.5)
    [tensor([0., 1.])]
    """
    return list(torch._foreach_add(list(points), list(grads), alpha=-lr))  # pyright: ignore[reportPrivateImportUsage]


def learned(*hypers: Mapping[str, Hyper]) -> List[Tuple[str, str, torch.Tensor]]:
    """``(parameter, hyperparameter, tensor)`` for every distinct hyperparameter tensor that requires grad."""
    found: Dict[int, Tuple[str, str, torch.Tensor]] = {}
    for hyper in hypers:
        for n, hs in hyper.items():
            found.update({id(v): (n, h, v) for h, v in hs.items() if isinstance(v, torch.Tensor) and v.requires_grad})
    return list(found.values())


def detached(hyper: Hyper) -> Hyper:
    """``hyper`` with its tensors detached (``hyper`` itself where it holds none)."""
    if not any(isinstance(v, torch.Tensor) for v in hyper.values()):
        return hyper
    return {h: v.detach() if isinstance(v, torch.Tensor) else v for h, v in hyper.items()}


class StepTranspose:
    """The transposed step Jacobians of a recorded inner loop, for :func:`binom_opt.core.expansion.expand`.

    Adjoint vectors are dicts with an entry per adapted parameter (its name) and per state tensor
    (``"name/state"``), each with the task dimension first. For step ``k`` and such a vector ``z``
    (the gradient of the outer loss with respect to ``(phi_{k+1}, state_{k+1})``), :meth:`vjp` returns
    the direct part ``D_k^T z``, the vector ``B_k^T z`` that the Hessian ``H_k`` multiplies, and the
    cotangents of the learned hyperparameters, by ``id``. ``hyper`` holds the hyperparameters of every
    step (one dict for all, or a sequence with one per step); ``values(k)`` gives the recorded
    ``(phi_k, state_k, grad_k)``; linear rules without learned hyperparameters never ask for them.

    Example (plain SGD: ``D = I``, ``B = -lr``):
        >>> t = StepTranspose({"w": SGDRule()}, {"w": {"lr": 0.5}})
        >>> t.vjp(0, {"w": torch.ones(2)})[1]["w"]
        tensor([-0.5000, -0.5000])
    """

    def __init__(self, rules: Mapping[str, UpdateRule], hyper: Union[Mapping[str, Hyper], Sequence[Mapping[str, Hyper]]],
                 values: Optional[Callable[[int], StepValues]] = None, learned_tensors: Optional[List[Tuple[str, str, torch.Tensor]]] = None,
                 reads: Optional[Dict[int, Tuple[bool, Optional[float]]]] = None):
        """``learned_tensors``: :func:`learned` of every step's ``hyper``, where the caller has it already; ``reads``:
        another transpose's :meth:`reads` of the same rules, shared (the recorder's, for the meta-gradient's), the
        settings it read not read again."""
        self.rules, self.values = dict(rules), values
        self.hyper: Callable[[int], Mapping[str, Hyper]] = (lambda k: hyper[k]) if isinstance(hyper, (list, tuple)) else (lambda k: hyper)  # pyright: ignore[reportAttributeAccessIssue, reportReturnType]
        # whether ``learned`` covers every setting :meth:`reads` is asked about (the recorder's transposes also read
        # settings given later, higher's ``override``)
        self._every_setting = learned_tensors is not None or isinstance(hyper, (list, tuple))
        if learned_tensors is None:
            learned_tensors = learned(*hyper) if isinstance(hyper, (list, tuple)) else learned(hyper)  # pyright: ignore[reportArgumentType]  # one mapping
        self.learned = learned_tensors
        self.nonlinear = not all(r.linear for r in self.rules.values())  # its Jacobians read each step's values
        self._identity = all(r.identity_direct for r in self.rules.values())
        # per hyperparameter mapping (by id: each is held by the steps that read it): needs_values, one rate
        self.read_cache: Dict[int, Tuple[bool, Optional[float]]] = {} if reads is None else reads

    def needs_values(self, hyper: Mapping[str, Hyper]) -> bool:
        """Whether a step with these hyperparameters reads its recorded ``(phi, state, grad)``."""
        return self.reads(hyper)[0]

    def reads(self, hyper: Mapping[str, Hyper]) -> Tuple[bool, Optional[float]]:
        """``(needs_values, plain_sgd_rate)`` of a hyperparameter mapping, once per mapping (one backward reads each
        step's; the recorder, each setting's)."""
        known = self.read_cache.get(id(hyper))
        if known is None:
            # where every step's setting is known, one without learned hyperparameters overall has none in any
            has_learned = (bool(self.learned) or not self._every_setting) and bool(learned(hyper))
            known = self.read_cache[id(hyper)] = (self.nonlinear or has_learned, plain_sgd_rate(self.rules, hyper))
        return known

    def extend(self, g: Tensors) -> Tensors:
        """``(g, 0)``: the outer gradient with zero cotangents for the final optimizer state."""
        return {**g, **{f"{n}/{s}": torch.zeros_like(g[n]) for n, r in self.rules.items() for s in r.state_names}}

    def through_rate(self, k: int) -> Optional[float]:
        """The float ``c`` with ``B_k^T z = c z`` for every ``z`` (plain SGD at one float rate: ``-lr``), else ``None``.
        The expansion then multiplies the Hessian's product by it, not the vector the Hessian takes: no scaled copy of
        each vector, and no operator to make it.

        >>> StepTranspose({"w": SGDRule()}, {"w": {"lr": 0.5}}).through_rate(0)
        -0.5
        """
        needs_values, rate = self.reads(self.hyper(k))
        return -rate if self._identity and not needs_values and rate is not None else None

    def identity_through(self, steps: int) -> bool:
        """Whether :meth:`identity_direct` holds at each of the first ``steps`` steps, each distinct setting read once.

        >>> StepTranspose({"w": SGDRule()}, [{"w": {"lr": 0.5}}] * 3).identity_through(3)
        True
        """
        settings = {id(h): h for h in map(self.hyper, range(steps))}.values()
        return self._identity and not any(self.needs_values(h) for h in settings)

    def identity_direct(self, k: int) -> bool:
        """Whether ``D_k^T`` is the identity (plain SGD, and SGD with learned rates: the update's direct part)."""
        return self._identity and not self.needs_values(self.hyper(k))

    def direct(self, k: int, z: Tensors) -> Tensors:
        """``D_k^T z`` alone (``z`` itself for plain SGD: no operator)."""
        if self.identity_direct(k):
            return {n: z[n] for n in self.rules}
        return self.vjp(k, z)[0]

    def vjp(self, k: int, z: Tensors, with_hyper: bool = False) -> Tuple[Tensors, Tensors, Dict[int, torch.Tensor]]:
        hyper = self.hyper(k)
        needs_values, rate = self.reads(hyper)
        if self._identity and not needs_values:
            zs = [z[n] for n in self.rules]
            through = scaled_all(zs, -rate) if rate is not None else [-hyper[n]["lr"] * t for n, t in zip(self.rules, zs)]
            return dict(zip(self.rules, zs)), dict(zip(self.rules, through)), {}
        phi, state, grad = self.values(k) if needs_values else (z, {}, z)  # pyright: ignore[reportOptionalCall]  # given where needed
        direct: Tensors = {}
        through_grad: Tensors = {}
        hyper_grads: Dict[int, torch.Tensor] = {}
        for n, rule in self.rules.items():
            tensors = {h: v for h, v in hyper[n].items() if with_hyper and isinstance(v, torch.Tensor) and v.requires_grad}
            fixed = {h: v for h, v in detached(hyper[n]).items() if h not in tensors}

            def step(p, st, gr, hy, rule=rule, fixed=fixed):
                return rule.update(k, p, st, gr, {**fixed, **hy})

            states = {s: state[n][s] if n in state else torch.zeros_like(z[n]) for s in rule.state_names}
            _, pullback = vjp(step, phi[n], states, grad[n], {h: v.detach() for h, v in tensors.items()})  # pyright: ignore[reportAssignmentType]  # no aux
            d_phi, d_state, d_grad, d_hyper = pullback((z[n], {s: z[f"{n}/{s}"] for s in rule.state_names}))
            direct[n] = d_phi
            direct.update({f"{n}/{s}": d_state.get(s, torch.zeros_like(z[n])) for s in rule.state_names})
            through_grad[n] = d_grad
            for h, v in tensors.items():
                hyper_grads[id(v)] = hyper_grads[id(v)] + d_hyper[h] if id(v) in hyper_grads else d_hyper[h]
        return direct, through_grad, hyper_grads
