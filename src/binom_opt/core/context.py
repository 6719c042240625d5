"""The context an inner step ran in, recorded so that every replay of the step runs in it.

A replay (an HVP, a recomputed checkpoint segment, the replay check, the mixed terms) must differentiate
the loss the inner step took, not the loss of the moment the backward runs:

- the random state: a step that draws random numbers (dropout, ``torch.randn`` in the closure) is replayed
  from the state it started from, so that it draws the same numbers (``randomness="replay"``); a step that
  draws none records nothing (:meth:`RandomState.moved`) and pays nothing;
- the autocast state of each device type, so that a backward outside ``torch.autocast`` (PyTorch's
  recommended pattern) replays a step taken inside it in the step's precision, and the other way round.

Replays fork the random generators: the caller's streams stand after the backward where they stood before it.

Example:
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> before = RandomState.capture([])
    >>> drawn = torch.rand(2)
    >>> context = StepContext.now(["cpu"], random=before if before.moved([]) else None)
    >>> with context.replay():
    ...     torch.equal(torch.rand(2), drawn)
    True
    >>> torch.equal(torch.rand(2), drawn)  # the caller's stream went on
    False
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

__all__ = ["RandomState", "StepContext", "devices_of", "device_types"]


def devices_of(tensors: Sequence[torch.Tensor]) -> Tuple[int, ...]:
    """The CUDA devices of ``tensors`` (whose generators their random ops draw from)."""
    return tuple(sorted({t.device.index or 0 for t in tensors if t.is_cuda}))


def device_types(tensors: Sequence[torch.Tensor]) -> Tuple[str, ...]:
    """The device types whose autocast state a step on ``tensors`` reads: the CPU's, and each of theirs."""
    if all(t.is_cpu for t in tensors):  # read at every adaptation: no device object made for each tensor
        return ("cpu",)
    return tuple(sorted({"cpu", *(t.device.type for t in tensors)}))


def _bytes(state: torch.Tensor) -> bytes:
    return state.numpy().tobytes()  # compared on the host: no operator dispatched, no device touched


@dataclass(frozen=True)
class RandomState:
    """The states of the CPU generator and of the generators of some CUDA devices."""

    cpu: torch.Tensor
    cuda: Dict[int, torch.Tensor]

    @classmethod
    def capture(cls, devices: Sequence[int]) -> RandomState:
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices})

    def moved(self, devices: Sequence[int]) -> bool:
        """Whether a generator drew random numbers since this state was captured."""
        if _bytes(torch.get_rng_state()) != _bytes(self.cpu):
            return True
        return any(_bytes(torch.cuda.get_rng_state(d)) != _bytes(self.cuda[d]) for d in devices)

    def restore(self) -> None:
        """Set the generators back to this state."""
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run from this state; the caller's generators are restored afterwards."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            self.restore()
            yield


Autocast = Tuple[Tuple[str, bool, torch.dtype], ...]
_WITHOUT_RANDOM: Dict[Autocast, StepContext] = {}


def _autocast_now(types: Sequence[str]) -> Autocast:
    return tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types)


@dataclass(frozen=True)
class StepContext:
    """What one inner step ran in: the autocast state of each device type, and the random state it started
    from where it drew random numbers (``None`` otherwise)."""

    autocast: Autocast
    random: Optional[RandomState] = None

    @classmethod
    def now(cls, types: Sequence[str], random: Optional[RandomState] = None) -> StepContext:
        """The context in force now (autocast of the device ``types``), with the step's ``random`` state."""
        autocast = _autocast_now(types)
        if random is not None:
            return cls(autocast, random)
        known = _WITHOUT_RANDOM.get(autocast)  # frozen: one object per autocast state serves every step
        if known is None:
            known = _WITHOUT_RANDOM[autocast] = cls(autocast)
        return known

    def joins(self, other: StepContext) -> bool:
        """Whether one batched call can replay both steps: the same autocast and the same random stream (none,
        or one shared by every step, as ``randomness="same"`` records)."""
        return self.autocast == other.autocast and self.random is other.random

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run as the step ran: its autocast state (only what differs from now is entered) and random state."""
        with contextlib.ExitStack() as stack:
            for (kind, enabled, dtype), now in zip(self.autocast, _autocast_now([a[0] for a in self.autocast])):
                if now != (kind, enabled, dtype):
                    stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            if self.random is not None:
                stack.enter_context(self.random.replay())
            yield
