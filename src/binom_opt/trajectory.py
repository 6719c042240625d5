"""The inner loop: K plain SGD steps that record where they went and keep no autograd graph."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

Tensors = Dict[str, torch.Tensor]
StepSize = Mapping[str, Union[float, torch.Tensor]]

__all__ = ["Trajectory", "run_sgd", "check_replay", "gradient_at", "sgd_update", "stack_points", "check_scalar_loss", "add_note"]


@dataclass
class Trajectory:
    """A finished inner loop.

    Attributes:
        points: ``phi_0 .. phi_{K-1}``, each entry stacked along a leading step dimension
            (detached); the HVPs of the estimators are taken there.
        final: ``phi_K`` (detached).
        losses: the inner loss at each recorded point, as floats.
    """

    points: Tensors
    final: Tensors
    losses: List[float]

    @property
    def steps(self) -> int:
        return len(self.losses)


def check_scalar_loss(loss: object, what: str) -> torch.Tensor:
    """Raise a clear error unless ``loss`` is a real floating-point scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must return a scalar torch.Tensor, got {type(loss).__name__}.")
    if loss.dim() != 0:
        raise ValueError(
            f"{what} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}. "
            "Reduce it, e.g. with .mean() or .sum()."
        )
    if not loss.is_floating_point():
        raise TypeError(f"{what} must return a floating-point loss, got dtype {loss.dtype}.")
    return loss


def gradient_at(
    loss_fn: Callable[[Tensors], torch.Tensor],
    phi: Mapping[str, torch.Tensor],
    *,
    step: int,
    allow_unused: bool = False,
    inspect: Optional[Callable[[torch.Tensor, Tensors], None]] = None,
) -> Tuple[Tensors, float]:
    """``(grad loss_fn(phi), loss value)`` with the graph dropped, after checking the loss.

    ``inspect(loss, leaves)`` sees the loss while its graph is alive (the engine finds the other
    tensors the loss depends on that way). Unused entries get a zero gradient when
    ``allow_unused``, else a clear error.

    Raises:
        ValueError: the loss does not depend on (some of) ``phi``.
        FloatingPointError: the loss is NaN or Inf (naming ``step``).
    """
    with torch.enable_grad():
        leaves = {n: t.detach().requires_grad_(True) for n, t in phi.items()}
        try:
            loss = loss_fn(leaves)
        except Exception as error:
            add_note(error, f"binom_opt: raised by the support-loss closure at inner step {step}; check that the data, "
                            "the model and the inner optimizer's parameters share one dtype and one device.")
            raise
        loss = check_scalar_loss(loss, "The inner-loss closure")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"The inner loss is {value} at inner step {step}: the inner loop diverged or the data "
                "holds NaN/Inf. Lower the inner learning rate or check the support set."
            )
        if not loss.requires_grad:
            raise ValueError(
                "The inner loss does not depend on the adapted parameters (it has no autograd graph): "
                "the closure must compute the loss from the learner it is given."
            )
        if inspect is not None:
            inspect(loss, leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    bad = [n for n, g in zip(leaves, grads) if g is not None and not bool(torch.isfinite(g).all())]
    if bad:
        raise FloatingPointError(
            f"The inner gradient of {bad} is not finite at inner step {step} although the loss is {value!r}: an "
            "operation in the support loss has an infinite derivative there (e.g. sqrt or log at 0). Clamp "
            "its input away from the singularity."
        )
    unused = [n for n, g in zip(leaves, grads) if g is None]
    if unused and not allow_unused:
        raise ValueError(
            f"The inner loss does not depend on the adapted parameter(s) {unused}. Adapt only parameters "
            "the support loss uses (leave the others out of the inner optimizer), or allow_unused=True."
        )
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}, value


def add_note(error: BaseException, note: str) -> None:
    """Attach context to an exception without changing its type (PEP 678; a no-op before Python 3.11)."""
    if hasattr(error, "add_note"):
        error.add_note(note)


def sgd_update(phi: Tensors, grads: Tensors, step_size: StepSize) -> Tensors:
    """``phi - a * grads``, outside any autograd graph."""
    with torch.no_grad():
        return {n: phi[n] - step_size[n] * grads[n] for n in phi}


def run_sgd(
    loss_fn: Callable[[Tensors], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    step_size: StepSize,
    steps: int,
) -> Trajectory:
    """Run ``phi_{k+1} = phi_k - a * grad loss_fn(phi_k)`` for ``steps`` steps from ``params``.

    Each step differentiates the loss once and drops its graph, so memory does not grow with
    ``steps``. Errors as in :func:`gradient_at`.
    """
    phi = {n: p.detach() for n, p in params.items()}
    recorded: List[Tensors] = []
    losses: List[float] = []
    for k in range(steps):
        grads, value = gradient_at(loss_fn, phi, step=k)
        recorded.append(phi)
        losses.append(value)
        phi = sgd_update(phi, grads, step_size)
    return Trajectory(points=stack_points(recorded), final=phi, losses=losses)


def stack_points(points: List[Tensors]) -> Tensors:
    """A list of dicts (one per step) as one dict of tensors with a leading step dimension."""
    return {n: torch.stack([p[n] for p in points]) for n in points[0]}


def check_replay(loss_fns: List[Callable[[Tensors], torch.Tensor]], trajectory: Trajectory) -> None:
    """Raise if a support loss replayed now differs from the value it had during the inner loop.

    The estimators replay the support loss at recorded points; a closure that reads a variable
    that has changed since (a loop variable captured by a lambda, a later batch) would silently
    differentiate another loss. One forward per distinct loss function catches that.
    """
    checked = set()
    with torch.no_grad():
        for k, fn in enumerate(loss_fns):
            if id(fn) in checked:
                continue
            checked.add(id(fn))
            recorded = trajectory.losses[k]
            now = float(fn({n: t[k] for n, t in trajectory.points.items()}))
            if not math.isclose(now, recorded, rel_tol=1e-5, abs_tol=1e-7):
                raise RuntimeError(
                    f"The support loss replayed for the meta-gradient is {now!r}, but it was {recorded!r} at inner "
                    f"step {k}: the closure is not a pure function of the learner. Either it reads a variable that "
                    "changed after the inner loop, such as a loop variable captured by a lambda (bind the data when "
                    "you build it, e.g. lambda m, x=x_s, y=y_s: F.cross_entropy(m(x), y)), or it draws random "
                    "numbers, e.g. dropout (make it deterministic, or pass randomness='same'/'different' to accept "
                    "resampled replays)."
                )
