"""Task-batched vs per-task meta-gradients, with higher's exact MAML as the peer, in one run.

Omniglot-shaped tasks (random images; the data do not change the cost): Conv4 on 28x28x1,
5-way 1-shot, 15 queries per class, K inner SGD steps, a meta-batch of B tasks. For each
estimator it times one meta-gradient of the whole meta-batch computed

* per task: ``functional.meta_gradient`` in a Python loop over the B tasks (how every existing
  library runs), and
* batched: ``functional.meta_gradient_batched``, one vmapped call per inner step and HVP round;

and higher's exact unrolled meta-gradient (per-task loop) as the peer. Median wall time over
``--repeats`` runs after one warm-up, in the same process. Writes JSON and a markdown table.

    python benchmarks/task_batching.py                 # meta-batch 32, a few minutes on 2 CPU cores
    python benchmarks/task_batching.py --quick         # meta-batch 8, under a minute
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import binom_opt as bo  # noqa: E402
from binom_opt.functional import meta_gradient, meta_gradient_batched  # noqa: E402
from fewshot.models import Conv4  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="meta-batch 8, hidden 32, 2 repeats")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    if args.quick:
        args.meta_batch, args.hidden, args.repeats = 8, 32, 2
    return args


def make_tasks(B, generator):
    x_s = torch.rand(B, 5, 1, 28, 28, generator=generator)
    x_q = torch.rand(B, 75, 1, 28, 28, generator=generator)
    y_s, y_q = torch.arange(5).repeat(B, 1), torch.arange(75).remainder(5).repeat(B, 1)
    return {"support": (x_s, y_s), "query": (x_q, y_q)}


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Conv4(out_features=5, hidden=args.hidden)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tasks = make_tasks(args.meta_batch, torch.Generator().manual_seed(0))
    B, K, lr = args.meta_batch, args.steps, 0.4

    def loss(part):
        return lambda p, task: F.cross_entropy(functional_call(model, p, (task[part][0],)), task[part][1])

    def per_task(estimator):
        for t in range(B):
            task = {part: (x[t], y[t]) for part, (x, y) in tasks.items()}
            meta_gradient(lambda p: loss("support")(p, task), lambda p: loss("query")(p, task), params,
                          steps=K, lr=lr, estimator=estimator)

    def batched(estimator):
        meta_gradient_batched(loss("support"), loss("query"), params, tasks, steps=K, lr=lr, estimator=estimator)

    def higher_exact():
        import higher

        for t in range(B):
            (xs, ys), (xq, yq) = ((x[t], y[t]) for x, y in tasks.values())
            with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=lr), copy_initial_weights=False) as (f, opt):
                for _ in range(K):
                    opt.step(F.cross_entropy(f(xs), ys))
                torch.autograd.grad(F.cross_entropy(f(xq), yq), list(model.parameters()))

    rows = [{"method": "higher exact (per task)", "seconds": median_seconds(higher_exact, args.repeats)}]
    peer = rows[0]["seconds"]
    for estimator in (bo.FirstOrder(), bo.Binomial(1), bo.Binomial(2), bo.Exact()):
        loop = median_seconds(lambda: per_task(estimator), args.repeats)
        vmapped = median_seconds(lambda: batched(estimator), args.repeats)
        for how, seconds in (("per task", loop), ("batched", vmapped)):
            rows.append({"method": f"{estimator!r} ({how})", "seconds": seconds})
        rows[-1]["batched_over_per_task"] = vmapped / loop
    for row in rows:
        row["vs_higher_exact"] = row["seconds"] / peer
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    config = {"meta_batch": B, "steps": K, "hidden": args.hidden, "repeats": args.repeats, "machine": machine}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "task_batching.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    lines = [
        f"Meta-gradient of one meta-batch: Conv4-{args.hidden}, 28x28, 5-way 1-shot, 15 queries, K={K}, "
        f"B={B}; median of {args.repeats} (CPU: {machine}).",
        "",
        "| method | seconds | vs higher exact | batched / per task |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = f"{row['batched_over_per_task']:.2f}" if "batched_over_per_task" in row else ""
        lines.append(f"| {row['method']} | {row['seconds']:.3f} | {row['vs_higher_exact']:.3f} | {ratio} |")
    table = "\n".join(lines)
    (args.out / "task_batching.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
