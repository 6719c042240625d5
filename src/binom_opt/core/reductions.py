"""Per-task reductions of many tensors in few operator calls: the norms and finiteness flags a meta-gradient reads.

Every tensor has the task dimension first (``[B, ...]``). For one task (``B = 1``: the per-task path, whose small
steps are host-bound) one ``torch._foreach_norm`` reduces every tensor in one call; for a meta-batch each tensor is
reduced along its task rows. A value is not finite where ``x * 0 != 0`` (NaN for NaN and for infinities): two
operators where ``torch.isfinite`` dispatches four. The largest magnitude (``ord=inf``) flags a NaN or an infinity
anywhere in a slice and never overflows, as a sum of large finite values can.

Example:
    >>> import torch
    >>> tensors = [torch.tensor([[3.0, 4.0]]), torch.tensor([[float("nan")]])]
    >>> norms(tensors)
    tensor([[5.],
            [nan]], dtype=torch.float64)
    >>> not_finite(norms(tensors, INF)).squeeze(1).tolist()
    [False, True]
"""

from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch._utils import _flatten_dense_tensors

__all__ = ["flat", "INF", "norms", "entry_norms", "not_finite", "nonfinite_tasks", "nonfinite_groups", "nonfinite_groups_and_norm",
           "group_norms", "RoundNorms", "change_norms", "scaled_all"]

INF = float("inf")


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every value of ``tensors``, flattened and concatenated (promoted to the widest) in one call, in C++: no Python
    reshape of each (one tensor comes back as a view of itself).

    >>> flat([torch.ones(2, 2), torch.zeros(1)]).tolist()
    [1.0, 1.0, 1.0, 1.0, 0.0]
    """
    return _flatten_dense_tensors(list(tensors))


def norms(tensors: Iterable[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """``[len(tensors), B]``: the ``ord``-norm of each task's slice of each tensor, as float64."""
    return entry_norms(tensors, ord).double()


def entry_norms(tensors: Iterable[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """:func:`norms` in the tensors' own float32 or float64 (float32 for narrower ones): what a read to the host takes."""
    tensors = list(tensors)
    return torch.stack(_entry_norms(tensors, ord)).reshape(len(tensors), -1)


def _entry_norms(tensors: List[torch.Tensor], ord: float = 2.0) -> List[torch.Tensor]:
    """Each tensor's per-task norms (``[B]``, or a 0-d tensor for one task), in as few calls as can be: in the
    tensors' own float32 or float64 (a cast to float64 first would copy every tensor), in float32 for narrower ones
    (whose own range would overflow); :func:`norms` and :class:`RoundNorms` give them in float64."""
    wide = all(t.dtype in (torch.float32, torch.float64) for t in tensors)
    with torch.no_grad():
        if all(t.shape[0] == 1 for t in tensors):
            try:  # one call for every tensor (grouped by device and dtype inside)
                return list(torch._foreach_norm(tensors, ord, dtype=None if wide else torch.float32))  # pyright: ignore[reportPrivateImportUsage]  # as clip_grad_norm_
            except RuntimeError:  # a backend without the foreach kernel for these tensors: one call each
                pass
        return [torch.linalg.vector_norm(t.flatten(1), ord, dim=1, dtype=None if wide else torch.float32) for t in tensors]


class RoundNorms:
    """Each task's norm over all entries of one vector per round, each round's entries reduced when it ends (one call
    for one task) and the rounds' totals taken together at the end: ``rounds()``, one ``[B]`` float64 tensor per round.

    ``hold``: every round's vector is held until ``rounds()`` instead, which reduces them all at once: for a few
    values a task, the norms of one concatenation (three operators whatever the number of rounds and entries: what
    makes the difference where a small model's HVPs are host-bound). Hold only where the vectors are small beside
    what stays alive anyway, as beside the kept graphs' gradients: the caller would drop each round's vector.

    >>> rounds = RoundNorms()
    >>> rounds.add({"a": torch.tensor([[3.0]]), "b": torch.tensor([[4.0]])})
    >>> rounds.add({"a": torch.tensor([[1.0]]), "b": torch.tensor([[0.0]])})
    >>> [r.tolist() for r in rounds.rounds()]
    [[5.0], [1.0]]
    """

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self._entries: List[torch.Tensor] = []
        self._held: List[List[torch.Tensor]] = []
        self._factors: List[float] = []

    def add(self, tensors: Dict[str, torch.Tensor], factor: float = 1.0) -> None:
        """A round's vector: ``tensors`` times the float ``factor`` (whose magnitude multiplies the round's norm)."""
        if self.hold:
            self._held.append(list(tensors.values()))
        else:
            self._entries += _entry_norms(list(tensors.values()))
        self._factors.append(factor)

    def rounds(self) -> Optional[torch.Tensor]:
        """``[rounds, B]`` float64, each round's norms (``None``: no round)."""
        count = len(self._factors)
        if not count:
            return None
        totals = self._concatenated() if self._held else None
        if totals is None:
            entries = self._entries or _entry_norms([t for vector in self._held for t in vector])
            per_entry = torch.stack(entries).reshape(count, len(entries) // count, -1).double()
            totals = torch.linalg.vector_norm(per_entry, dim=1)
        if all(factor == 1.0 for factor in self._factors):
            return totals
        # each by its Python float: a tensor of the factors made on the host would be a blocking copy to a GPU
        return torch.stack([total if factor == 1.0 else total * abs(factor) for total, factor in zip(totals, self._factors)])

    def _concatenated(self) -> Optional[torch.Tensor]:
        """The held rounds' totals from one concatenation of every vector, where each round has as many values and they
        are few (:data:`CONCATENATED_VALUES` a task); else ``None``. (Run in the expansion, under ``no_grad``.)"""
        tensors = [t for vector in self._held for t in vector]
        B, rounds = tensors[0].shape[0], len(self._held)
        sizes = {sum(t.numel() for t in vector) for vector in self._held}
        if len(sizes) != 1 or sizes.pop() * rounds > B * CONCATENATED_VALUES:
            return None
        return _row_norms(tensors, B, rounds)


def change_norms(vectors: List[List[torch.Tensor]], one_task: bool = False) -> Optional[torch.Tensor]:
    """``[pairs, B]`` float64: each task's norm of ``vectors[i + 1] - vectors[i]`` over all entries (every vector a
    list of ``[B, ...]`` tensors with the same entries; ``one_task``: one task's tensors without the task axis, ``B = 1``),
    as :class:`RoundNorms` of those differences. For a few values a task, one concatenation and one difference of it;
    else entry by entry.

    >>> [n.tolist() for n in change_norms([[torch.tensor([[0.0, 0.0]])], [torch.tensor([[3.0, 4.0]])], [torch.tensor([[3.0, 5.0]])]])]
    [[5.0], [1.0]]
    """
    B, count = 1 if one_task else vectors[0][0].shape[0], len(vectors)
    if sum(t.numel() for t in vectors[0]) * count <= B * CONCATENATED_VALUES:
        return _row_norms([t for vector in vectors for t in vector], B, count, differences=True)
    if one_task:
        vectors = [[t.unsqueeze(0) for t in vector] for vector in vectors]
    rounds = RoundNorms()
    for before, after in zip(vectors, vectors[1:]):
        rounds.add({str(i): b - a for i, (a, b) in enumerate(zip(before, after))})
    return rounds.rounds()


def _row_norms(tensors: List[torch.Tensor], B: int, rows: int, differences: bool = False) -> torch.Tensor:
    """``tensors``, ``rows`` vectors of the same entries one after another, each task's values of every row side by side,
    ``[rows, B, n]``: each row's ``[B]`` float64 norm, ``[rows, B]`` (with ``differences``, of each row minus the one
    before). Each entry's rows are stacked first: one call an entry, not one a tensor (one task's: one call for all)."""
    size = len(tensors) // rows
    if B == 1:  # one call for all, whatever their shapes
        together = flat(tensors).view(rows, 1, -1)
    else:
        try:  # promoted to the widest
            together = torch.cat([torch.stack(tensors[p::size]).reshape(rows, B, -1) for p in range(size)], 2)
        except RuntimeError:  # an entry of other shapes in other rows
            together = torch.cat([t.reshape(B, -1) for t in tensors], 1).reshape(B, rows, -1).transpose(0, 1)
    rows_of = torch.diff(together, dim=0) if differences else together
    return torch.linalg.vector_norm(rows_of, dim=2, dtype=torch.float64)  # computed in float64: no cast after it


def not_finite(x: torch.Tensor) -> torch.Tensor:
    """Where ``x`` holds NaN or an infinity (``x * 0`` is NaN there, zero elsewhere)."""
    return (x * 0) != 0


def nonfinite_tasks(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``[B]``: whether each task's slice of any of ``tensors`` holds a NaN or an infinity, on the device.

    Up to :data:`CONCATENATED_VALUES` values a task, every task's values are concatenated, times zero and summed (NaN
    where one is not finite, zero elsewhere, never an overflow): four operators whatever the number of tensors. Above
    it, the largest magnitude of each tensor, which copies nothing."""
    return nonfinite_groups([tensors])[0]


def nonfinite_groups(groups: Sequence[Iterable[torch.Tensor]], tasks: Optional[int] = None) -> torch.Tensor:
    """``[len(groups), B]``: :func:`nonfinite_tasks` of each group, from one concatenation of every group's values (a
    sum over each group's columns of it): two groups in six operators, where one call each takes eight. ``tasks=1``:
    one task's tensors, with the task axis or without it (one flat concatenation, a single call, takes any shape).

    >>> nonfinite_groups([[torch.ones(2, 3)], [torch.tensor([[1.0], [float("inf")]])]]).tolist()
    [[False, False], [False, True]]
    >>> nonfinite_groups([[torch.ones(3)], [torch.tensor([[float("nan")]])]], tasks=1).tolist()
    [[False], [True]]
    """
    given = [list(group) for group in groups]
    groups = [[t for t in group if t.numel()] for group in given]
    everything = [t for group in groups for t in group]
    if not everything:  # nothing to flag: B tasks (one without tensors), where the tensors live
        first = next((t for group in given for t in group), None)
        return torch.zeros(len(groups), tasks or (1 if first is None else first.shape[0]), dtype=torch.bool,
                           device=None if first is None else first.device)
    B = tasks or everything[0].shape[0]
    widths = [sum(t.numel() for t in group) // B for group in groups]
    if sum(widths) > CONCATENATED_VALUES:
        flags = [not_finite(norms([t.reshape(B, -1) for t in group], INF)).any(0) if group else None for group in groups]
        device = everything[0].device
        return torch.stack([torch.zeros(B, dtype=torch.bool, device=device) if f is None else f for f in flags])
    if B == 1:  # one call for all
        return _one_task_flags(flat(everything), widths)
    together = torch.cat([t.reshape(B, -1) for t in everything], 1).mul(0)
    sums = [part.sum(1) for part in together.split(widths, 1)]
    return (torch.stack(sums) if len(sums) > 1 else sums[0].unsqueeze(0)).isnan()


def _one_task_flags(values: torch.Tensor, widths: List[int]) -> torch.Tensor:
    """``[len(widths), 1]``: whether each group of one task's concatenated ``values`` (``widths`` values each, in order)
    holds a NaN or an infinity."""
    zeros = values.mul(0)
    if len(set(widths)) == 1:
        return zeros.view(len(widths), 1, -1).sum(2).isnan()
    return torch.stack([part.sum() for part in zeros.split(widths)]).isnan().unsqueeze(1)


def nonfinite_groups_and_norm(groups: Sequence[Iterable[torch.Tensor]], tensors: Iterable[torch.Tensor], tasks: int
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(nonfinite_groups(groups, tasks), norms of tensors)``: one task's (``tasks=1``) from one concatenation of all their
    values, where they are few (the flags and the norm of every value of ``tensors`` together, ``[1, 1]``: what
    :func:`~binom_opt.core.stats.make_stats` reads of them, their total, in two operators fewer than apart); a
    meta-batch's, or many values, apart (the norms of each of ``tensors``, ``[entries, B]``).

    >>> flags, norm = nonfinite_groups_and_norm([[torch.ones(2)], [torch.tensor([float("nan")])]], [torch.tensor([3.0, 4.0])], 1)
    >>> flags.tolist(), norm.tolist()
    ([[False], [True]], [[5.0]])
    """
    groups, tensors = [[t for t in group if t.numel()] for group in groups], list(tensors)
    widths = [sum(t.numel() for t in group) for group in groups]
    if tasks != 1 or not all(widths) or sum(widths) + sum(t.numel() for t in tensors) > CONCATENATED_VALUES:
        return nonfinite_groups(groups, tasks), entry_norms(tensors)
    values = flat([*(t for group in groups for t in group), *tensors])
    flags, rest = values[:sum(widths)], values[sum(widths):]
    wide = values.dtype in (torch.float32, torch.float64)  # as entry_norms: narrower ones in float32
    return _one_task_flags(flags, widths), torch.linalg.vector_norm(rest, dtype=None if wide else torch.float32).view(1, 1)


def group_norms(groups: Sequence[Iterable[torch.Tensor]], tasks: int) -> Optional[torch.Tensor]:
    """``[len(groups)]``: one task's (``tasks=1``) 2-norm of each group's values, where every group holds as many of them
    and they are few: one concatenation and one operator. Else ``None``.

    A group's norm is NaN or infinite where one of its values is, and finite where all are unless their squares
    overflow (an infinite norm of finite values, which a caller checks exactly): the finiteness flags of the groups in
    one operator with their norms, where :func:`nonfinite_groups_and_norm` takes four.

    >>> group_norms([[torch.tensor([3.0, 4.0])], [torch.tensor([float("nan"), 0.0])]], 1).tolist()
    [5.0, nan]
    """
    groups = [list(group) for group in groups]
    widths = {sum(t.numel() for t in group) for group in groups}
    if tasks != 1 or len(widths) != 1 or 0 in widths or widths.pop() * len(groups) > CONCATENATED_VALUES:
        return None
    values = flat([t for group in groups for t in group]).view(len(groups), -1)
    wide = values.dtype in (torch.float32, torch.float64)  # as entry_norms: narrower ones in float32
    return torch.linalg.vector_norm(values, dim=1, dtype=None if wide else torch.float32)


CONCATENATED_VALUES = 1 << 20  # per task: a copy of up to 4 MiB (float32) to find the non-finite tasks in four operators


def scaled_all(tensors: List[torch.Tensor], factor: float) -> List[torch.Tensor]:
    """``[t * factor for t in tensors]`` in one call. On the CPU, for float32 and float64, the factor is a cached 0-d
    tensor of their dtype: the same products, bit for bit, at half the host time of a Python scalar (which
    ``torch._foreach_mul`` wraps into a tensor at every call)."""
    dtype = tensors[0].dtype if tensors else None
    if dtype in (torch.float32, torch.float64) and all(t.is_cpu and t.dtype == dtype for t in tensors):
        return list(torch._foreach_mul(tensors, _factor(factor, dtype)))  # pyright: ignore[reportPrivateImportUsage]
    return list(torch._foreach_mul(tensors, factor))  # pyright: ignore[reportPrivateImportUsage]


@functools.lru_cache(maxsize=64)
def _factor(value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)
