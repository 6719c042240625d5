"""How many Hessian-vector products run at once: a user cap, a memory budget, and halving after OOM.

A batched HVP round keeps the activations of every HVP it vmaps over alive at the same time,
so its memory is (HVPs at once) x (activations of one HVP). :class:`Chunking` bounds the first
factor three ways:

* ``chunk_size``: at most this many at once (the user's cap);
* ``memory_budget``: bytes for one round's activations; the activations of one HVP are
  measured once, at the first round, by running it with plain autograd under
  ``torch.autograd.graph.saved_tensors_hooks`` and adding up the tensors the forward and the
  double backward save, and the chunk is ``budget // that``;
* an out-of-memory error halves the chunk and retries the round, down to one HVP at once.

The sequential estimators (FirstOrder, Truncated, Exact) take one HVP per round and never
need a budget: their activation memory is that of one HVP whatever ``K`` is.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, TypeVar, Union

import torch

Tensors = Dict[str, torch.Tensor]
T = TypeVar("T")

__all__ = ["Chunking", "parse_memory_budget", "hvp_activation_bytes", "check_chunk_size"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}.")


def parse_memory_budget(budget: Union[None, int, str]) -> Optional[int]:
    """Bytes from ``None`` (no budget), an integer number of bytes, or a string such as ``"512MiB"``.

    >>> parse_memory_budget("1.5GiB"), parse_memory_budget("200 MB"), parse_memory_budget(4096)
    (1610612736, 200000000, 4096)
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise ValueError(f"memory_budget must be None, a number of bytes or a string like '1GiB', got {budget!r}.")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        unit = match and _UNITS.get(match.group(2).lower())
        if unit is None:
            raise ValueError(
                f"memory_budget {budget!r} is not understood: give bytes as an integer or a string such as "
                "'512MiB', '2GB' (units B, kB, MB, GB, KiB, MiB, GiB)."
            )
        value = int(float(match.group(1)) * unit)
    else:
        raise ValueError(f"memory_budget must be None, a number of bytes or a string like '1GiB', got {budget!r}.")
    if value < 1:
        raise ValueError(f"memory_budget must be positive, got {budget!r}.")
    return value


def hvp_activation_bytes(loss_fn: Callable[[Tensors], torch.Tensor], point: Tensors) -> int:
    """Bytes one HVP of ``loss_fn`` at ``point`` keeps alive: the tensors its graphs save.

    Runs ``grad`` with ``create_graph=True`` and the product with a vector of ones under
    ``saved_tensors_hooks`` and sums the distinct storages saved, leaving out the point itself
    (it is already in memory).

    >>> w = {"w": torch.ones(1000)}
    >>> hvp_activation_bytes(lambda p: (p["w"].exp() * 2).sum(), w) >= 1000 * 4
    True
    """
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in point.items()}
    inputs = {t.untyped_storage().data_ptr() for t in leaves.values()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
        dot = sum((g * torch.ones_like(g)).sum() for g in grads if g is not None)
        if isinstance(dot, torch.Tensor) and dot.requires_grad:
            torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
    return max(1, sum(saved.values()))


class Chunking:
    """The chunk size for batched HVP rounds, fixed by a cap, a budget and out-of-memory retries.

    Args:
        chunk_size: at most this many HVPs at once (``None``: no cap).
        memory_budget: bytes (or a string, see :func:`parse_memory_budget`) for one round's
            activations; ``None`` for no budget.

    Attributes:
        fallbacks: the chunk sizes retried with after out-of-memory errors.
        per_hvp_bytes: the measured activation bytes of one HVP (``None`` until a budget needs it).
    """

    def __init__(self, chunk_size: Optional[int] = None, memory_budget: Union[None, int, str] = None):
        check_chunk_size(chunk_size)
        self.cap = chunk_size
        self.budget = parse_memory_budget(memory_budget)
        self.per_hvp_bytes: Optional[int] = None
        self.fallbacks: List[int] = []
        self.used: Optional[int] = None  # the largest number of HVPs one call ran at once

    def limit(self, measure: Callable[[], int]) -> Optional[int]:
        """The most HVPs at once (``None``: no limit); ``measure()`` gives one HVP's bytes, called once."""
        cap = self.cap
        if self.budget is not None:
            if self.per_hvp_bytes is None:
                self.per_hvp_bytes = measure()
            by_budget = max(1, self.budget // self.per_hvp_bytes)
            cap = by_budget if cap is None else min(cap, by_budget)
        return cap

    def run(self, count: int, measure: Callable[[], int], call: Callable[[Optional[int]], T]) -> T:
        """``call(limit)`` for a round of ``count`` HVPs; halves the limit and retries after an OOM."""
        while True:
            limit = self.limit(measure)
            try:
                out = call(None if limit is None or limit >= count else limit)
                self.used = max(self.used or 0, min(limit or count, count))
                return out
            except torch.OutOfMemoryError:
                size = min(limit or count, count)
                if size <= 1:
                    raise
                self.cap = size // 2  # kept for the rest of this computation
                self.fallbacks.append(self.cap)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
