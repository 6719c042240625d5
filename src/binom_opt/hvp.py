"""Hessian-vector product backends: batched HVPs at many trajectory points in one call.

Two ways to differentiate twice with ``torch.func``:

* ``"rev"``: reverse-over-reverse, ``vjp`` of ``grad``. Works through every loss we know of.
* ``"fwd"``: forward-over-reverse, ``jvp`` of ``grad``. Often leaner in memory, but forward-mode
  AD is missing or broken for some operators (in torch 2.13, ``F.mse_loss`` fails with
  "ZeroTensors are immutable").

``"auto"`` is ``"rev"``: it never hits those forward-mode gaps, and it measured ~25% faster
than ``"fwd"`` for Conv4 on an H100.

An oracle made here answers ``oracle(range_of_steps, stacked_vectors)`` with the stacked
``H_j v_j``, vmapping one HVP over the requested trajectory points (``chunk_size`` bounds how
many run at once).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch.func import grad, jvp, vjp, vmap

Tensors = Dict[str, torch.Tensor]
LossFn = Callable[[Tensors], torch.Tensor]

__all__ = ["HVP_MODES", "HVPBackendError", "resolve_hvp_mode", "hvp_function", "trajectory_hvp_oracle"]

HVP_MODES = ("auto", "rev", "fwd")


class HVPBackendError(RuntimeError):
    """An HVP backend failed inside PyTorch for a reason that another backend avoids."""


def resolve_hvp_mode(mode: str) -> str:
    """Validate an ``hvp=`` argument and return the concrete backend (``"rev"`` or ``"fwd"``)."""
    if mode not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {mode!r}.")
    return "rev" if mode == "auto" else mode


def hvp_function(loss_fn: LossFn, mode: str) -> Callable[[Tensors, Tensors], Tensors]:
    """Return ``hvp(point, vector) -> H(point) @ vector`` for the scalar ``loss_fn`` of a dict.

    Example:
        >>> import torch
        >>> from binom_opt.hvp import hvp_function
        >>> f = lambda p: (p["w"] ** 3).sum()           # Hessian diag(6 w)
        >>> hvp = hvp_function(f, "rev")
        >>> hvp({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])})["w"]
        tensor([ 6., 12.])
    """
    mode = resolve_hvp_mode(mode)
    gradient = grad(loss_fn)
    if mode == "rev":

        def hvp(point: Tensors, vector: Tensors) -> Tensors:
            return vjp(gradient, point)[1](vector)[0]

    else:

        def hvp(point: Tensors, vector: Tensors) -> Tensors:
            return jvp(gradient, (point,), (vector,))[1]

    return hvp


def trajectory_hvp_oracle(
    loss_fn: LossFn,
    points: Tensors,
    mode: str = "auto",
    chunk_size: Optional[int] = None,
    randomness: str = "error",
):
    """An oracle for :func:`binom_opt.expansion.expand` over recorded trajectory points.

    Args:
        loss_fn: the inner (support) loss as a pure function of a dict of parameters.
        points: the trajectory, each entry stacked along a leading step dimension.
        mode: HVP backend, see the module docstring.
        chunk_size: passed to ``torch.func.vmap``; ``None`` computes a round's HVPs at once.
        randomness: passed to ``torch.func.vmap`` (``"error"``, ``"same"`` or ``"different"``).
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}.")
    mode = resolve_hvp_mode(mode)
    single = hvp_function(loss_fn, mode)
    batched = vmap(single, chunk_size=chunk_size, randomness=randomness)

    def oracle(steps: range, vectors: Tensors) -> Tensors:
        at = {n: t[steps.start : steps.stop] for n, t in points.items()}
        try:
            if len(steps) == 1:  # a single HVP needs no vmap
                one = single({n: t[0] for n, t in at.items()}, {n: t[0] for n, t in vectors.items()})
                return {n: t.unsqueeze(0) for n, t in one.items()}
            return batched(at, vectors)
        except RuntimeError as error:
            if mode == "fwd" and "ZeroTensors are immutable" in str(error):
                raise HVPBackendError(
                    "The forward-over-reverse HVP (hvp='fwd') failed inside PyTorch: forward-mode AD "
                    "is broken for an operator in your loss (known for F.mse_loss in torch 2.13). "
                    "Use hvp='rev' or hvp='auto'."
                ) from error
            raise

    return oracle
