"""Modules called inside binom_opt: what normalisation layers do, and no buffer written in forward.

The support loss is replayed after the inner loop, so it must be a pure function of the adapted
parameters. :func:`module_policy`, the context of every support-loss and learner call, uses global
forward hooks, in place only inside it, so that any module is covered: normalisation layers with
running statistics follow the ``bn`` policy (see :class:`~binom_opt.Options`) and never update them,
any other buffer written in forward is a ``RuntimeError`` naming it, and attention runs its math
kernel (the fused ones have no second derivative and no batching rule). Under ``bn="auto"`` the later
inner steps of a support loss whose first call ran none of the modules the hooks act on run without
them (:func:`needs_hooks`): a hook makes every module call take torch's slower path.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    >>> before = model[1].running_mean.clone()
    >>> with module_policy("auto"):
    ...     _ = model(torch.randn(8, 3))
    >>> torch.equal(model[1].running_mean, before)
    True
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as _module
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

__all__ = ["NORM_POLICIES", "module_policy", "special", "needs_hooks", "check_no_tracking"]

NORM_POLICIES = ("auto", "transductive", "frozen", "error")
_STATS = ("running_mean", "running_var", "num_batches_tracked")


class _Policy:
    """The policy in force, and what it changed: ``touched[id] = (module, buffers, attributes)`` as they
    were, restored when its context ends."""

    def __init__(self, bn: str):
        self.bn = bn
        self.touched: Dict[int, Tuple[nn.Module, dict, dict]] = {}
        self.versions: Dict[int, Dict[str, int]] = {}
        self.special = False  # whether a module with buffers, a normalisation layer or a sparse embedding ran

    def change(self, module: nn.Module, buffers: Tuple[str, ...] = (), **attributes) -> None:
        """Hide ``buffers`` and set ``attributes`` of ``module`` until the context ends."""
        saved = self.touched.setdefault(id(module), (module, {}, {}))
        for name in buffers:
            if name in module._buffers:
                saved[1].setdefault(name, module._buffers[name])
                module._buffers[name] = None
        for name, value in attributes.items():
            saved[2].setdefault(name, getattr(module, name))
            setattr(module, name, value)


_active: List[_Policy] = []  # nested contexts keep the outermost
# The global hooks are in place only inside a policy: with a global hook, every module call in the process takes torch's
# slower path (about 2 µs a call), a user's other code included. They are registered once and put back under the same
# keys each time, so that what torch.compile reads of them is the same at every call inside a policy.
_HOOKS = (_module._global_forward_pre_hooks, _module._global_forward_hooks)
_hook_keys: List[Tuple[dict, int, Callable]] = []


def _install_hooks() -> None:
    if not _hook_keys:
        for hooks, register, hook in zip(_HOOKS, (register_module_forward_pre_hook, register_module_forward_hook), (_before, _after)):
            _hook_keys.append((hooks, register(hook).id, hook))
        return
    for hooks, key, hook in _hook_keys:
        hooks[key] = hook


def _remove_hooks() -> None:
    for hooks, key, _ in _hook_keys:
        hooks.pop(key, None)


# torch's switches of each scaled_dot_product_attention backend (what sdpa_kernel sets), read and set directly: entered
# at every inner step and HVP, sdpa_kernel's own bookkeeping would be a fair share of a small model's host time
_SDP_SWITCHES: List[Tuple[Callable[[], bool], Callable[[bool], None], bool]] = [
    (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"), name == "math")
    for name in ("flash", "mem_efficient", "cudnn", "math", "overrideable")
    if hasattr(torch._C, f"_get_{name}_sdp_enabled") and hasattr(torch._C, f"_set_sdp_use_{name}")]


class module_policy:
    """Run every module forward inside under the normalisation policy ``bn``, refusing buffer writes (a class, not a
    generator: it is entered at every support-loss call).

    ``hooks=False``: without the module hooks (the switches of attention kernels only), for a call whose modules need
    none of them (:func:`needs_hooks`). After the context, :attr:`special` tells whether a module that does ran in it
    (``True`` where the context nested in another, which holds).
    """

    def __init__(self, bn: str, hooks: bool = True):
        self.bn, self.hooks = bn, hooks
        self.policy: Optional[_Policy] = None
        self.special = True  # known only where this context was the outermost

    def __enter__(self) -> None:
        if _active:  # nested: the outermost policy holds
            return
        if self.hooks:
            _install_hooks()
        self.policy = _Policy(self.bn)
        _active.append(self.policy)
        self.fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # attention's fused eval path has no derivative and no vmap rule
        self.sdp = [get() for get, _, _ in _SDP_SWITCHES]
        for _, set_, math in _SDP_SWITCHES:  # the math kernel only: the fused kernels have no second derivative
            set_(math)
        if not _SDP_SWITCHES:  # a torch without these switches
            self.kernel = sdpa_kernel(SDPBackend.MATH)
            self.kernel.__enter__()

    def __exit__(self, *exc) -> None:
        policy, self.policy = self.policy, None
        if policy is None:
            return
        if not _SDP_SWITCHES:
            self.kernel.__exit__(*exc)
        for (_, set_, _), enabled in zip(_SDP_SWITCHES, self.sdp):
            set_(enabled)
        torch.backends.mha.set_fastpath_enabled(self.fastpath)
        _active.pop()
        if self.hooks:
            _remove_hooks()
        self.special = policy.special
        for module, buffers, attributes in policy.touched.values():
            module._buffers.update(buffers)
            for name, value in attributes.items():
                setattr(module, name, value)


def _before(module: nn.Module, args) -> None:
    if not _active or not special(module):  # the module the hooks act on, by the one rule needs_hooks reads too
        return
    policy = _active[0]
    policy.special = True
    if isinstance(module, nn.modules.batchnorm._NormBase):
        _apply(policy, module)
    elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
        policy.change(module, sparse=False)  # the same values; dense gradients, which torch.func differentiates
    if module._buffers and not torch.compiler.is_compiling():
        policy.versions[id(module)] = {n: b._version for n, b in module._buffers.items() if b is not None}


def _after(module: nn.Module, args, output) -> None:
    seen = _active[0].versions.pop(id(module), None) if _active else None
    if not seen:
        return
    written = [n for n, v in seen.items() if module._buffers.get(n) is not None and module._buffers[n]._version != v]  # pyright: ignore[reportOptionalMemberAccess]
    if written:
        raise RuntimeError(
            f"{type(module).__name__} wrote its buffer(s) {written} during forward (in train mode, spectral_norm's "
            "power iteration and running averages do). binom_opt replays the support loss after the inner loop, "
            "so such a module would make every replay differentiate another loss. Put that module in eval mode "
            "(module.eval()) for the adaptation, or make its forward leave its buffers unchanged."
        )


def special(module: nn.Module) -> bool:
    """Whether the hooks act on ``module``: a normalisation layer, a sparse embedding, or a module with buffers."""
    return (isinstance(module, nn.modules.batchnorm._NormBase) or bool(module._buffers)
            or (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse))


def needs_hooks(bn: str, special: bool) -> bool:
    """Whether later calls of a support loss need the module hooks, given whether its first call, which ran with them,
    ran a ``special`` module (buffers, a normalisation layer, a sparse embedding). Under ``bn="auto"`` a call of none
    needs none: the hooks would change nothing in it. (A later call that runs such a module after all, on another
    branch, runs it as the user's own loop would: a normalisation layer in train mode normalises with the batch's
    statistics either way; a replay of the step, which differentiates it again, always runs with the hooks.)

    >>> needs_hooks("auto", special=False), needs_hooks("auto", special=True), needs_hooks("frozen", special=False)
    (False, True, True)
    """
    return special or bn != "auto"


def check_no_tracking(model: nn.Module) -> None:
    """``bn="error"``: refuse normalisation layers that track running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            _apply(_Policy("error"), module)


def _apply(policy: _Policy, module: nn.Module) -> None:
    tracks = module.track_running_stats and module._buffers.get("running_mean") is not None
    if policy.bn == "error" and tracks:
        raise ValueError(
            f"bn='error': layers such as this {type(module).__name__} track running statistics. Choose bn='auto' (follow "
            "each layer's train/eval mode), bn='transductive' (batch statistics) or bn='frozen' (running statistics), "
            "or build the layers with track_running_stats=False."
        )
    hide = tracks and (policy.bn == "transductive" or (policy.bn == "auto" and module.training))
    mode = {"transductive": True, "frozen": False}.get(policy.bn, module.training)
    if hide or mode != module.training:  # hidden buffers: _NormBase.forward normalises with batch statistics
        policy.change(module, _STATS if hide else (), training=mode)
