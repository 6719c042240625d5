"""Per-task reductions of many tensors in few operator calls: the norms and finiteness flags a meta-gradient reads.

Every tensor has the task dimension first (``[B, ...]``). For one task (``B = 1``: the per-task path, whose small
steps are host-bound) one ``torch._foreach_norm`` reduces every tensor in one call; for a meta-batch each tensor is
reduced along its task rows. A value is not finite where ``x * 0 != 0`` (NaN for NaN and for infinities): two
operators where ``torch.isfinite`` dispatches four. The largest magnitude (``ord=inf``) flags a NaN or an infinity
anywhere in a slice and never overflows, as a sum of large finite values can.

Example:
    >>> import torch
    >>> tensors = [torch.tensor([[3.0, 4.0]]), torch.tensor([[float("nan")]])]
    >>> norms(tensors)
    tensor([[5.],
            [nan]], dtype=torch.float64)
    >>> not_finite(norms(tensors, INF)).squeeze(1).tolist()
    [False, True]
"""

from __future__ import annotations

from typing import Dict, Iterable

import torch

__all__ = ["INF", "norms", "not_finite", "nonfinite_tasks", "task_norms"]

INF = float("inf")


def norms(tensors: Iterable[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """``[len(tensors), B]``: the ``ord``-norm of each task's slice of each tensor, in float64."""
    tensors = list(tensors)
    with torch.no_grad():
        if all(t.shape[0] == 1 for t in tensors):
            try:  # one call for every tensor (grouped by device and dtype inside)
                return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float64)).unsqueeze(1)  # pyright: ignore[reportPrivateImportUsage]  # as clip_grad_norm_
            except RuntimeError:  # a backend without the foreach kernel for these tensors: one call each
                pass
        return torch.stack([torch.linalg.vector_norm(t.flatten(1), ord, dim=1, dtype=torch.float64) for t in tensors])


def not_finite(x: torch.Tensor) -> torch.Tensor:
    """Where ``x`` holds NaN or an infinity (``x * 0`` is NaN there, zero elsewhere)."""
    return (x * 0) != 0


def nonfinite_tasks(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]``: whether each task's slice of any entry holds a NaN or an infinity, on the device."""
    return not_finite(norms(tensors.values(), INF)).any(0)


def task_norms(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]``: the norm of each task's slice over all entries, in float64, on the device."""
    return torch.linalg.vector_norm(norms(tensors.values()), dim=0)
