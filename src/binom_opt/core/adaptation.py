"""The autograd node whose backward is the estimator, and ``meta_backward``, the all-or-nothing ``loss.backward()``.

:class:`Adaptation` maps the initial point (and the other meta-parameters) to the adapted point; its backward asks
the record of the inner loop (:class:`~binom_opt.core.node.Record`) for the meta-gradient.
"""

from __future__ import annotations

import functools
import warnings
from typing import AbstractSet, Any, List, Optional, Protocol, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from .checks import all_finite

__all__ = ["Adaptation", "meta_backward", "check_scalar_loss", "sum_present", "depends_on_adaptation", "leaves_requiring_grad"]


class MetaGradient(Protocol):
    """What the node needs of a recorded inner loop (:class:`~binom_opt.core.node.Record`)."""

    trajectory: Any  # its ``final`` point, and ``final_task`` (one task without the task axis)
    setup: Any  # its ``copied`` flag
    meta_inputs: list
    hyper_inputs: list
    status: Any  # its ``finished`` flag

    def backward(self, g: dict) -> tuple: ...


class Adaptation(torch.autograd.Function):
    """Node ``(phi_0 [B, ...], other meta-parameters) -> phi_K [B, ...]`` whose backward is the estimator; one task
    without data (``trajectory.final_task``): ``phi_0 -> phi_K`` without the task axis, which its backward adds."""

    @staticmethod
    def forward(ctx, record: MetaGradient, *inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.record = record
        # Aliases, not the record's own tensors: an output refers to this node, and the node must
        # not refer back to its outputs (a reference cycle through autograd is never collected).
        final = record.trajectory.final_task
        return tuple(t.detach() for t in (record.trajectory.final if final is None else final).values())

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Optional[torch.Tensor]):  # pyright: ignore[reportIncompatibleMethodOverride]  # as once_differentiable wraps it
        record: MetaGradient = ctx.record
        one = record.trajectory.final_task is not None
        final = record.trajectory.final_task if one else record.trajectory.final  # its names and shapes
        copies = (None,) * len(final) if record.setup.copied else None  # the initial point is a copy: no meta-gradient
        if copies is not None and not record.meta_inputs and not record.hyper_inputs:
            warnings.warn(_NOTHING_META_LEARNED, UserWarning, stacklevel=2)
            record.status.finished = True
            return (None, *copies)
        given = [torch.zeros_like(t) if go is None else go for t, go in zip(final.values(), grad_outputs)]
        g = dict(zip(final, [t.unsqueeze(0) for t in given] if one else given))
        meta_grad, meta_input_grads, hyper_grads = record.backward(g)
        initial = (t.squeeze(0) for t in meta_grad.values()) if one else meta_grad.values()
        return (None, *(copies or initial), *meta_input_grads, *hyper_grads)


_NOTHING_META_LEARNED = (
    "A backward went through an innerloop_ctx block with copy_initial_weights=True, and nothing receives a "
    "meta-gradient: the model's initial weights are copied when the block starts (as higher copies them), and the "
    "inner loop uses no other tensor that requires grad. To meta-learn the model's initialisation (MAML), pass "
    "copy_initial_weights=False."
)


class _Accumulation:
    """Gradients computed by :func:`meta_backward`, added into ``.grad`` when called."""

    def __init__(self, leaves: List[torch.Tensor], grads):
        self.leaves, self.grads = leaves, grads

    @property
    def finite(self) -> bool:  # read only when asked (nan_policy="skip_task"): each read is a host sync
        return all_finite(self.grads)

    def __call__(self) -> None:
        with torch.no_grad():
            for leaf, g in zip(self.leaves, self.grads):
                if g is not None:
                    leaf.grad = g.clone() if leaf.grad is None else leaf.grad.add_(g)


def meta_backward(loss: torch.Tensor, accumulate: bool = True) -> Optional[_Accumulation]:
    """``loss.backward()``, all or nothing: the gradients of every leaf are computed first and added into
    ``.grad`` only when the whole meta-gradient succeeded (with ``loss.backward()`` a tensor the loss reaches
    without going through an adaptation may already have its ``.grad`` when the meta-gradient fails).

    ``accumulate=False`` returns the computed gradients (``None`` for a non-finite loss) to add later.

    Example:
        >>> import torch, torch.nn.functional as F, binom_opt as bo
        >>> maml = bo.MAML(torch.nn.Linear(4, 3), lr=0.1)
        >>> x, y = torch.randn(6, 4), torch.arange(6) % 3
        >>> learner = maml.clone()
        >>> learner.adapt(lambda m: F.cross_entropy(m(x), y))
        >>> bo.meta_backward(F.cross_entropy(learner(x), y))
        >>> maml.module.weight.grad.shape
        torch.Size([3, 4])
    """
    loss = check_scalar_loss(loss, "meta_backward")
    if not loss.requires_grad:
        raise ValueError(
            "meta_backward got a loss with no autograd graph: compute it from an adapted learner, outside torch.no_grad()."
        )
    if not depends_on_adaptation(loss):
        raise ValueError(
            "meta_backward got a loss that does not depend on an adapted learner (no adaptation in its graph): compute the "
            "query loss from the learner an adaptation returned, e.g. F.cross_entropy(learner(x_query), y_query), not "
            "from the model itself."
        )
    leaves = leaves_requiring_grad(loss)
    if not accumulate and not bool(torch.isfinite(loss.detach())):
        return None
    done = _Accumulation(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))
    if not accumulate:
        return done
    done()
    return None


def check_scalar_loss(loss: object, what: str) -> torch.Tensor:
    """Raise a clear error unless ``loss`` is a real floating-point scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must return a scalar torch.Tensor, got {type(loss).__name__}.")
    if loss.dim() != 0:
        raise ValueError(
            f"{what} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}. Reduce it, e.g. with .mean() or .sum()."
        )
    if not loss.is_floating_point():
        raise TypeError(f"{what} must return a floating-point loss, got dtype {loss.dtype}.")
    return loss


def sum_present(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The sum of the tensors that are not ``None`` (``None`` if all are)."""
    present = [t for t in tensors if t is not None]
    return None if not present else functools.reduce(torch.add, present)


def depends_on_adaptation(loss: torch.Tensor) -> bool:
    """Whether the autograd graph of ``loss`` contains an :class:`Adaptation` node (a learner's parameters)."""
    return any(isinstance(node, Adaptation._backward_cls) for node in _nodes(loss))


def leaves_requiring_grad(loss: torch.Tensor, exclude: AbstractSet[int] = frozenset()) -> List[torch.Tensor]:
    """The leaf tensors requiring grad that ``loss`` depends on, except those in ``exclude`` (ids). (A walk of its own,
    not of :func:`_nodes`: a closure's first call takes it, at every adaptation.)"""
    found, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:  # a leaf's AccumulateGrad, where the walk ends
            if id(variable) not in exclude:
                found.append(variable)
            continue
        stack += [next_node for next_node, _ in node.next_functions]
    return found


def _nodes(loss: torch.Tensor):
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)
