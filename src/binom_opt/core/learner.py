"""The model at a point of the inner loop: one task's :class:`Learner`, or a meta-batch's :class:`BatchedLearner`.

Learners call the model with its parameters swapped for the adapted ones (:func:`call_with`, what
``torch.func.functional_call`` does, with the parameters' places found once per model) under the module policy of
:mod:`binom_opt.core.norm_layers`; :func:`module_loss` turns a closure on a learner into ``loss(phi, task)``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .batching import autograd_through_vmap, per_task
from .norm_layers import check_no_tracking, module_policy, needs_hooks, special

Tensors = Dict[str, torch.Tensor]

__all__ = ["Learner", "BatchedLearner", "AdaptedModule", "named_parameters", "call_with", "module_loss", "adapted_module"]


class Learner:
    """The model at a given point of the inner loop, callable like the model.

    Attributes:
        params: the adapted parameters at this point, by name (differentiable with respect to the
            meta-parameters when they come out of an adaptation).
        module: the underlying model.
    """

    def __init__(self, module: nn.Module, params: Tensors, bn: str = "auto", modes: Optional[Sequence[bool]] = None,
                 hooks: bool = True, modules: Optional[Sequence[nn.Module]] = None):
        """``modes``: the train/eval mode of each of ``modules`` (by default the model's ``modules()``, found at each
        call) during a call."""
        self.module, self.params, self.bn, self.modes, self.hooks = module, params, bn, modes, hooks
        self._modules = module if modules is None else modules

    def __call__(self, *args, **kwargs):
        with module_policy(self.bn, self.hooks), _modes(self._modules, self.modes):
            return call_with(self.module, self.params, args, kwargs)

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
        leaves, spec = pytree.tree_flatten((args, kwargs))
        batched = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]  # the others (flags) go to every task
        sizes = {leaves[i].shape[0] for i in batched}
        if sizes and sizes != {len(self)}:
            raise ValueError(
                f"The inputs of a batched learner need a leading task dimension of {len(self)} (one slice per task), "
                f"got leading sizes {sorted(sizes)}. To run one task, index the learner: learners[b](x)."
            )

        def one(params, tensors):
            given = list(leaves)
            for i, t in zip(batched, tensors):
                given[i] = t
            a, kw = pytree.tree_unflatten(given, spec)
            out = call_with(self.module, params, a, kw)
            others = sorted({type(v).__name__ for v in pytree.tree_leaves(out) if not isinstance(v, torch.Tensor)})
            if others:
                raise TypeError(
                    f"A batched learner returns tensors with a leading task dimension, but the model returned {others}. "
                    "Have it return tensors only (a transformers model returns its key/value cache, a DynamicCache, "
                    "unless given use_cache=False), or run the tasks one by one: learners[b](...)."
                )
            return out

        with module_policy(self.bn), autograd_through_vmap():
            return per_task(one, self.loop, self.bn)(self.params, [leaves[i] for i in batched])

    def __repr__(self) -> str:
        return f"BatchedLearner({type(self.module).__name__}, tasks={len(self)}, adapted={list(self.params)})"


_PLACES: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _places(model: nn.Module) -> tuple:
    """``(places, names)``: ``(module, attribute, name, parameter)`` for every place a parameter of ``model`` sits (a tied
    parameter in each of its places, under the name ``named_parameters()`` gives it; the model itself as ``None``, since
    a cached value that referred to its weak key would keep the model alive for good), and the set of those names,
    found once per model and checked at each call (a parameter assigned since is found again)."""
    cached = _PLACES.get(model)
    if cached is not None and all((model if module is None else module)._parameters.get(attr) is param
                                  for module, attr, _, param in cached[0]):
        return cached
    names = {id(p): n for n, p in model.named_parameters()}
    places = tuple((None if module is model else module, attr, names[id(p)], p)
                   for prefix, module in model.named_modules(remove_duplicate=False)
                   for attr, p in module._parameters.items() if p is not None and id(p) in names)
    cached = _PLACES[model] = (places, frozenset(names.values()))
    return cached


def named_parameters(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``dict(model.named_parameters())`` from the places :func:`call_with` finds once per model (checked, not walked
    again: read at every adaptation).

    >>> list(named_parameters(torch.nn.Linear(2, 1)))
    ['weight', 'bias']
    """
    return {name: param for _, _, name, param in _places(model)[0]}


def call_with(model: nn.Module, params: Tensors, args: tuple, kwargs: dict):
    """``torch.func.functional_call(model, params, args, kwargs)`` for ``params`` naming parameters of ``model``: each
    place of such a parameter holds its tensor during the call (tied ones together). The places are found once per
    model instead of at every call, which is most of a small model's host time per inner step and per HVP.

    >>> net = torch.nn.Linear(2, 1, bias=False)
    >>> call_with(net, {"weight": torch.ones(1, 2)}, (torch.ones(1, 2),), {}), net.weight.shape
    (tensor([[2.]]), torch.Size([1, 2]))
    """
    places, names = _places(model)
    if not names.issuperset(params):  # buffers or unknown names
        return functional_call(model, params, args, kwargs)
    swapped = [(model if module is None else module, attr, name, param) for module, attr, name, param in places if name in params]
    try:
        for module, attr, name, _ in swapped:
            module._parameters[attr] = params[name]  # pyright: ignore[reportArgumentType]  # a tensor in place of a Parameter
        return model(*args, **kwargs)
    finally:
        for module, attr, _, param in swapped:
            module._parameters[attr] = param


def module_loss(model: nn.Module, bn: str, batched: bool, fixed: Optional[Tensors] = None) -> Callable[..., Callable]:
    """``make_loss`` for a model: ``closure(learner)`` (or ``closure(learner, task)``) as ``loss(phi, task)``.

    Each loss runs the model in the train/eval ``modes`` of its modules given when the inner step took it
    (the adapted model's own; by default the model's then), so a replay after ``model.eval()`` still
    differentiates the loss of the inner loop. ``fixed``: tensors that stand for the model's parameters
    that do not adapt (higher's ``copy_initial_weights=True``). ``bn="error"`` refuses a model with
    normalisation layers that track running statistics now.
    """
    if bn == "error":
        check_no_tracking(model)
    fixed = fixed or {}

    def make(closure: Callable, modes: Optional[Sequence[bool]] = None, modules: Optional[Sequence[nn.Module]] = None) -> Callable:
        """``modes`` of ``modules`` (by default the model's ``modules()`` now: found once per support loss, not at every
        call; an adapted model gives those it took its modes from)."""
        modules = list(model.modules()) if modules is None else modules
        modes = [m.training for m in modules] if modes is None else list(modes)

        def loss(phi: Tensors, task) -> torch.Tensor:
            learner = Learner(model, {**fixed, **phi} if fixed else phi, bn)
            with _modes(modules, modes):
                return closure(learner, task) if batched else closure(learner)

        return loss

    return make


class _modes:
    """Run with the modules of ``model`` (its ``modules()``, or that list) in the train/eval ``modes`` (``None``: as they
    are), set back afterwards. A class, not a generator: it is entered at every support-loss call."""

    def __init__(self, model: Union[nn.Module, Sequence[nn.Module]], modes: Optional[Sequence[bool]]):
        self.model, self.modes, self.now = model, modes, None

    def __enter__(self) -> None:
        if self.modes is None:
            return
        modules = self.modules = list(self.model.modules()) if isinstance(self.model, nn.Module) else self.model
        now = [m.training for m in modules]
        if now == list(self.modes):  # the usual case: nothing to set, nothing for torch.compile to trace
            return
        self.now = now
        for module, mode in zip(modules, self.modes):
            module.training = mode

    def __exit__(self, *exc) -> None:
        if self.now is not None:
            for module, mode in zip(self.modules, self.now):
                module.training = mode


def adapted_module(model: nn.Module, params: Tensors, modes: Optional[Sequence[bool]] = None) -> nn.Module:
    """A shallow copy of ``model`` whose parameters named in ``params`` are those tensors (learn2learn's
    cloned module): every submodule and method of it runs with the adapted parameters, buffers are shared.
    ``modes``: the train/eval mode of each of ``model.modules()`` in the copy (default: theirs).

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> adapted_module(net, {"0.bias": torch.ones(2)})[0].bias
    tensor([1., 1.])
    """
    by_id = {id(p): params[n] for n, p in model.named_parameters(remove_duplicate=False) if n in params}
    mode_of = dict(zip(map(id, model.modules()), modes)) if modes is not None else {}
    copies: Dict[int, nn.Module] = {}  # a module shared by two parents stays one module in the copy

    def copy(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            clone = copies[id(module)] = module.__new__(type(module))
            clone.__dict__ = module.__dict__.copy()
            clone.training = mode_of.get(id(module), module.training)
            clone._parameters = {n: by_id.get(id(p), p) if p is not None else None for n, p in module._parameters.items()}  # pyright: ignore[reportAttributeAccessIssue]  # adapted tensors in place of Parameters
            clone._modules = {n: None if m is None else copy(m) for n, m in module._modules.items()}
        return copies[id(module)]

    return copy(model)


class AdaptedModule(nn.Module):
    """The adapted model of one inner loop, a module of its own (learn2learn's learner, higher's ``fmodel``).

    Its train/eval mode is its own, taken from the model when the adaptation starts: ``.train()`` and
    ``.eval()`` set the mode of its forward passes and of the inner steps taken after them (each replayed in
    the mode it ran in), never the model's. It answers what the model answers, run with the adapted
    parameters: ``parameters()``, ``named_parameters()``, ``state_dict()``, submodules, attributes and
    methods (``generate()`` of a Hugging Face model), through :attr:`module`.

    Args:
        loop: the recorded inner loop (its ``outputs()`` are the adapted parameters).
        model: the user's model; nothing here changes it.
        bn: the normalisation-layer policy.
        fixed: tensors standing for the parameters that do not adapt (``copy_initial_weights=True``).
        detach: hand out the adapted parameters detached (no meta-gradient: ``track_higher_grads=False``).
    """

    # set through vars() in __init__: the model must not become a submodule (its parameters are not this module's)
    _loop: Any
    _model: nn.Module
    _bn: str
    _fixed: Tensors
    _detach: bool
    _modes: List[bool]
    _model_modules: List[nn.Module]
    _hooks: bool

    def __init__(self, loop: Any, model: nn.Module, bn: str, fixed: Optional[Tensors] = None, detach: bool = False):
        super().__init__()
        modules = list(model.modules())
        # the module policy's hooks, only where the model has a module they act on (a call of the adapted model is the
        # user's forward, never replayed: under bn="auto" they would change no value there)
        vars(self).update(_loop=loop, _model=model, _bn=bn, _fixed=dict(fixed or {}), _detach=detach, _model_modules=modules,
                          _modes=[m.training for m in modules], _hooks=needs_hooks(bn, any(map(special, modules))),
                          training=model.training)  # a plain attribute, as Module.__setattr__ would set it

    @property
    def params(self) -> Tensors:
        """The adapted parameters after the steps so far, by name (differentiable unless ``detach``)."""
        params = self._loop.outputs()
        return {n: t.detach() for n, t in params.items()} if self._detach else params

    def _stand_ins(self) -> Tensors:
        """Every tensor that stands for a parameter of the model: the adapted ones and the fixed copies."""
        return {**self._fixed, **self.params} if self._fixed else self.params

    def forward(self, *args, **kwargs):
        """The model's forward with the adapted parameters, in this module's modes."""
        # the modules its modes were taken for (when the adaptation started), not walked again at every call
        return Learner(self._model, self._stand_ins(), self._bn, self._modes, self._hooks, self._model_modules)(*args, **kwargs)

    def train(self, mode: bool = True):
        """Set this adapted model's mode (every submodule's, as ``nn.Module.train``); the model keeps its own."""
        self.training = bool(mode)
        self._modes = [bool(mode)] * len(self._modes)
        return self

    @property
    def modes(self) -> tuple:
        """The train/eval mode of each of the model's modules in this adapted model."""
        return tuple(self._modes)

    @property
    def module(self) -> nn.Module:
        """The adapted model as a module (learn2learn's ``learner.module``): a shallow copy of the model with the
        adapted parameters in place and this module's modes, so that its submodules and methods
        (``learner.module.features(x)``) run with them; buffers are shared with the model."""
        return adapted_module(self._model, self._stand_ins(), self._modes)

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:  # pyright: ignore[reportIncompatibleMethodOverride]  # adapted tensors, not Parameters
        """The model's parameters at this point: the adapted ones where they adapt."""
        return (p for _, p in self.named_parameters())

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # pyright: ignore[reportIncompatibleMethodOverride]  # adapted tensors
        """``(name, parameter)`` pairs of the model at this point: the adapted ones where they adapt."""
        stand_ins = self._stand_ins()
        return iter([(prefix + n, stand_ins.get(n, p)) for n, p in self._model.named_parameters()])

    def state_dict(self, *args, **kwargs):
        """The model's state dict with the adapted parameters in place (detached unless ``keep_vars=True``)."""
        return self.module.state_dict(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self._model).__name__}, steps_taken={self._loop.steps_taken}, training={self.training})"
