"""How the CPU's ``memory_budget="auto"`` plans a meta-batch: vmapped tasks or a loop over them, by measured activations.

``engine.adapt_batch`` and ``functional.meta_gradient_batched`` run a meta-batch's tasks either vmapped together (one
call per inner step and per HVP round) or one after another. On a CPU, ``"auto"`` vmaps them where one HVP of every
task at once holds at most ``AUTO_VMAP_TASKS_CAP`` bytes of activations (measured once per support loss and shapes),
and loops above. This benchmark times both plans side by side on a sweep of model and batch sizes, with the measured
activations, so the cap sits where the faster plan changes. Times are CPU time per meta-step (``adapt_batch`` with
``Exact``, K = 5, and the backward of the whole meta-batch's query loss), the median of ``--repeats`` after a
warm-up, the two plans interleaved. One command::

    python benchmarks/task_plan.py      # writes benchmarks/results/task_plan_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import binom_opt as bo
from binom_opt.core import memory

from fewshot.models import Conv4
from overhead import RESULTS, write
from suite.report import cpu_model


def mlp(width: int, points: int, tasks: int):
    """The MAML paper's sine regression MLP (1-width-width-1), ``points`` support and query points per task."""
    model = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
    data = [torch.randn(tasks, points, 1) for _ in range(4)]
    return model, F.mse_loss, data


def conv4(hidden: int, tasks: int, ways: int = 5, queries: int = 15):
    """Conv4 on Omniglot shapes (1x28x28), 5-way 1-shot with 15 queries per class."""
    model = Conv4(out_features=ways, hidden=hidden)
    data = [torch.rand(tasks, ways, 1, 28, 28), torch.arange(ways).repeat(tasks, 1),
            torch.rand(tasks, ways * queries, 1, 28, 28), torch.arange(ways * queries).repeat(tasks, 1) % ways]
    return model, F.cross_entropy, data


SWEEP = [("MLP 1-40-40-1, 10 points", lambda b: mlp(40, 10, b), (25,)),
         ("MLP 1-160-160-1, 10 points", lambda b: mlp(160, 10, b), (25,)),
         ("MLP 1-40-40-1, 200 points", lambda b: mlp(40, 200, b), (25,)),
         ("MLP 1-320-320-1, 10 points", lambda b: mlp(320, 10, b), (25,)),
         ("MLP 1-640-640-1, 10 points", lambda b: mlp(640, 10, b), (25,)),
         ("Conv4-8, Omniglot 5-way 1-shot", lambda b: conv4(8, b), (4, 16)),
         ("Conv4-16, Omniglot 5-way 1-shot", lambda b: conv4(16, b), (8,)),
         ("Conv4-32, Omniglot 5-way 1-shot", lambda b: conv4(32, b), (4, 8)),
         ("Conv4-64, Omniglot 5-way 1-shot", lambda b: conv4(64, b), (4,))]


def meta_step(model, loss, data, steps: int):
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), steps, bo.Exact())
    xs, ys, xq, yq = data

    def run():
        learners = engine.adapt_batch(lambda m, t: loss(m(t[0]), t[1]), (xs, ys))
        out = learners(xq)
        engine.meta_backward(loss(out.flatten(0, 1), yq.flatten(0, 1)))
    return run


def timed(plans, model, repeats: int):
    times = {name: [] for name in plans}
    for i in range(repeats + 1):
        for name, (cap, run) in plans.items():
            memory.AUTO_VMAP_TASKS_CAP = cap
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            run()
            if i:
                times[name].append(1e3 * (time.process_time() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="two tiny settings, for the tests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cap = memory.AUTO_VMAP_TASKS_CAP
    sweep = [("MLP 1-8-8-1, 4 points", lambda b: mlp(8, 4, b), (2,)), ("Conv4-4, Omniglot", lambda b: conv4(4, b, 2, 2), (2,))] \
        if args.small else SWEEP
    rows = []
    try:
        for name, build, batches in sweep:
            for tasks in batches:
                torch.manual_seed(0)
                model, loss, data = build(tasks)
                step = meta_step(model, loss, data, 2 if args.small else args.steps)
                point = {n: p.detach() for n, p in model.named_parameters()}
                support = lambda p, t, model=model, loss=loss: loss(torch.func.functional_call(model, p, (t[0],)), t[1])
                per_task = memory.task_activations(support, point, tuple(data[:2]), "auto", ("task_plan", name))
                times = timed({"vmapped": (float("inf"), step), "loop": (-1, step)}, model, args.repeats)
                activations = None if per_task is None else per_task * tasks
                auto = "vmapped" if activations is not None and activations <= cap else "loop"
                faster = min(times, key=times.get)
                rows.append({"setting": name, "tasks": tasks, "activations_mib": None if activations is None else activations / 2**20,
                             "vmapped_ms": times["vmapped"], "loop_ms": times["loop"], "vmapped_vs_loop": times["vmapped"] / times["loop"],
                             "auto": auto, "faster": faster})
    finally:
        memory.AUTO_VMAP_TASKS_CAP = cap
    machine = f"{cpu_model()}, {args.threads} thread(s), torch {torch.__version__}"
    result = {"machine": machine, "repeats": args.repeats, "cap_mib": cap / 2**20, "rows": rows}
    lines = ["# The CPU's task plan: vmapped tasks or a loop, by measured activations", "",
             f"CPU time per meta-step (`adapt_batch`, Exact, K={args.steps}, SGD), median of {args.repeats} after a warm-up, "
             f"the plans interleaved. Machine: {machine}. The cap: {cap / 2**20:g} MiB of activations for one HVP of every task "
             "at once (measured for the first task, times B). Command: `python benchmarks/task_plan.py`.", "",
             "| setting | B | activations (MiB) | vmapped ms | loop ms | vmapped / loop | auto picks | faster |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    lines += [f"| {r['setting']} | {r['tasks']} | {r['activations_mib']:.2f} | {r['vmapped_ms']:.1f} | {r['loop_ms']:.1f} | "
              f"{r['vmapped_vs_loop']:.2f}x | {r['auto']} | {r['faster']} |" for r in rows]
    return write(args.out, "task_plan_cpu", result, lines)


if __name__ == "__main__":
    main()
