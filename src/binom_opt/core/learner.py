"""The model at a point of the inner loop: one task's :class:`Learner`, or a meta-batch's :class:`BatchedLearner`.

Learners call the model with ``torch.func.functional_call`` under the module policy of
:mod:`binom_opt.core.norm_layers`; :func:`module_loss` turns a closure on a learner into ``loss(phi, task)``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .batching import autograd_through_vmap, per_task
from .norm_layers import check_no_tracking, module_policy

Tensors = Dict[str, torch.Tensor]

__all__ = ["Learner", "BatchedLearner", "module_loss", "adapted_module"]


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
    ``functional_call``, or with ``loop`` one call per task, as the tasks were adapted; random ops
    draw independently per task, as a loop over tasks would).
    ``learners[b]`` is task ``b``'s :class:`Learner`.

    Attributes:
        params: the adapted parameters, ``[B, ...]`` per entry, differentiable with respect to the
            meta-parameters.
        module: the underlying model.
    """

    def __init__(self, module: nn.Module, params: Tensors, bn: str = "auto", loop: bool = False):
        self.module, self.params, self.bn, self.loop = module, params, bn, loop

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

        with module_policy(self.bn), autograd_through_vmap():
            return per_task(one, self.loop, self.bn)(self.params, args, kwargs)

    def __repr__(self) -> str:
        return f"BatchedLearner({type(self.module).__name__}, tasks={len(self)}, adapted={list(self.params)})"


def module_loss(model: nn.Module, bn: str, batched: bool) -> Callable[[Callable], Callable]:
    """``make_loss`` for a model: ``closure(learner)`` (or ``closure(learner, task)``) as ``loss(phi, task)``.

    Each loss runs the model in the train/eval modes its modules had when the inner step took it, so a
    replay after ``model.eval()`` still differentiates the loss of the inner loop. ``bn="error"`` refuses
    a model with normalisation layers that track running statistics now.
    """
    if bn == "error":
        check_no_tracking(model)

    def make(closure: Callable) -> Callable:
        modes = [m.training for m in model.modules()]

        def loss(phi: Tensors, task) -> torch.Tensor:
            with _modes(model, modes):
                return closure(Learner(model, phi, bn), task) if batched else closure(Learner(model, phi, bn))

        return loss

    return make


@contextlib.contextmanager
def _modes(model: nn.Module, modes: List[bool]) -> Iterator[None]:
    now = [m.training for m in model.modules()]
    if now == modes:  # the usual case: nothing to set, nothing for torch.compile to trace
        yield
        return
    try:
        for module, mode in zip(model.modules(), modes):
            module.training = mode
        yield
    finally:
        for module, mode in zip(model.modules(), now):
            module.training = mode


def adapted_module(model: nn.Module, params: Tensors) -> nn.Module:
    """A shallow copy of ``model`` whose parameters named in ``params`` are those tensors (learn2learn's
    cloned module): every submodule and method of it runs with the adapted parameters, buffers are shared.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> adapted_module(net, {"0.bias": torch.ones(2)})[0].bias
    tensor([1., 1.])
    """
    by_id = {id(p): params[n] for n, p in model.named_parameters() if n in params}

    def copy(module: nn.Module, prefix: str) -> nn.Module:
        clone = module.__new__(type(module))
        clone.__dict__ = module.__dict__.copy()
        clone._parameters = {n: by_id.get(id(p), p) if p is not None else None for n, p in module._parameters.items()}  # pyright: ignore[reportAttributeAccessIssue]  # adapted tensors in place of Parameters
        clone._modules = {n: None if m is None else copy(m, f"{prefix}{n}.") for n, m in module._modules.items()}
        return clone

    return copy(model, "")
