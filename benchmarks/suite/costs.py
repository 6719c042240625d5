"""Deterministic costs of one meta-step: kernel ops dispatched, host syncs, and graph breaks of compiled code.

On a GPU a small model's meta-step is launch-bound: its time follows the number of kernels it launches
and the number of times the host waits for the device. Both counts are the same on every run and every
machine (for one torch version), so they are the performance figures a test can pin.

:class:`CostCounter` is a ``TorchDispatchMode``: it sees every ATen operator below autograd and below
``torch.func`` transforms, so an operator vmapped over a meta-batch counts once, as the one batched
kernel it launches, and a backward counts the kernels it runs.

- **Kernel ops**: every operator dispatched, except those that launch nothing on a GPU: views and
  other metadata-only operators (:data:`FREE_OPS`; any operator whose schema says it returns a view,
  such as view, permute, transpose, t, squeeze, unsqueeze, expand, detach, alias, as_strided, slice,
  select, split, unbind, _reshape_alias), allocations without a fill (empty, empty_like, empty_strided,
  new_empty), and ``_local_scalar_dense``, which is a device-to-host copy counted as a sync instead.
- **Host syncs**: the points where the host waits for the device to finish. ``_local_scalar_dense``
  (what ``.item()``, ``float()``, ``int()``, ``bool()`` of a tensor do), ``Tensor.tolist()`` (one copy of the
  whole tensor; it dispatches nothing, so the counter wraps it), a copy from a device tensor to the
  CPU, and the operators whose output size or Python result depends on the data (:data:`SYNCING_OPS`:
  nonzero, masked_select, unique, repeat_interleave without ``output_size``, boolean indexing, equal,
  allclose, is_nonzero, bincount without ``minlength``). Those also launch kernels and count as kernel ops.
- **Graph breaks**: ``torch._dynamo``'s ``graph_break`` counter, for ``compile_hvps`` modes. Code compiles
  outside the counter only: under a dispatch mode dynamo runs functions eagerly, so the kernel ops of
  a compiled mode are those of its eager code (an upper bound; fused kernels need a profiler), and its
  graph breaks are read with :func:`graph_breaks` around the calls that compile.

Example:
    >>> import torch
    >>> x = torch.randn(8, 3)
    >>> with CostCounter() as cost:
    ...     y = (x.t() * 2).sum()          # t() is a view: 2 kernel ops (mul, sum)
    ...     _ = float(y)                   # one host sync
    >>> cost.kernel_ops, cost.host_syncs
    (2, 1)
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose schema does not mark them as views but that launch no kernel: a view under another name,
# allocations without a fill, and metadata queries.
FREE_OPS = frozenset({
    aten._unsafe_view, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
    aten.is_same_size, aten._has_compatible_shallow_copy_type, aten.sym_size, aten.sym_stride, aten.sym_numel,
    aten.sym_storage_offset, aten.lift_fresh, aten.set_, aten.resize_,
})
# Operators whose output shape or Python result depends on tensor values: the host must wait for them.
SYNCING_OPS = frozenset({
    aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
    aten.unique_dim_consecutive, aten.equal, aten.allclose, aten.is_nonzero, aten.argwhere,
})


def _is_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet is aten._local_scalar_dense or packet in SYNCING_OPS:
        return True
    if packet is aten.repeat_interleave:  # the output length is the sum of the repeats, unless given
        repeats = args[0] if func is aten.repeat_interleave.Tensor else args[1]
        return kwargs.get("output_size") is None and isinstance(repeats, torch.Tensor)
    if packet is aten.bincount:  # the output length is the largest value, unless minlength covers it
        return True
    if packet in (aten.index, aten.index_put, aten.index_put_):  # boolean masks are turned into indices
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype == torch.bool for i in indices)
    if packet in (aten._to_copy, aten.copy_):  # a device tensor read back into host memory
        source = args[1] if packet is aten.copy_ else args[0]
        if not isinstance(source, torch.Tensor):
            return False
        target = args[0].device if packet is aten.copy_ else kwargs.get("device") or source.device
        return source.device.type != "cpu" and torch.device(target).type == "cpu"
    return False


def is_kernel(func) -> bool:
    """Whether an ATen operator launches work on a device (see the module docstring for what does not)."""
    packet = func.overloadpacket
    return not (func.is_view or packet in FREE_OPS or packet is aten._local_scalar_dense)


@dataclass
class Costs:
    """Counts of one measured region."""

    kernel_ops: int = 0
    host_syncs: int = 0
    graph_breaks: int = 0
    ops: Counter = field(default_factory=Counter)  # kernel ops by operator name
    sync_sites: List[str] = field(default_factory=list)  # where each sync happened, when asked for

    def as_dict(self) -> Dict[str, int]:
        return {"kernel_ops": self.kernel_ops, "host_syncs": self.host_syncs, "graph_breaks": self.graph_breaks}


class CostCounter(TorchDispatchMode):
    """Counts kernel ops and host syncs dispatched inside ``with CostCounter() as cost:``, and graph breaks.

    ``where=True`` keeps a short stack of each sync in ``cost.sync_sites`` (to find where syncs come from).
    """

    def __init__(self, where: bool = False):
        super().__init__()
        self.costs = Costs()
        self.where = where
        self._tolist: Optional[Callable] = None
        self._breaks = 0

    @property
    def kernel_ops(self) -> int:
        return self.costs.kernel_ops

    @property
    def host_syncs(self) -> int:
        return self.costs.host_syncs

    def _sync(self) -> None:
        self.costs.host_syncs += 1
        if self.where:
            frames = [f for f in traceback.extract_stack()[:-2] if "binom_opt" in f.filename or "benchmarks" in f.filename]
            self.costs.sync_sites.append(" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[::-1][:4]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self._sync()
        if is_kernel(func):
            self.costs.kernel_ops += 1
            self.costs.ops[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._breaks = graph_breaks()
        original, counter = torch.Tensor.tolist, self

        def tolist(tensor):  # dispatches no operator: one read of the whole tensor
            counter._sync()
            return original(tensor)

        self._tolist, torch.Tensor.tolist = original, tolist  # pyright: ignore[reportAttributeAccessIssue]
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist  # pyright: ignore[reportAttributeAccessIssue]
        self.costs.graph_breaks = graph_breaks() - self._breaks
        return super().__exit__(*exc)


def graph_breaks() -> int:
    """Graph breaks ``torch._dynamo`` has counted in this process so far (they happen when code is compiled)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a torch without dynamo compiles nothing
        return 0
    return sum(counters["graph_break"].values())


def count_costs(fn: Callable[[], object], where: bool = False) -> Costs:
    """The costs of one call of ``fn`` (e.g. one meta-step)."""
    with CostCounter(where) as counter:
        fn()
    return counter.costs
