"""The one device-to-host read of a meta-gradient: every check and statistic gathered, then read in one transfer.

Each ``bool()``, ``float()`` or ``.tolist()`` of a device tensor makes the host wait until the device has
finished everything queued before it. A meta-gradient needs several values on the host (whether the inner
loop stayed finite, whether the replayed support loss matches, which tasks' meta-gradients are finite, the
stats), so it collects them as device tensors and reads them all at once, before ``.grad`` is written.

Example:
    >>> import torch
    >>> read = Readback()
    >>> read.add("flags", torch.tensor([[True, False], [False, False]]))
    >>> read.add("norms", torch.tensor([1.5, 2.0]))
    >>> host = read.read()
    >>> host["flags"], host["norms"]
    ([[1.0, 0.0], [0.0, 0.0]], [1.5, 2.0])
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .reductions import flat

__all__ = ["Readback"]


class Readback:
    """Named device tensors to read back together; :meth:`read` makes the one host sync."""

    def __init__(self) -> None:
        self._parts: Dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._parts[name] = tensor.detach()

    def read(self) -> Dict[str, list]:
        """Every tensor added, as nested lists of Python numbers (every value exactly as held; bools as 0.0 / 1.0 where
        read with floats, a Python float holding any float32 or float64 value exactly: no cast to float64 first)."""
        if not self._parts:
            return {}
        values = flat(list(self._parts.values())).tolist()  # promoted to the widest by the concatenation
        out, start = {}, 0
        for name, t in self._parts.items():
            out[name] = _nested(values[start:start + t.numel()], list(t.shape))
            start += t.numel()
        return out

    @staticmethod
    def read_all(reads: Sequence[Readback]) -> List[Dict[str, list]]:
        """:meth:`read` of each of ``reads``, in one host sync for them all."""
        merged = Readback()
        for i, read in enumerate(reads):
            merged._parts.update({f"{i}/{name}": t for name, t in read._parts.items()})
        host = merged.read()
        return [{name: host[f"{i}/{name}"] for name in read._parts} for i, read in enumerate(reads)]


def _nested(values: List[float], shape: List[int]):
    """``values`` in row-major order as nested lists of ``shape`` (a float for a 0-d shape)."""
    if not shape:
        return values[0]
    if len(shape) == 1:
        return values
    size = len(values) // shape[0] if shape[0] else 0
    if len(shape) == 2:  # rows (each step's losses, each entry's norms): no call per row
        return [values[i * size:(i + 1) * size] for i in range(shape[0])]
    return [_nested(values[i * size:(i + 1) * size], shape[1:]) for i in range(shape[0])]
