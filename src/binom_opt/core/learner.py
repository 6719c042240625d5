"""The model at a point of the inner loop: one task's :class:`Learner`, or a meta-batch's :class:`BatchedLearner`.

A learner calls the model with ``torch.func.functional_call``: the adapted parameters come from
``params``, every other parameter and buffer from the model itself, and the module policy of
:mod:`binom_opt.core.norm_layers` applies. :func:`module_loss` turns a user closure on a learner
into the support loss ``loss(phi, task)`` the recorder replays.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .batching import vmap_or_loop
from .norm_layers import check_no_tracking, module_policy

Tensors = Dict[str, torch.Tensor]

__all__ = ["Learner", "BatchedLearner", "module_loss"]


class Learner:
    """The model at a given point of the inner loop, callable like the model.

    Attributes:
        params: the adapted parameters at this point, by name (differentiable with respect to the
            meta-parameters when they come out of an adaptation).
        module: the underlying model.
    """

    def __init__(self, module: nn.Module, params: Tensors, bn: str = "auto"):
        self.module, self.params, self.bn = module, params, bn

    def __call__(self, *args, **kwargs):
        with module_policy(self.bn):
            return functional_call(self.module, self.params, args, kwargs)

    def __repr__(self) -> str:
        return f"Learner({type(self.module).__name__}, adapted={list(self.params)})"


class BatchedLearner:
    """The model adapted to every task of a meta-batch.

    ``learners(x)`` takes inputs with a leading task dimension ``B`` (``x[b]`` for task ``b``) and
    returns outputs with one, each task run with its own adapted parameters (a vmapped
    ``functional_call``; random ops draw independently per task, as a loop over tasks would).
    ``learners[b]`` is task ``b``'s :class:`Learner`.

    Attributes:
        params: the adapted parameters, ``[B, ...]`` per entry, differentiable with respect to the
            meta-parameters.
        module: the underlying model.
    """

    def __init__(self, module: nn.Module, params: Tensors, bn: str = "auto"):
        self.module, self.params, self.bn = module, params, bn

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __getitem__(self, index: int) -> Learner:
        return Learner(self.module, {n: t[index] for n, t in self.params.items()}, self.bn)

    def __call__(self, *args, **kwargs):
        sizes = {a.shape[0] for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        if sizes and sizes != {len(self)}:
            raise ValueError(
                f"The inputs of a batched learner need a leading task dimension of {len(self)} (one slice per task), "
                f"got leading sizes {sorted(sizes)}. To run one task, index the learner: learners[b](x)."
            )

        def one(params, a, kw):
            return functional_call(self.module, params, a, kw)

        with module_policy(self.bn):
            return vmap_or_loop(one, "different")(self.params, args, kwargs)

    def __repr__(self) -> str:
        return f"BatchedLearner({type(self.module).__name__}, tasks={len(self)}, adapted={list(self.params)})"


def module_loss(model: nn.Module, bn: str, batched: bool) -> Callable[[Callable], Callable]:
    """``make_loss`` for a model: ``closure(learner)`` (or ``closure(learner, task)``) as ``loss(phi, task)``.

    ``bn="error"`` refuses a model with normalisation layers that track running statistics now.
    """
    if bn == "error":
        check_no_tracking(model)

    def make(closure: Callable) -> Callable:
        if batched:
            return lambda phi, task: closure(Learner(model, phi, bn), task)
        return lambda phi, task: closure(Learner(model, phi, bn))

    return make
