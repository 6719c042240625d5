"""An inner step's gradient for ``B`` tasks, and the update rules that take the step: what records the inner loop
and what recomputes its steps later (:class:`~binom_opt.core.trajectory.Trajectory`) share it.

One task at a time, the gradient is plain autograd (faster than torch.func's ``grad`` on a small model): a closure's
first call is probed (checkpointing refused, the other tensors requiring grad found), a kept step keeps its
gradient's graph (:class:`~binom_opt.core.trajectory.Graph`) and, at a plain-SGD rate, the update is taken with the
gradient, on one task's tensors without the task axis.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch.func import grad_and_value

from . import backprop
from .adaptation import check_scalar_loss, leaves_requiring_grad
from .batching import Tasks, compiled, over_tasks, refuse_random_ops, stack
from .calls import calls
from .context import StepContext
from .options import Options
from .trajectory import Graph
from .update_rules import Hyper, UpdateRule, plain_sgd_step

Tensors = Dict[str, torch.Tensor]
LossFn = Callable[[Tensors, object], torch.Tensor]

__all__ = ["Stepper", "Taken"]


@dataclass
class Stepper:
    """Takes inner steps for ``B`` tasks: the gradient of a support loss, and the update rules.

    It holds no reference to the recorder, so the trajectory can keep it to recompute gradients
    and checkpointed segments.
    """

    rules: Dict[str, UpdateRule]
    tasks: Tasks
    options: Options
    allow_unused: bool = False
    hyper: List[Dict[str, Hyper]] = field(default_factory=list)  # each step's hyperparameters, detached
    contexts: List[StepContext] = field(default_factory=list)  # the context each step ran in
    rates: List[Optional[float]] = field(default_factory=list)  # each step's one float SGD rate (plain_sgd_rate), if any

    def plain(self, probe: bool = False) -> bool:
        """Whether a step's gradient is taken with plain autograd, one task at a time (one task, or a loop over tasks,
        in eager mode; and a closure's first call, probed on its first task): faster than torch.func's grad there."""
        return probe or (not self.options.compile_hvps and (self.tasks.loop or not self.tasks.batched))

    def gradient(self, loss_fn: LossFn, phi: Tensors, step: int, probe: bool = False, allow_unused: Optional[bool] = None,
                 context: Optional[StepContext] = None, keep: Optional[list] = None, one: bool = False, chain: bool = False,
                 rate: Optional[float] = None, link: bool = False, hooks: bool = True) -> Taken:
        """The gradients ``[B, ...]`` and losses ``[B]`` at ``phi`` (:class:`Taken`), in ``context`` (the step's own,
        to recompute it; ``None`` in the inner loop: the caller's); ``probe`` validates the closure with plain autograd
        on the first task and walks its graph for meta-parameters.

        One task (``one``, on the :meth:`plain` path, which the caller found): ``phi`` is its point without the task
        axis (``chain``: the previous kept step's update with its graph, ``Graph.out``, whose tensors are the leaves);
        ``keep``: a list that receives the step's :class:`~binom_opt.core.trajectory.Graph`, its leaves and its
        gradient with the graph that computed it; ``rate``: the step's plain-SGD rate, its update ``phi - rate * grad``
        taken where the gradient is and returned instead of it (every parameter with a gradient; the same
        :func:`~binom_opt.core.update_rules.plain_sgd_step` as :meth:`update`), with its graph where ``link``
        (``Graph.link``, kept; the next step may chain to it); ``hooks=False``: without the module hooks, where the
        probe found that the closure needs none (:attr:`Taken.special`, :func:`~binom_opt.core.norm_layers.needs_hooks`)."""
        unused = self.allow_unused if allow_unused is None else allow_unused
        tasks = self.tasks
        plain = one or self.plain(probe)
        if plain and not tasks.batched:  # one task without data: its point without the task axis, its gradient [1, ...]
            call = calls(self.options, context, f"inner step {step}", _CLOSURE_HINT, hooks=hooks)
            with call:
                taken = _plain_gradient(loss_fn, phi if one else {n: t.squeeze(0) for n, t in phi.items()}, None, step,
                                        unused, probe, keep, unsqueeze=True, chain=chain, rate=rate, link=link)
            return taken._replace(special=call.policy.special) if call.policy is not None and probe else taken
        found: List[torch.Tensor] = []
        if plain:
            outs = []
            with calls(self.options, context, f"inner step {step}", _CLOSURE_HINT):
                for b in range(tasks.size if tasks.loop else 1):
                    at = {n: t[b] for n, t in phi.items()} if tasks.size > 1 else {n: t.squeeze(0) for n, t in phi.items()}
                    outs.append(_plain_gradient(loss_fn, at, tasks.task(b), step, unused, probe and b == 0))
                # after the probe's clearer errors; once per meta-batch (its first task), even split task by task
                if probe and tasks.loop and tasks.offset == 0 and self.options.randomness in ("error", "replay"):
                    refuse_random_ops(loss_fn, (phi,), tasks)
            found = outs[0].found
            if len(outs) == tasks.size:
                return Taken({n: stack([o.grads[n] for o in outs]) for n in phi}, stack([o.losses for o in outs]), found)
        with torch.no_grad(), calls(self.options, context, f"inner step {step}", _CLOSURE_HINT):
            step_fn = over_tasks(grad_and_value(loss_fn), self.tasks, self.options.randomness)
            grads, losses = compiled(step_fn, self.options.compile_hvps)(phi)
        return Taken(grads, losses, found)

    def update(self, k: int, phi: Tensors, state: Dict[str, Tensors], grads: Tensors) -> Tuple[Tensors, Dict[str, Tensors]]:
        lr = self.rates[k]
        if lr is not None:  # plain SGD with one float rate: every parameter in one call
            with torch.no_grad():
                return dict(zip(phi, plain_sgd_step(list(phi.values()), [grads[n] for n in phi], lr))), {}
        with torch.no_grad():
            new = {n: rule.update(k, phi[n], state.get(n, {}), grads[n], self.hyper[k][n]) for n, rule in self.rules.items()}
        return {n: v[0] for n, v in new.items()}, {n: v[1] for n, v in new.items()}


_CLOSURE_HINT = "Check that the data, the model and the adapted parameters share one dtype and one device."


class Taken(NamedTuple):
    """A step's gradients (none where its ``update`` is returned instead, one task's tensors), losses and the other
    tensors requiring grad found by the probe, and whether a module with buffers, a normalisation layer or a sparse
    embedding ran in it (``special``: what the probe of one task's step tells; else ``True``)."""

    grads: Tensors
    losses: torch.Tensor
    found: List[torch.Tensor]
    update: Optional[List[torch.Tensor]] = None
    special: bool = True


def _plain_gradient(loss_fn: LossFn, phi: Tensors, task, step: int, allow_unused: bool, probe: bool, keep: Optional[list] = None,
                    unsqueeze: bool = False, chain: bool = False, rate: Optional[float] = None, link: bool = False) -> Taken:
    """One task at ``phi`` with plain autograd (``unsqueeze``: each gradient and the loss ``[1, ...]``, else the loss
    0-d; ``chain``, ``rate`` and ``link`` as in :meth:`Stepper.gradient`)."""
    if probe:  # a closure's first call is watched for activation checkpointing; later calls of it run plainly
        return _probed_gradient(loss_fn, phi, task, allow_unused, keep, unsqueeze, rate, link)
    with torch.enable_grad():
        leaves = list(phi.values()) if chain else _leaves(phi)
        loss = check_scalar_loss(loss_fn(dict(zip(phi, leaves)), task), "The support-loss closure")
        if not loss.requires_grad:
            raise ValueError(_NO_DEPENDENCE)
        grads = backprop.grad([loss], leaves, create_graph=keep is not None)
    return _taken(phi, leaves, grads, loss, allow_unused, keep, unsqueeze, [], chain, rate, link)


def _leaves(phi: Tensors) -> List[torch.Tensor]:
    """Leaves to differentiate at ``phi``: its tensors themselves where they require no grad (views made for this call,
    or an update only a :class:`~binom_opt.core.trajectory.Stored` point holds, which detaches what it gives), else
    detached."""
    return [(t.detach() if t.requires_grad else t).requires_grad_(True) for t in phi.values()]


def _probed_gradient(loss_fn: LossFn, phi: Tensors, task, allow_unused: bool, keep: Optional[list], unsqueeze: bool,
                     rate: Optional[float] = None, link: bool = False) -> Taken:
    """A closure's first call: checkpointing refused (saved-tensor hooks off, its warning caught), and the other
    tensors requiring grad that the loss reaches found (never chained: the walk would go down the chain)."""
    with torch.enable_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        leaves = _leaves(phi)
        with _NoSavedTensorsHooks():
            loss = check_scalar_loss(loss_fn(dict(zip(phi, leaves)), task), "The support-loss closure")
        if any("None of the inputs have requires_grad=True" in str(w.message) for w in caught):
            raise RuntimeError(_CHECKPOINT)  # reentrant checkpointing hides the parameters from the gradient
        if not loss.requires_grad:
            raise ValueError(_NO_DEPENDENCE)
        found = leaves_requiring_grad(loss, exclude={id(t) for t in leaves})
        try:
            grads = backprop.grad([loss], leaves, create_graph=keep is not None)
        except RuntimeError as error:
            raise (RuntimeError(_CHECKPOINT) if "use_reentrant=True" in str(error) else error) from error
    for w in caught:  # the closure's own warnings, as they would have been shown
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return _taken(phi, leaves, grads, loss, allow_unused, keep, unsqueeze, found, rate=rate, link=link)


_AUTOGRAD = torch._C._autograd  # pyright: ignore[reportAttributeAccessIssue]  # the switches of saved-tensor hooks torch.autograd.graph sets


class _NoSavedTensorsHooks:
    """``torch.autograd.graph.disable_saved_tensors_hooks(_CHECKPOINT)`` without its generator (entered at every task's
    first step): a closure that installs saved-tensor hooks (activation checkpointing) raises ``_CHECKPOINT``."""

    def __enter__(self) -> None:
        self.before = _AUTOGRAD._saved_tensors_hooks_get_disabled_error_message()
        _AUTOGRAD._saved_tensors_hooks_disable(_CHECKPOINT)

    def __exit__(self, *exc) -> None:
        if self.before is None:
            _AUTOGRAD._saved_tensors_hooks_enable()
        else:
            _AUTOGRAD._saved_tensors_hooks_disable(self.before)


def _taken(phi: Tensors, leaves: List[torch.Tensor], grads, loss, allow_unused: bool, keep: Optional[list],
           unsqueeze: bool, found: List[torch.Tensor], chained: bool = False, rate: Optional[float] = None,
           link: bool = False) -> Taken:
    """The gradients by name (zero where the loss does not reach a parameter, if allowed), or the update at ``rate``
    (linked, :meth:`Stepper.gradient`) where every parameter has one; ``keep`` receives the step's
    :class:`~binom_opt.core.trajectory.Graph` (``chained``: its leaves are the previous step's update)."""
    unused = [n for n, g in zip(phi, grads) if g is None]
    if unused:
        if len(unused) == len(leaves):
            raise ValueError(_NO_DEPENDENCE)
        if not allow_unused:
            raise ValueError(
                f"The support loss does not depend on the adapted parameter(s) {unused}. Adapt only parameters the "
                "support loss uses (leave the others out of the inner optimizer; bo.MAML: allow_unused=True)."
            )
    graph = None
    if keep is not None:
        graph = Graph(list(phi), leaves, list(grads), chained)
        keep.append(graph)
    losses = loss.detach().unsqueeze(0) if unsqueeze else loss.detach()
    if rate is not None and not unused:
        if link and graph is not None:
            graph.link(rate)
            return Taken({}, losses, found, graph.out)
        with torch.no_grad():
            return Taken({}, losses, found, plain_sgd_step(leaves, grads, rate))
    if graph is not None:
        grads = [None if g is None else g.detach() for g in grads]
    if unsqueeze:
        return Taken({n: stack([torch.zeros_like(t) if g is None else g]) for n, t, g in zip(phi, leaves, grads)}, losses, found)
    return Taken({n: torch.zeros_like(t) if g is None else g for n, t, g in zip(phi, leaves, grads)}, losses, found)


_CHECKPOINT = (
    "The support loss runs torch.utils.checkpoint (or other saved-tensor hooks): torch.func, which takes binom_opt's "
    "Hessian-vector products, cannot differentiate through it, and its reentrant form hides the parameters from "
    "torch.autograd.grad. Remove activation checkpointing from the support loss: binom_opt keeps no graph between "
    "inner steps, and memory_budget bounds what one round of HVPs holds."
)
_NO_DEPENDENCE = (
    "The support loss does not depend on the adapted parameters: the closure must compute it from the learner it "
    "is given, e.g. lambda m: F.cross_entropy(m(x), y), not from a loss computed beforehand or from the model itself."
)
