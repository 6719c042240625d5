"""How BatchNorm behaves while the engine calls a model functionally (``bn=`` policies).

* ``"transductive"`` (default, the MAML convention): every forward, in the inner loop, in the
  HVP replays and on the query set, normalises with its own batch's statistics; the running
  buffers are neither read nor updated, in train and eval mode alike.
* ``"frozen"``: every forward normalises with the running statistics, which are not updated
  (as in eval mode).
* ``"error"``: a model with BatchNorm layers that track running statistics is refused, for
  users who want to decide explicitly.

Updating the buffers in place is what makes ``torch.func`` transforms fail on BatchNorm
("in-place operation on a tensor that is being vmapped"), and a replay that read updated
buffers would differentiate another loss than the inner loop did: no policy updates them.
Layers built with ``track_running_stats=False`` always use batch statistics.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

from torch import nn

__all__ = ["BN_POLICIES", "BatchNormPolicy", "tracking_batchnorms"]

BN_POLICIES = ("transductive", "frozen", "error")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def tracking_batchnorms(model: nn.Module) -> List[nn.modules.batchnorm._NormBase]:
    """The BatchNorm-like modules of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


class BatchNormPolicy:
    """A policy bound to a model; calling it gives the context every functional forward runs in.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> before = model[1].running_mean.clone()
        >>> with BatchNormPolicy(model, "transductive")():
        ...     _ = model(torch.randn(8, 3))
        >>> torch.equal(model[1].running_mean, before)
        True
    """

    def __init__(self, model: nn.Module, policy: str = "transductive"):
        if policy not in BN_POLICIES:
            raise ValueError(f"bn must be one of {BN_POLICIES}, got {policy!r}.")
        self.policy = policy
        self.modules = tracking_batchnorms(model)
        if policy == "error" and self.modules:
            raise ValueError(
                f"bn='error': the model has {len(self.modules)} BatchNorm layer(s) that track running statistics. "
                "Choose bn='transductive' (batch statistics everywhere, the MAML convention) or bn='frozen' "
                "(running statistics, not updated), or build the layers with track_running_stats=False."
            )

    def __call__(self):
        return _frozen(self.modules) if self.policy == "frozen" else _transductive(self.modules)


@contextlib.contextmanager
def _transductive(modules) -> Iterator[None]:
    """Hide the running buffers: ``_BatchNorm.forward`` then uses batch statistics and updates nothing."""
    saved = [{name: m._buffers.get(name) for name in _BUFFERS} for m in modules]
    try:
        for m in modules:
            for name in _BUFFERS:
                if name in m._buffers:
                    m._buffers[name] = None
        yield
    finally:
        for m, buffers in zip(modules, saved):
            for name, value in buffers.items():
                if name in m._buffers:
                    m._buffers[name] = value


@contextlib.contextmanager
def _frozen(modules) -> Iterator[None]:
    """Eval mode for the BatchNorm layers only: running statistics, no updates."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
