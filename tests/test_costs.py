"""Budgets of one meta-step, counted (benchmarks/suite/costs.py): kernel ops within 5 % of their pins, host syncs exact.

On a GPU a small model's meta-step is launch-bound, so the number of kernels it dispatches and the number of
times the host waits for the device predict its time; both are deterministic for a torch version. They are
counted with ``memory_budget=None`` (everything at once, what a GPU with room runs) on a tiny Conv4, against
higher's exact MAML counted in the same test.
"""

import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import binom_opt as bo

from suite.configs import CONFIGS, build_batch, build_model
from suite.costs import CostCounter, count_costs, graph_breaks
from suite.methods import all_methods, make_step

# Conv4-4 on 1x28x28, 5-way 1-shot, 3 queries per class, K = 5 inner steps: the layers and steps of the
# Omniglot benchmark, with the meta-batch B of each row (per-task counts grow with B, batched ones do not).
CFG = replace(CONFIGS["tiny"], hidden=4, steps=5)
PER_TASK_B, BATCHED_B = 2, 32

# Kernel ops per meta-step, by (torch major.minor, device type): a count 5 % above its pin fails (a change
# launches more kernels), and so does one 5 % below (the pin must then be lowered to keep it honest).
PINS = {
    ("2.13", "cpu"): {
        ("higher", PER_TASK_B): 6_126,
        ("exact-task", PER_TASK_B): 5_880,
        ("binom1-task", PER_TASK_B): 2_074,
        ("higher", BATCHED_B): 98_286,
        ("exact-batch", BATCHED_B): 4_416,
        ("binom1-batch", BATCHED_B): 1_775,
    },
}
TOLERANCE = 0.05
# Host syncs per meta-step: one per task's meta-gradient on the per-task path, one per meta-step batched.
SYNCS = {"higher": 0, "exact-task": PER_TASK_B, "binom1-task": PER_TASK_B, "exact-batch": 1, "binom1-batch": 1}
# Targets against higher's kernel ops: per-task Exact near higher's (each HVP replays one forward and backward
# that higher keeps in its graph), and the batched path launching a few percent of higher's kernels.
RATIOS = {"exact-task": 1.0, "exact-batch": 0.06, "binom1-batch": 0.03}

METHODS = {m.slug: m for m in all_methods(CFG)}


def device() -> torch.device:
    return torch.empty(0).device  # the conftest's --device


def pins():
    key = (".".join(torch.__version__.split(".")[:2]), device().type)
    if key not in PINS:
        pytest.skip(f"kernel-op pins are for torch/device {sorted(PINS)}, not {key}: add the counts this test prints for {key}")
    return PINS[key]


def count(slug: str, B: int):
    cfg = replace(CFG, meta_batch=B)
    step = make_step(METHODS[slug], build_model(cfg, device()), build_batch(cfg, device()), cfg, {"memory_budget": None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bo.ExpansionDivergenceWarning)  # lr 0.4 on a random Conv4: flagged, not counted
        return count_costs(step)


@pytest.fixture(scope="module")
def counts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # counts do not depend on it; on a busy machine more threads only wait on each other
    try:
        rows = {(slug, B): count(slug, B) for slug, B in pins()}
    finally:
        torch.set_num_threads(threads)
    print({f"{slug} B={B}": c.as_dict() for (slug, B), c in rows.items()})
    return rows


@pytest.mark.parametrize("slug, B", list(PINS[("2.13", "cpu")]))
def test_kernel_ops_stay_within_their_pins(counts, slug, B):
    got, pin = counts[(slug, B)].kernel_ops, pins()[(slug, B)]
    assert got <= pin * (1 + TOLERANCE), (
        f"{slug} at B={B} dispatches {got} kernel ops per meta-step, more than {TOLERANCE:.0%} above its pin {pin}: "
        f"a change launches more kernels (by operator: {counts[(slug, B)].ops.most_common(8)})."
    )
    assert got >= pin * (1 - TOLERANCE), (
        f"{slug} at B={B} dispatches {got} kernel ops per meta-step, more than {TOLERANCE:.0%} below its pin {pin}: "
        f"lower the pin in tests/test_costs.py to {got}."
    )


@pytest.mark.parametrize("slug, B", list(PINS[("2.13", "cpu")]))
def test_one_host_sync_per_meta_gradient(counts, slug, B):
    syncs = counts[(slug, B)].host_syncs
    assert syncs == SYNCS[slug], f"{slug} at B={B}: {syncs} host syncs per meta-step, expected {SYNCS[slug]}"


@pytest.mark.parametrize("slug", list(RATIOS))
def test_kernel_ops_against_higher(counts, slug):
    B = next(b for s, b in counts if s == slug)
    ratio = counts[(slug, B)].kernel_ops / counts[("higher", B)].kernel_ops
    assert ratio <= RATIOS[slug], f"{slug}: {ratio:.4f}x higher's kernel ops at B={B}, above the target {RATIOS[slug]}x"


def test_counter_counts_a_vmapped_op_once_and_every_sync():
    x = torch.randn(32, 3)
    with CostCounter() as cost:
        torch.vmap(lambda row: (row * 2).sin().sum())(x)  # 3 batched kernels for 32 rows
    assert (cost.kernel_ops, cost.host_syncs) == (3, 0)
    with CostCounter() as cost:
        torch.vmap(torch.func.grad(lambda row: (row * 2).sin().sum()))(x)  # forward 3, backward ones_like, cos, 2 mul
    assert (cost.kernel_ops, cost.host_syncs) == (7, 0)
    with CostCounter() as cost:
        y = x.t().unsqueeze(0).expand(2, 3, 32).detach()  # views launch nothing
        _ = (bool(y.sum() > 0), float(y.max()), y[0, 0, 0].item(), y[0].tolist(), x[x > 0])
    assert (cost.kernel_ops, cost.host_syncs) == (5, 5)  # sum, gt, max, gt, index; 3 scalar reads, tolist, a mask


def test_graph_breaks_of_compiled_code_are_counted():
    """Counted where the code compiles, outside the counter: under a dispatch mode dynamo runs code eagerly."""

    def f(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    torch._dynamo.reset()
    before = graph_breaks()
    compiled = torch.compile(f, backend="eager")
    compiled(torch.randn(3))
    assert graph_breaks() - before == 1
    with CostCounter() as cost:
        compiled(torch.randn(3))
    assert cost.kernel_ops == 3  # randn, and sin and cos run eagerly


@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Binomial(1)], ids=repr)
def test_a_checkpointed_meta_gradient_reads_the_host_once(estimator):
    """checkpoint_every recomputes segments during the expansion; their agreement with the inner loop is read
    with the other checks, not once per recomputed step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device())
    x, y = torch.randn(6, 4, device=device()), torch.arange(6, device=device()) % 3
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=9, estimator=estimator,
                                   checkpoint_every=3, memory_budget=None)
    learner = engine.adapt(lambda m: torch.nn.functional.cross_entropy(m(x), y))
    loss = torch.nn.functional.cross_entropy(learner(x), y)
    assert count_costs(lambda: engine.meta_backward(loss)).host_syncs == 1
