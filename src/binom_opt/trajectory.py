"""The inner loop: K plain SGD steps that record where they went and keep no autograd graph."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

Tensors = Dict[str, torch.Tensor]
StepSize = Mapping[str, Union[float, torch.Tensor]]

__all__ = ["Trajectory", "run_sgd", "check_scalar_loss"]


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


def run_sgd(
    loss_fn: Callable[[Tensors], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    step_size: StepSize,
    steps: int,
    *,
    inspect_first_loss: Optional[Callable[[torch.Tensor, Tensors], None]] = None,
) -> Trajectory:
    """Run ``phi_{k+1} = phi_k - a * grad loss_fn(phi_k)`` for ``steps`` steps from ``params``.

    Each step differentiates the loss once and drops its graph, so memory does not grow with
    ``steps``. ``inspect_first_loss(loss, point)`` sees the first loss while its graph is alive,
    with the leaves it was computed from (the engine uses it to find the other tensors the loss
    depends on).

    Raises:
        ValueError: the loss does not depend on some of the parameters.
        FloatingPointError: the inner loss became NaN or Inf (with the step where it did).
    """
    phi = {n: p.detach() for n, p in params.items()}
    recorded: List[Tensors] = []
    losses: List[float] = []
    with torch.enable_grad():
        for k in range(steps):
            leaves = {n: t.detach().requires_grad_(True) for n, t in phi.items()}
            loss = check_scalar_loss(loss_fn(leaves), "The inner-loss closure")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"The inner loss is {value} at inner step {k} of {steps}: the inner loop diverged "
                    "or the data holds NaN/Inf. Lower the inner learning rate or check the support set."
                )
            if k == 0:
                if not loss.requires_grad:
                    raise ValueError(
                        "The inner loss does not depend on the adapted parameters (it has no autograd "
                        "graph): the closure must compute the loss from the learner it is given."
                    )
                if inspect_first_loss is not None:
                    inspect_first_loss(loss, leaves)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            unused = [n for n, g in zip(leaves, grads) if g is None]
            if unused:
                raise ValueError(
                    f"The inner loss does not depend on the adapted parameter(s) {unused}. Adapt only "
                    "parameters the support loss uses (leave the others out of the inner optimizer)."
                )
            recorded.append(phi)
            losses.append(value)
            with torch.no_grad():
                phi = {n: phi[n] - step_size[n] * g for n, g in zip(leaves, grads)}
    points = {n: torch.stack([p[n] for p in recorded]) for n in phi}
    return Trajectory(points=points, final=phi, losses=losses)
