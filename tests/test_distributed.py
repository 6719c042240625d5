"""Meta-batches sharded over 2 gloo processes: same step as one process, and no hang when a rank fails."""

import pytest
import torch
import torch.multiprocessing as mp

import binom_opt as bo

import references as R
from distributed_worker import meta_step, run_rank

pytestmark = pytest.mark.cpu_only  # the example scripts, processes and files run on the host

WORLD = 2


def launch(tmp_path, estimator, fail_rank=-1, timeout=120):
    ctx = mp.get_context("spawn")
    init_file = tmp_path / "init"
    procs = [ctx.Process(target=run_rank, args=(r, WORLD, str(init_file), str(tmp_path), estimator, fail_rank)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"ranks still running after {timeout} s: the run hung"
    return [p.exitcode for p in procs]


@pytest.mark.parametrize("estimator", [bo.Binomial(2), bo.Exact()], ids=["binomial2", "exact"])
def test_sharded_meta_step_equals_single_process(tmp_path, estimator):
    expected = meta_step(estimator)
    assert launch(tmp_path, estimator) == [0] * WORLD, [f.read_text() for f in tmp_path.glob("*.err")]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert R.relative_error(got, expected) < 1e-12, rank


def test_a_failing_rank_stops_every_rank_with_a_clear_error(tmp_path):
    exitcodes = launch(tmp_path, bo.Binomial(1), fail_rank=1, timeout=90)
    assert all(code != 0 for code in exitcodes)
    assert "injected failure on rank 1" in (tmp_path / "rank1.err").read_text()
    survivor = (tmp_path / "rank0.err").read_text()
    assert survivor.startswith("PeerFailure: rank 0: the all-reduce of meta-gradients failed")
    assert "Another rank has most likely stopped" in survivor


def test_shard_and_reduce_without_a_process_group():
    assert list(bo.distributed.shard(3, 0, 1)) == [0, 1, 2]
    with pytest.raises(ValueError, match="rank"):
        bo.distributed.shard(3, 2, 2)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    bo.distributed.all_reduce_gradients([p])  # no process group: unchanged
    assert torch.equal(p.grad, torch.full((2,), 3.0)) and bo.distributed.is_main_process()
    assert bo.distributed.init_from_env() == (0, 1)
