"""Meta-gradient estimators: small immutable descriptions of which expansion terms to keep.

With the inner loop ``phi_{k+1} = phi_k - alpha * grad l(phi_k)`` and ``H_k`` the Hessian at
``phi_k``, the exact MAML meta-gradient is ``(I - alpha H_0) ... (I - alpha H_{K-1}) g``.
Every estimator keeps a subset of the terms of that product's expansion:

========================  ===========================================================
``FirstOrder()``          ``g`` (all Hessians dropped)
``Truncated(L)``          the last ``L`` factors only
``Binomial(L)``           every term with at most ``L`` Hessian factors
``Hybrid(L, C)``          ``Binomial(L)`` with ``H_k := 0`` for ``k < K - C``
``Exact()``               the whole product (graph-free exact MAML)
``Implicit(L, reg)``      iMAML: ``(I + H(phi_K)/reg)^-1 g`` by ``L`` conjugate-gradient steps
``Reptile()``             Reptile's direction ``theta - phi_K`` (no Hessian, no query gradient)
========================  ===========================================================

The last two are not expansions of that product: ``Implicit`` differentiates the fixed point of a
proximal inner loop (its support loss gets ``reg/2 ||phi - theta||^2``), and ``Reptile`` is the
update of Nichol et al. (2018) in the form of a gradient.

All of them reduce to one :class:`ExpansionPlan` for a given number of inner steps ``K``:
how many Hessian factors a term may have (``levels``), the first step whose Hessian counts
(``first_active``), how the sum is evaluated (``schedule``) and the step-size scale applied
inside the estimator only.

Example:
    >>> import binom_opt as bo
    >>> bo.Binomial(2).plan(5)
    ExpansionPlan(levels=2, first_active=0, schedule='binomial', hessian_scale=1.0)
    >>> bo.Truncated(2).plan(5)
    ExpansionPlan(levels=2, first_active=3, schedule='sequential', hessian_scale=1.0)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal, Optional

__all__ = ["Estimator", "ExpansionPlan", "FirstOrder", "Truncated", "Binomial", "Hybrid", "Exact", "Implicit", "Reptile", "check_estimator"]

HessianScale = Literal["exact", "paper"]


@dataclass(frozen=True)
class ExpansionPlan:
    """What an estimator computes for a fixed number of inner steps ``K``.

    Attributes:
        levels: the most Hessian factors a kept term may have (``L``).
        first_active: ``K - C``: Hessians of steps before it are treated as zero.
        schedule: ``"sequential"`` when each round needs a single HVP (the kept terms form a
            plain product of factors), ``"binomial"`` for the batched level recursion,
            ``"implicit"`` for conjugate gradient at ``phi_K`` (``levels`` iterations), ``"reptile"``
            for ``theta - phi_K``.
        hessian_scale: factor on the step size inside the estimator (``L/K`` for the
            paper's ``alpha' = L alpha / K``, else 1).
    """

    levels: int
    first_active: int
    schedule: Literal["sequential", "binomial", "implicit", "reptile"]
    hessian_scale: float


def _check_level(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value}.")
    return int(value)


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps (the number of inner steps K) must be an integer >= 1, got {steps!r}.")
    return int(steps)


class Estimator:
    """Base class of the estimators; subclasses say how to :meth:`plan` for ``K`` steps."""

    def plan(self, steps: int) -> ExpansionPlan:  # pragma: no cover - abstract
        """The terms to keep for ``K = steps`` inner steps; a clear error if the estimator does not fit ``K``."""
        raise NotImplementedError

    @property
    def window(self) -> Optional[int]:
        """How many final inner steps keep their Hessians whatever ``K`` (``None``: all): the points
        before them are never read, so an inner loop need not keep them."""
        return None


@dataclass(frozen=True)
class FirstOrder(Estimator):
    """First-order MAML: the meta-gradient is the query gradient ``g`` at the adapted point."""

    def plan(self, steps: int) -> ExpansionPlan:
        _check_steps(steps)
        return ExpansionPlan(0, steps, "sequential", 1.0)

    @property
    def window(self) -> Optional[int]:
        return 0


@dataclass(frozen=True)
class Exact(Estimator):
    """Exact MAML meta-gradient, computed graph-free with ``K`` sequential HVPs."""

    def plan(self, steps: int) -> ExpansionPlan:
        steps = _check_steps(steps)
        return ExpansionPlan(steps, 0, "sequential", 1.0)


@dataclass(frozen=True)
class Truncated(Estimator):
    """Truncated backpropagation through the last ``L`` inner steps (``L`` sequential HVPs).

    ``Truncated(0)`` is first-order and ``Truncated(K)`` is exact.
    """

    L: int

    def __post_init__(self) -> None:
        _check_level("L", self.L)

    def plan(self, steps: int) -> ExpansionPlan:
        steps = _check_steps(steps)
        _check_not_above_steps(self, "L", self.L, steps)
        return ExpansionPlan(self.L, steps - self.L, "sequential", 1.0)

    @property
    def window(self) -> Optional[int]:
        return self.L


@dataclass(frozen=True)
class Binomial(Estimator):
    """Truncated binomial expansion: every term with at most ``L`` Hessian factors.

    ``Binomial(0)`` is first-order and ``Binomial(K)`` is exact. Each of the ``L`` rounds is
    one batched call of ``K - L + 1`` Hessian-vector products.

    Args:
        L: the most Hessian factors a kept term may have.
        hessian_scale: ``"exact"`` (default) uses the inner step size ``alpha``;
            ``"paper"`` uses ``alpha' = L * alpha / K`` inside the estimator only (paper,
            appendix C.2), which damps the series when ``alpha * ||H||`` is large at the price
            of bias. Both are exact at ``L = K`` and first-order at ``L = 0``.
    """

    L: int
    hessian_scale: HessianScale = "exact"

    def __post_init__(self) -> None:
        _check_level("L", self.L)
        _check_hessian_scale(self.hessian_scale)

    def plan(self, steps: int) -> ExpansionPlan:
        steps = _check_steps(steps)
        _check_not_above_steps(self, "L", self.L, steps)
        return _binomial_plan(self.L, steps, steps, self.hessian_scale)


@dataclass(frozen=True)
class Hybrid(Estimator):
    """Binomial(L) over the last ``C`` steps only (paper appendix D.1): ``H_k := 0`` for ``k < K - C``.

    ``Hybrid(L, K)`` is ``Binomial(L)`` and ``Hybrid(L, L)`` is ``Truncated(L)``.
    """

    L: int
    C: int
    hessian_scale: HessianScale = "exact"

    def __post_init__(self) -> None:
        _check_level("L", self.L)
        _check_level("C", self.C)
        if self.C < self.L:
            raise ValueError(
                f"Hybrid needs L <= C (C is how many final steps keep their Hessians), got "
                f"L={self.L}, C={self.C}. Use Hybrid(L, C) with C >= L, or Truncated(L)."
            )
        _check_hessian_scale(self.hessian_scale)

    def plan(self, steps: int) -> ExpansionPlan:
        steps = _check_steps(steps)
        _check_not_above_steps(self, "C", self.C, steps)
        return _binomial_plan(self.L, self.C, steps, self.hessian_scale)

    @property
    def window(self) -> Optional[int]:
        return self.C


def _binomial_plan(levels: int, window: int, steps: int, hessian_scale: HessianScale) -> ExpansionPlan:
    if levels == 0:
        return FirstOrder().plan(steps)
    scale = levels / steps if hessian_scale == "paper" else 1.0
    # L = 0 keeps no Hessian term and L = C keeps them all: the kept sum is then a plain
    # product of factors, one HVP per round, with nothing to batch.
    schedule = "sequential" if levels in (0, window) else "binomial"
    return ExpansionPlan(levels, steps - window, schedule, scale)


@dataclass(frozen=True)
class Implicit(Estimator):
    """iMAML (Rajeswaran et al., 2019): the meta-gradient of the inner loop's proximal fixed point.

    With this estimator the inner loop minimises the support loss plus ``reg/2 * ||phi - theta||^2``
    (the library adds the term; ``theta`` is the initial point), as iMAML defines it. If ``phi_K``
    is that minimiser, ``d phi_K / d theta = (I + H/reg)^-1`` with ``H`` the support loss's Hessian at
    ``phi_K``, and the meta-gradient ``(I + H/reg)^-1 g`` is solved for with ``cg_steps`` iterations of
    conjugate gradient, one HVP each, whatever ``K``: the trajectory is never read, only ``phi_K``.
    Other meta-parameters ``c`` the support loss uses (an ANIL body) get ``-d/dc <grad l(phi_K, c), x> / reg``
    with ``x`` the solution. ``MetaGradientStats.cg_residual`` reports how well ``x`` solves the
    system; negative curvature (``H + reg I`` not positive definite) or, with ``tol``, a residual
    above it is an error under ``nan_policy="raise"`` and a warning otherwise.

    Args:
        cg_steps: conjugate-gradient iterations (HVPs per task), the "L" of iMAML's tables.
        reg: the proximal regularisation ``lambda > 0``: larger keeps ``phi`` near ``theta`` and
            makes the system better conditioned.
        tol: the largest relative residual ``||g - (I + H/reg) x|| / ||g||`` accepted after
            ``cg_steps`` iterations (``None``: any; a few iterations are an approximation by design,
            and CG's residual need not fall at every iteration).
    """

    cg_steps: int
    reg: float
    tol: Optional[float] = None

    def __post_init__(self) -> None:
        _check_level("cg_steps", self.cg_steps)
        if self.cg_steps < 1:
            raise ValueError(f"Implicit needs cg_steps >= 1 conjugate-gradient iterations, got {self.cg_steps}.")
        if isinstance(self.reg, bool) or not isinstance(self.reg, numbers.Real) or not 0 < self.reg < float("inf"):
            raise ValueError(f"Implicit needs a finite proximal regularisation reg > 0, got {self.reg!r}.")
        if self.tol is not None and (isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not self.tol > 0):
            raise ValueError(f"Implicit's tol must be a residual > 0 (or None), got {self.tol!r}.")

    def plan(self, steps: int) -> ExpansionPlan:
        return ExpansionPlan(self.cg_steps, _check_steps(steps), "implicit", 1.0)

    @property
    def window(self) -> Optional[int]:
        return 1  # the last point only, for the check that the support loss replays as recorded


@dataclass(frozen=True)
class Reptile(Estimator):
    """Reptile (Nichol et al., 2018) as a meta-gradient: ``theta - phi_K`` for each task.

    The query loss only carries it: its value and gradient are not used (any loss of the adapted
    learner works, e.g. the query loss you log). With ``torch.optim.SGD(lr=eps)`` as the outer
    optimizer, one task's step is Reptile's ``theta <- theta + eps * (phi_K - theta)``; the directions
    of a meta-batch's tasks add up (``lr = eps / n`` for the mean over ``n`` tasks). Only the adapted
    parameters get one: a support loss that uses other meta-parameters (an ANIL body), or learned
    learning rates, is an error.
    """

    def plan(self, steps: int) -> ExpansionPlan:
        return ExpansionPlan(0, _check_steps(steps), "reptile", 1.0)

    @property
    def window(self) -> Optional[int]:
        return 0


def _check_hessian_scale(value: object) -> None:
    if value not in ("exact", "paper"):
        raise ValueError(f"hessian_scale must be 'exact' or 'paper', got {value!r}.")


def _check_not_above_steps(estimator: Estimator, name: str, value: int, steps: int) -> None:
    if value > steps:
        raise ValueError(
            f"{estimator!r} needs {name} <= K, the number of inner steps, but {name}={value} > K={steps}. "
            f"Use {name} <= {steps} (or Exact() for the full meta-gradient)."
        )


def check_estimator(estimator: object) -> Estimator:
    """``estimator`` if it is one, else a clear error."""
    if not isinstance(estimator, Estimator):
        raise TypeError(
            "estimator must be one of FirstOrder(), Truncated(L), Binomial(L), Hybrid(L, C), Exact(), Implicit(cg_steps, "
            f"reg), Reptile(); got {estimator!r}."
        )
    return estimator
