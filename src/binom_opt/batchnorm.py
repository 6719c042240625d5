"""How BatchNorm behaves while the engine calls a model functionally.

``"transductive"`` (the MAML convention): every forward, in the inner loop, in the HVP replays
and on the query set, normalises with the statistics of its own batch, and the running buffers
are neither read nor updated. Updating buffers in place is what makes ``torch.func`` transforms
fail on BatchNorm ("in-place operation on a tensor that is being vmapped"); reading them would
make the replayed loss differ from the one the inner loop differentiated.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

from torch import nn

__all__ = ["BN_POLICIES", "tracking_batchnorms", "transductive_batchnorm"]

BN_POLICIES = ("transductive",)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def tracking_batchnorms(model: nn.Module) -> List[nn.modules.batchnorm._NormBase]:
    """The BatchNorm-like modules of ``model`` that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


@contextlib.contextmanager
def transductive_batchnorm(modules: List[nn.modules.batchnorm._NormBase]) -> Iterator[None]:
    """Hide the running buffers of ``modules`` so that they use batch statistics and stay untouched.

    Without buffers, ``_BatchNorm.forward`` normalises with batch statistics in train and eval
    mode alike and has nothing to update. The buffers are put back on exit, also on error.
    """
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
