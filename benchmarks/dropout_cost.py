"""Time per meta-step with dropout on and off: the cost of replaying each inner step's random draws.

An MLP classifier (64-256-256-5, ReLU, ``Dropout(p)`` after each hidden layer), K plain SGD steps, a
meta-batch of B tasks adapted one after another, as a per-task loop does. Side by side in one run, each
with dropout ``p`` in train mode and without dropout:

- ``hand-written exact``: the loop unrolled with ``torch.autograd.grad(create_graph=True)`` (learn2learn's idiom), and its
  first-order twin;
- ``higher``: ``higher.innerloop_ctx``;
- ``bo.MAML`` with ``Exact``, ``Binomial(1)`` and ``FirstOrder`` (``randomness="replay"``, the default).

Every method draws the same masks under one seed and the exact ones give the same meta-gradient
(``tests/test_context.py`` checks it). Times are the process's CPU time, the median of ``--repeats`` after two warm-ups, methods interleaved;
ratios are against the hand-written loop with the same dropout. One command, JSON and markdown::

    python benchmarks/dropout_cost.py        # 1 thread; writes benchmarks/results/dropout_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


from overhead import median_ms, per_task, write
from suite.report import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def model_with(p: float, width: int, features: int = 64, ways: int = 5) -> nn.Module:
    torch.manual_seed(0)
    drop = (lambda: nn.Dropout(p)) if p > 0 else nn.Identity
    return nn.Sequential(nn.Linear(features, width), nn.ReLU(), drop(), nn.Linear(width, width), nn.ReLU(), drop(),
                         nn.Linear(width, ways))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=float, default=0.1, help="dropout probability")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is measured: 1 keeps it wall time)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    tasks = [(torch.randn(5, 64, generator=gen), torch.arange(5), torch.randn(75, 64, generator=gen), torch.arange(75) % 5)
             for _ in range(args.tasks)]
    rows = []
    for p in (0.0, args.p):
        model = model_with(p, args.width)
        times = median_ms(per_task(model, tasks, F.cross_entropy, args.steps, 0.1), model, args.repeats)
        rows += [{"method": name, "dropout": p, "ms": ms, "vs_hand_written": ms / times["hand-written exact"],
                  "vs_higher": ms / times["higher"]} for name, ms in times.items()]
    off = {r["method"]: r["ms"] for r in rows if r["dropout"] == 0.0}
    for row in rows:
        row["dropout_cost"] = row["ms"] / off[row["method"]]
    machine = f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}"
    result = {"machine": machine, "setting": vars(args) | {"out": str(args.out)}, "rows": rows}
    lines = [f"# Time per meta-step with dropout {args.p} and without", "",
             f"MLP 64-{args.width}-{args.width}-5, K={args.steps} SGD steps at lr 0.1, {args.tasks} tasks of 5 support and "
             f"75 query examples adapted one after another; CPU time per meta-step, median of {args.repeats} after 2 warm-ups, "
             f"the methods interleaved. Machine: {machine}.", "",
             "| method | dropout | ms per meta-step | vs hand-written | vs higher | vs the same method without dropout |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['dropout']} | {r['ms']:.1f} | {r['vs_hand_written']:.2f}x | {r['vs_higher']:.2f}x | "
              f"{r['dropout_cost']:.2f}x |" for r in rows]
    return write(args.out, "dropout_cpu", result, lines)


if __name__ == "__main__":
    main()
