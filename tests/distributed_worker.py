"""One rank of a sharded meta-step, run in a child process by tests/test_distributed.py."""

import datetime
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import binom_opt as bo

from cases import conv_bn

TASKS = 4


def meta_batch():
    gen = torch.Generator().manual_seed(7)
    xs, xq = torch.randn(TASKS, 6, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randn(TASKS, 9, 1, 6, 6, generator=gen, dtype=torch.float64)
    return xs, torch.randint(0, 3, (TASKS, 6), generator=gen), xq, torch.randint(0, 3, (TASKS, 9), generator=gen)


def meta_step(estimator, rank=0, world=1, fail=False):
    """One Adam meta-step on this rank's share of the meta-batch; returns the new parameters."""
    model = conv_bn(seed=3).model
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=3, estimator=estimator)
    meta_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xs, ys, xq, yq = meta_batch()
    for t in bo.distributed.shard(TASKS, rank, world):
        learner = engine.adapt(lambda m, x=xs[t], y=ys[t]: F.cross_entropy(m(x), y))
        (F.cross_entropy(learner(xq[t]), yq[t]) / TASKS).backward()
    if fail:
        raise RuntimeError(f"injected failure on rank {rank}")
    bo.distributed.all_reduce_gradients(model.parameters())
    meta_opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_rank(rank, world, init_file, out_dir, estimator, fail_rank=-1):
    out = Path(out_dir)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )
        params = meta_step(estimator, rank, world, fail=rank == fail_rank)
        torch.save(params, out / f"rank{rank}.pt")
        # every rank done before any tears its process group down: a rank that destroys it while the other still talks
        # to it was seen to abort (SIGABRT from gloo) once in a full local run
        dist.barrier()
    except BaseException as error:
        (out / f"rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
