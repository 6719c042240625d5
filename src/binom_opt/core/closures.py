"""What the inner loop reads from a support-loss closure: which support loss it is, the shapes of the data it
captures, and the tensors it captures that carry a graph of their own, cut off where the closure reads them.

A closure that captures data computed from meta-parameters (ANIL's features, made by the body before the head
adapts) reaches the whole graph that computed them. Every inner-step gradient and every HVP would walk that graph
(autograd visits every node its outputs reach, whatever it differentiates), and the other meta-parameters found
would be the body's weights, one backward through the body per meta-gradient. :func:`cut_captured` gives the
closure a leaf in place of each such tensor instead: the steps and products stop there, the meta-gradient of the
leaf is that of the tensor, and the rest of the backward takes it through the body with the query's gradient.

Example:
    >>> import torch
    >>> w = torch.ones(3, requires_grad=True)
    >>> features = 2 * w                                   # a graph back to w
    >>> closure = lambda m, f=features: (m * f).sum()
    >>> cut, origins = cut_captured(closure)
    >>> (leaf,) = cut.__defaults__
    >>> leaf.grad_fn is None and leaf.requires_grad, origins[id(leaf)] is features
    (True, True)
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Dict, Tuple

import torch
from torch.utils import _pytree as pytree

__all__ = ["closure_key", "captured_shapes", "tensor_shapes", "cut_captured"]


def closure_key(closure: Callable) -> tuple:
    """What makes two closures the same support loss: the same code over the same captured objects and defaults.

    ``lambda m: loss(m(x_s), y_s)`` written inside the inner loop is a new function object at every step,
    but the same function of the learner; recognising it records one support loss, probes it once and
    replays it once.
    """
    code = getattr(closure, "__code__", None)
    if code is None:
        return (id(closure),)
    try:  # (list comprehensions, not generators: read at every inner step)
        cells = tuple([id(cell.cell_contents) for cell in closure.__closure__ or ()])
    except ValueError:  # a captured variable not assigned yet
        return (id(closure),)
    defaults, kwdefaults = getattr(closure, "__defaults__", None), getattr(closure, "__kwdefaults__", None)
    given = tuple([id(v) for v in (*(defaults or ()), *(kwdefaults or {}).values())]) if defaults or kwdefaults else ()
    return (code, cells, given, id(getattr(closure, "__self__", None)))


def captured_shapes(closure: Callable) -> tuple:
    """The shapes, dtypes and devices of the tensors a closure captures (its cells and defaults, in tuples, lists and
    dicts too): with its code, what fixes the activations of its support loss (the data it reads)."""
    captured = []
    for cell in getattr(closure, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # a captured variable not assigned yet
            captured.append(cell.cell_contents)
    captured += [*(getattr(closure, "__defaults__", None) or ()), *(getattr(closure, "__kwdefaults__", None) or {}).values()]
    return tensor_shapes(captured)


def tensor_shapes(tree) -> tuple:
    """The shape, dtype and device of each tensor of the pytree ``tree``; a list, tuple or dict of tensors only (a
    closure over a task's data, a point by name: read at every adaptation) is read without a pytree walk.

    >>> tensor_shapes({"w": torch.ones(2, 3)})
    (((2, 3), torch.float32, device(type='cpu')),)
    """
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else None
    leaves = values if values is not None and all(isinstance(t, torch.Tensor) for t in values) else pytree.tree_leaves(tree)
    return tuple((tuple(t.shape), t.dtype, t.device) for t in leaves if isinstance(t, torch.Tensor))


def cut_captured(closure: Callable) -> Tuple[Callable, Dict[int, torch.Tensor]]:
    """``closure`` reading a leaf (``detach().requires_grad_()``: the same values and storage) wherever it captures a
    tensor with a graph (a cell, a default or a keyword default holding it, not a container), and
    ``{id(leaf): tensor}``. Its other cells stay the enclosing scope's. Anything else (no such tensor, a method, a
    ``functools.partial``) comes back as it is."""
    if type(closure) is not types.FunctionType:
        return closure, {}
    origins: Dict[int, torch.Tensor] = {}

    def cut(value):
        if isinstance(value, torch.Tensor) and value.requires_grad and value.grad_fn is not None:
            leaf = value.detach().requires_grad_(True)
            origins[id(leaf)] = value
            return leaf
        return value

    def cut_cell(cell):  # a new cell only where a tensor is cut: the others stay shared with the enclosing scope
        try:
            value = cell.cell_contents
        except ValueError:  # a captured variable not assigned yet: read as it is, when it is
            return cell
        new = cut(value)
        return cell if new is value else types.CellType(new)

    cells = tuple(cut_cell(cell) for cell in closure.__closure__ or ())
    defaults = tuple(cut(v) for v in closure.__defaults__ or ())
    kwdefaults = {k: cut(v) for k, v in (closure.__kwdefaults__ or {}).items()}
    if not origins:
        return closure, {}
    new = types.FunctionType(closure.__code__, closure.__globals__, closure.__name__, defaults or None, cells or None)
    new.__kwdefaults__ = kwdefaults or None
    new.__dict__.update(closure.__dict__)
    return new, origins
