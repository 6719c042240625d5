"""Meta-batches sharded over processes with ``torch.distributed`` (launched by ``torchrun``).

The meta-gradient of a meta-batch is a sum over tasks, so sharding is exact: every rank draws
the same meta-batch (same seeded task stream), adapts and back-propagates only its share of the
tasks (:func:`shard`) with each task's loss divided by the *global* meta-batch size, and
:func:`all_reduce_gradients` sums the gradients over ranks. The outer optimizer then takes the
same step on every rank, as a single process would on the whole meta-batch::

    rank, world = bo.distributed.init_from_env()                # torchrun sets the environment
    for t in bo.distributed.shard(len(tasks), rank, world):
        learner = engine.adapt(lambda m, x=x_s[t], y=y_s[t]: F.cross_entropy(m(x), y))
        (F.cross_entropy(learner(x_q[t]), y_q[t]) / len(tasks)).backward()
    bo.distributed.all_reduce_gradients(model.parameters())
    meta_opt.step()

An all-reduce of meta-gradients is used rather than ``DistributedDataParallel``: DDP expects
its own ``forward`` before every backward and buckets gradients as they appear, whereas the
meta-gradient of the adapted parameters arrives all at once from the estimator node, after
the query forward. One flat all-reduce per meta-step is what DDP would do in the end.

If one rank fails, the others would wait in the all-reduce: :func:`all_reduce_gradients` turns
the collective's error (the failed peer's closed connection, or the process group's timeout)
into a clear error naming this rank, so every rank stops instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from typing import Iterable, Tuple

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "shard", "all_reduce_gradients", "is_main_process", "PeerFailure"]


class PeerFailure(RuntimeError):
    """A collective failed on this rank, almost always because another rank stopped."""


def init_from_env(device: torch.device = torch.device("cpu"), timeout_s: float = 300.0) -> Tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; ``(rank, world_size)``.

    Without ``WORLD_SIZE`` in the environment (a plain ``python script.py`` run) nothing is
    initialised and ``(0, 1)`` is returned. The backend is NCCL for CUDA devices, gloo otherwise;
    ``timeout_s`` bounds how long a collective waits for a rank that has stopped.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def shard(tasks: int, rank: int, world: int) -> range:
    """The task indices of a meta-batch of ``tasks`` that ``rank`` of ``world`` processes.

    >>> [list(shard(5, r, 2)) for r in range(2)]
    [[0, 2, 4], [1, 3]]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}.")
    return range(rank, tasks, world)


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the one that logs and writes checkpoints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_gradients(params: Iterable[torch.Tensor], op: str = "sum") -> None:
    """Sum (or average, ``op="mean"``) the ``.grad`` of ``params`` over all ranks, in place.

    One flat all-reduce for all gradients. Parameters without a gradient on this rank take part
    with zeros (and get the reduced gradient), so every rank issues the same collective.
    Without a process group this does nothing.

    Raises:
        PeerFailure: the collective failed (another rank stopped, or the timeout passed).
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}.")
    params = [p for p in params if p.requires_grad]
    if not dist.is_initialized() or dist.get_world_size() == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    try:
        dist.all_reduce(flat)
    except Exception as error:  # gloo and NCCL raise RuntimeError or DistBackendError subclasses
        raise PeerFailure(
            f"rank {dist.get_rank()}: the all-reduce of meta-gradients failed ({type(error).__name__}: {error}). "
            "Another rank has most likely stopped with an error; see its output. Stopping this rank too."
        ) from error
    if op == "mean":
        flat /= dist.get_world_size()
    offset = 0
    for p in params:
        chunk = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
