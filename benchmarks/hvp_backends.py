"""Which HVP backend to use on this device: reverse-over-reverse, forward-over-reverse, torch.compile.

Times one batched HVP round, the unit of work of every estimator, on Omniglot-shaped tasks
(Conv4 on 28x28x1, 5-way 1-shot support sets, random images: the values do not change the
cost): ``--points`` trajectory points of one task (the per-task path) and the same points of
``--tasks`` tasks at once (the task-batched path). For each backend: the median time after
warm-up and, for ``torch.compile``, the compile time of the first call. Writes JSON and a
markdown table.

    python benchmarks/hvp_backends.py --device cpu          # about two minutes on 2 CPU cores
    python benchmarks/hvp_backends.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from binom_opt.core.oracle import hvp_function

from fewshot.models import Conv4
from suite.report import machine_info, machine_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--points", type=int, default=5)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return p.parse_args(argv)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeats, device):
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # the TF32 default would change the numbers compared
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    model = Conv4(out_features=5, hidden=args.hidden, image_size=args.image_size).to(device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.rand(args.tasks, 5, 1, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.arange(5, device=device).repeat(args.tasks, 1)

    def stacked(*lead):
        return {n: (p + 0.01 * torch.randn(*lead, *p.shape, generator=gen).to(device)) for n, p in params.items()}

    def loss(p, task):  # the support loss of one task, as binom_opt's oracle sees it
        return F.cross_entropy(functional_call(model, p, (task[0],)), task[1])

    def per_task_round(mode):
        hvp = hvp_function(loss, mode)
        return lambda points, vectors: vmap(hvp, in_dims=(0, 0, None))(points, vectors, (x[0], y[0]))

    def batched_round(mode):
        over_tasks = vmap(hvp_function(loss, mode))
        return lambda points, vectors: vmap(over_tasks, in_dims=(0, 0, None))(points, vectors, (x, y))

    shapes = {"per task": (args.points,), "task-batched": (args.points, args.tasks)}
    rounds = {"per task": per_task_round, "task-batched": batched_round}
    rows = []
    for path, build in rounds.items():
        points, vectors = stacked(*shapes[path]), stacked(*shapes[path])
        backends = [("rev", build("rev")), ("fwd", build("fwd"))]
        if not args.no_compile:
            backends.append(("rev + torch.compile", torch.compile(build("rev"), dynamic=False)))
        for name, fn in backends:
            row = {"path": path, "backend": name, "hvps": int(torch.tensor(shapes[path]).prod())}
            start = time.perf_counter()
            try:
                fn(points, vectors)
                synchronize(device)
                row["first_call_s"] = time.perf_counter() - start
                row["ms"] = median_ms(lambda: fn(points, vectors), args.repeats, device)
            except Exception as error:  # a backend that fails here is a result too
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            rows.append(row)
            print(f"{path:13s} {name:22s} {row.get('ms', float('nan')):9.1f} ms  {row.get('error', '')}", file=sys.stderr)
    for row in rows:
        base = next(r for r in rows if r["path"] == row["path"] and r["backend"] == "rev")
        if "ms" in row and "ms" in base:
            row["vs_rev"] = row["ms"] / base["ms"]
    machine = machine_text(machine_info(args))
    command = "python benchmarks/hvp_backends.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"machine": machine, "command": command.strip(), "hidden": args.hidden, "rows": rows}
    lines = [
        f"One batched HVP round, Conv4-{args.hidden} on 28x28x1, 5-way 1-shot support sets; {args.points} trajectory "
        f"points (x {args.tasks} tasks when task-batched); median of {args.repeats} after warm-up.",
        f"Machine: {machine}. Command: `{command.strip()}`.",
        "",
        "| path | backend | HVPs | ms per round | vs rev | first call (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | {r['backend']} | {r['hvps']} | failed: {r['error']} | | |")
        else:
            lines.append(
                f"| {r['path']} | {r['backend']} | {r['hvps']} | {r['ms']:.1f} | {r['vs_rev']:.2f} | {r['first_call_s']:.1f} |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"hvp_backends_{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
