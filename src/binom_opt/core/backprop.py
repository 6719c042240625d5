"""``torch.autograd.grad`` for the calls a meta-gradient makes by the hundred: an inner step's gradient, a kept
graph's Hessian-vector product.

On a small adapted part, ``torch.autograd.grad``'s Python checks of its arguments (``_make_grads``: shapes, dtypes,
scalar outputs) cost a fifth of an HVP's time. Here the arguments are binom_opt's own, built to match, so plain
tensors go straight to the engine call that ``torch.autograd.grad`` ends in (the same call: the same bits); tensor
subclasses (``__torch_function__``) and anything unexpected take ``torch.autograd.grad`` itself.

Example:
    >>> import torch
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> (g,) = grad([(w ** 3).sum()], [w], create_graph=True)   # 3 w^2, with its graph
    >>> grad([g], [w], [torch.ones(2)])                         # d/dw <3 w^2, 1> = 6 w
    (tensor([ 6., 12.]),)
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch.autograd.graph import _engine_run_backward

__all__ = ["grad"]


def grad(outputs: Iterable[torch.Tensor], inputs: Iterable[torch.Tensor], grad_outputs: Optional[Iterable[torch.Tensor]] = None,
         *, create_graph: bool = False, retain_graph: Optional[bool] = None) -> Tuple[Optional[torch.Tensor], ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True, ...)``: ``None`` for an input that no
    output reaches. ``grad_outputs`` (``None``: each output is a scalar, seeded with one) must match ``outputs``."""
    outputs, inputs = tuple(outputs), tuple(inputs)
    retain = create_graph if retain_graph is None else retain_graph
    seeds = tuple(torch.ones_like(t) for t in outputs) if grad_outputs is None else tuple(grad_outputs)
    if not all(type(t) is torch.Tensor for t in (*outputs, *inputs, *seeds)) or len(seeds) != len(outputs):
        return torch.autograd.grad(outputs, inputs, seeds, retain_graph=retain, create_graph=create_graph, allow_unused=True)
    return _engine_run_backward(outputs, seeds, retain, create_graph, inputs, True, accumulate_grad=False)
