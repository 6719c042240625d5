"""iMAML's implicit meta-gradient: the proximal support loss and conjugate gradient at ``phi_K``.

At the minimiser of ``F = l + reg/2 ||phi - theta||^2`` the meta-gradient solves ``(H_F / reg) x = g``
(``H_F = H + reg I``, positive definite while ``H > -reg I``), by CG for every task at once
(docs/design.md, "Implicit and Reptile").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

from .batching import Tasks, along_tasks
from .checks import finite_flag, naming, nan_max
from .expansion import ExpansionResult
from .mixed import directional_gradients
from .readback import Readback

Tensors = Dict[str, torch.Tensor]

__all__ = ["proximal", "CGResult", "conjugate_gradient", "ImplicitSolveWarning", "implicit_solve", "check_implicit", "implicit_others"]


def proximal(loss_fn: Callable, theta: Tensors, reg: float) -> Callable:
    """``loss_fn`` plus ``reg/2 ||phi - theta||^2`` (``theta`` held constant: ``d/d theta`` is the estimator's).

    >>> f = proximal(lambda p, task: (p["w"] ** 2).sum(), {"w": torch.tensor([1.0])}, 2.0)
    >>> f({"w": torch.tensor([3.0])}, None)
    tensor(13.)
    """
    theta = {n: t.detach() for n, t in theta.items()}

    def loss(phi: Tensors, task) -> torch.Tensor:
        return loss_fn(phi, task) + reg / 2 * sum(((phi[n] - theta[n]) ** 2).sum() for n in phi)

    return loss


@dataclass
class CGResult:
    """What :func:`conjugate_gradient` returns.

    Attributes:
        x: the approximate solution, ``[B, ...]`` per entry.
        residuals: per iteration, each task's ``||b - A x|| / ||b||`` (``[B]``).
        negative_curvature: ``[B]``, whether a search direction met ``p^T A p <= 0`` (the system is not
            positive definite there: iterations stop for that task).
    """

    x: Tensors
    residuals: List[torch.Tensor] = field(default_factory=list)
    negative_curvature: torch.Tensor = None  # pyright: ignore[reportAssignmentType]  # set by conjugate_gradient

    @property
    def residual(self) -> torch.Tensor:
        """Each task's final relative residual ``[B]`` (1 when no iteration ran)."""
        return self.residuals[-1] if self.residuals else torch.ones_like(self.negative_curvature, dtype=torch.float64)


def conjugate_gradient(apply: Callable[[Tensors], Tensors], b: Tensors, steps: int) -> CGResult:
    """``steps`` iterations of conjugate gradient on ``A x = b`` for every task at once, from ``x = 0``.

    ``apply(v)`` is ``A v`` for a symmetric ``A`` and ``[B, ...]`` vectors; each task has its own step
    sizes. A task whose residual reached 0 or that met negative curvature stops moving.

    Example (``A = diag(2, 4)``, one task: two iterations solve it):
        >>> A = torch.tensor([[2.0, 4.0]], dtype=torch.float64)
        >>> out = conjugate_gradient(lambda v: {"w": A * v["w"]}, {"w": torch.ones(1, 2, dtype=torch.float64)}, 2)
        >>> out.x["w"], float(out.residual[0])
        (tensor([[0.5000, 0.2500]], dtype=torch.float64), 0.0)
    """
    x = {n: torch.zeros_like(t) for n, t in b.items()}
    r = dict(b)
    p = dict(b)
    rr = _dot(r, r)
    b_norm = rr.sqrt().clamp_min(torch.finfo(rr.dtype).tiny)
    out = CGResult(x, negative_curvature=torch.zeros_like(rr, dtype=torch.bool))
    for _ in range(steps):
        Ap = apply(p)
        pAp = _dot(p, Ap)
        bent = pAp <= 0
        out.negative_curvature |= bent & (rr > 0)
        moving = (rr > 0) & ~out.negative_curvature
        alpha = torch.where(moving, rr / torch.where(moving, pAp, torch.ones_like(pAp)), torch.zeros_like(rr))
        x = {n: x[n] + _per_task(alpha, x[n]) * p[n] for n in x}
        r = {n: r[n] - _per_task(alpha, r[n]) * Ap[n] for n in r}
        rr_next = _dot(r, r)
        beta = torch.where(moving, rr_next / torch.where(moving, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = {n: r[n] + _per_task(beta, p[n]) * p[n] for n in p}
        rr = torch.where(moving, rr_next, rr)
        out.residuals.append(rr.sqrt() / b_norm)
    out.x = x
    return out


def _dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """Each task's inner product ``[B]``, in float64 (the step sizes of CG are ratios of these)."""
    return sum((a[n].double() * b[n].double()).flatten(1).sum(1) for n in a)  # pyright: ignore[reportReturnType]  # a sum of tensors


def _per_task(scalars: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return along_tasks(scalars.to(like.dtype), like)


class ImplicitSolveWarning(RuntimeWarning):
    """Conjugate gradient for an implicit meta-gradient met negative curvature or did not reduce the residual."""


def implicit_solve(estimator, g: Tensors, oracle, read: Readback) -> ExpansionResult:
    """Solve ``(I + H/reg) x = g`` at ``phi_K`` by conjugate gradient; its breakdowns go to ``read``, for
    :func:`check_implicit`."""
    reg = estimator.reg  # pyright: ignore[reportAttributeAccessIssue]  # Implicit here
    with torch.no_grad():  # the recorded loss is the proximal one: its Hessian is H + reg I
        cg = conjugate_gradient(lambda v: {n: t / reg for n, t in oracle.at_final(v).items()}, g, estimator.cg_steps)  # pyright: ignore[reportAttributeAccessIssue]
    tol = estimator.tol  # pyright: ignore[reportAttributeAccessIssue]  # Implicit here
    read.add("cg_residual", cg.residual)
    read.add("cg_negative", cg.negative_curvature)
    read.add("cg_failed", cg.negative_curvature | ~torch.isfinite(cg.residual) | (cg.residual > (float("inf") if tol is None else tol)))
    return ExpansionResult(cg.x, contributions=torch.stack(cg.residuals) if cg.residuals else None)


def check_implicit(host: Dict[str, list], estimator, tasks: Tasks, nan_policy: str) -> Tuple[float, Tuple[int, ...]]:
    """Raise or warn when conjugate gradient broke down; the largest relative residual and the tasks it failed."""
    tol = estimator.tol  # pyright: ignore[reportAttributeAccessIssue]  # Implicit here
    residuals, negative = host["cg_residual"], host["cg_negative"]
    unsolved = tuple(b for b, failed in enumerate(host["cg_failed"]) if failed)
    if unsolved:
        residual = nan_max([residuals[b] for b in unsolved])
        why = ("met negative curvature (H + reg I is not positive definite at the adapted point)"
               if any(negative) else f"left a residual above tol={tol}")
        message = (f"{estimator!r}: conjugate gradient {why}{naming(tasks, unsolved)}; relative residual "
                   f"||g - (I + H/reg) x|| / ||g|| = {residual:.3g}, so the implicit meta-gradient is unreliable. Raise "
                   "reg or cg_steps, take more inner steps (the inner loop must reach the proximal minimum), or use "
                   "another estimator.")
        if nan_policy == "raise":
            raise FloatingPointError(message + " (with nan_policy='skip_task' this is a warning)")
        warnings.warn(message, ImplicitSolveWarning, stacklevel=2)
    return nan_max(residuals), unsolved


def implicit_others(estimator, result: ExpansionResult, oracle, trajectory, meta_inputs: list, read: Readback):
    """``-d/dc <grad F(phi_K, c), x> / reg`` for the other meta-parameters ``c`` (the proximal term has no ``c``);
    ``x`` is already zero for the tasks the NaN policy dropped."""
    if not meta_inputs:
        return []
    weight = {n: -t / estimator.reg for n, t in result.meta_grad.items()}  # pyright: ignore[reportAttributeAccessIssue]  # Implicit here
    final = {n: t.unsqueeze(0) for n, t in trajectory.final.items()}
    grads = directional_gradients(oracle, trajectory.loss_fns[-1], final, {n: t.unsqueeze(0) for n, t in weight.items()},
                                  meta_inputs, "the mixed second-order terms at the adapted point",
                                  trajectory.context(trajectory.steps - 1))
    finite = finite_flag(grads)
    if finite is not None:
        read.add("implicit_others_bad", ~finite)
    return grads
