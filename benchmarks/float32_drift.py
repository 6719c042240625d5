"""How far the float32 Exact meta-gradient is from the float64 one at long horizons, on the distillation model.

The model, data and loss of ``examples/dataset_distillation.py`` (its ConvNet on one real drawing per Omniglot
character as the synthetic images, a random initialisation, K plain SGD steps, the query loss on the real
training drawings). For each K the same inputs run in float64 (the reference) and in float32:

- ``Exact``, graph-free: replays the support loss at the recorded points;
- ``Exact`` with ``checkpoint_every = round(sqrt(K))``: also recomputes the points between checkpoints;
- autograd through the unrolled loop (``create_graph=True``), the float32 rounding any method has, where its
  memory allows (K <= --unrolled-max-k, default 1000: about 0.5 GiB);

and the relative error ``||g32 - g64|| / ||g64||`` of the images' meta-gradient and of the initialisation's, and
how far the float32 inner loop's end point ``phi_K`` is from float64's. One command, JSON and markdown::

    python benchmarks/float32_drift.py --threads 2      # K = 10, 100, 1000; writes benchmarks/results/float32_drift_cpu.*
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import binom_opt as bo
from binom_opt.functional import meta_gradient

from fewshot.distillation import Characters, ConvNet, random_init

RESULTS = Path(__file__).resolve().parent / "results"


def problem(chars: Characters, hidden: int, dtype: torch.dtype):
    """``(net, init, images, labels, real, real_labels)`` in ``dtype``, the same values for every dtype."""
    net = ConvNet(chars.classes, hidden).to(dtype)
    init = {n: p.to(dtype) for n, p in random_init(ConvNet(chars.classes, hidden), seed=0).items()}
    real, real_labels = chars.flat("train")
    return net, init, chars.random_real(1, seed=0).to(dtype), torch.arange(chars.classes), real.to(dtype), real_labels


def losses(net, images, labels, real, real_labels):
    call = lambda p, x: torch.func.functional_call(net, p, (x,))
    return (lambda p: F.cross_entropy(call(p, images), labels)), (lambda p: F.cross_entropy(call(p, real), real_labels))


def graph_free(chars, hidden, dtype, steps, lr, checkpoint_every=None):
    """Exact's meta-gradient of the images and of the initialisation, flattened, and phi_K."""
    net, init, images, labels, real, real_labels = problem(chars, hidden, dtype)
    images.requires_grad_(True)
    inner, outer = losses(net, images, labels, real, real_labels)
    grads = meta_gradient(inner, outer, init, steps=steps, lr=lr, estimator=bo.Exact(), meta_params={"images": images},
                          checkpoint_every=checkpoint_every, memory_budget="inner_step")
    return grads["images"].flatten(), torch.cat([grads[n].flatten() for n in init]), final_point(inner, init, steps, lr)


def unrolled(chars, hidden, dtype, steps, lr):
    """The same meta-gradients by autograd through the unrolled loop (the whole graph kept)."""
    net, init, images, labels, real, real_labels = problem(chars, hidden, dtype)
    images.requires_grad_(True)
    inner, outer = losses(net, images, labels, real, real_labels)
    start = {n: p.clone().requires_grad_(True) for n, p in init.items()}
    params = start
    for _ in range(steps):
        grads = torch.autograd.grad(inner(params), list(params.values()), create_graph=True)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    g_images, *g_init = torch.autograd.grad(outer(params), [images, *start.values()])
    return g_images.flatten(), torch.cat([g.flatten() for g in g_init])


def final_point(inner, init, steps, lr):
    params = dict(init)
    for _ in range(steps):
        params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        grads = torch.autograd.grad(inner(params), list(params.values()))
        params = {n: p.detach() - lr * g for (n, p), g in zip(params.items(), grads)}
    return torch.cat([p.flatten() for p in params.values()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(chars, args, steps: int) -> dict:
    every = max(1, round(math.sqrt(steps)))
    tic = time.perf_counter()
    ref_images, ref_init, ref_phi = graph_free(chars, args.hidden, torch.float64, steps, args.lr)
    row = {"K": steps, "checkpoint_every": every, "seconds_float64": time.perf_counter() - tic,
           "phi_K_drift": relative(graph_free_phi(chars, args, steps), ref_phi)}
    runs = {"exact": lambda: graph_free(chars, args.hidden, torch.float32, steps, args.lr)[:2],
            "exact_checkpointed": lambda: graph_free(chars, args.hidden, torch.float32, steps, args.lr, every)[:2],
            "exact_float64_checkpointed": lambda: graph_free(chars, args.hidden, torch.float64, steps, args.lr, every)[:2]}
    if steps <= args.unrolled_max_k:
        runs["unrolled_autograd"] = lambda: unrolled(chars, args.hidden, torch.float32, steps, args.lr)
    for name, run in runs.items():
        try:
            g_images, g_init = run()
            row[name] = {"images": relative(g_images, ref_images), "init": relative(g_init, ref_init)}
        except Exception as e:  # a method that refuses (e.g. a replay check) is a finding, reported as such
            row[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"K={steps} {name}: {row[name]}", file=sys.stderr, flush=True)
    return row


def graph_free_phi(chars, args, steps):
    net, init, images, labels, real, real_labels = problem(chars, args.hidden, torch.float32)
    return final_point(losses(net, images, labels, real, real_labels)[0], init, steps, args.lr)


def markdown(result: dict) -> str:
    cell = lambda r: r["error"].split(":")[0] if "error" in r else f"{r['images']:.1e} / {r['init']:.1e}"
    lines = ["Relative error of the float32 meta-gradient against float64 (images / initialisation), "
             f"{result['setup']}:", "",
             "| K | Exact (graph-free) | Exact, checkpoint_every=√K | unrolled autograd (float32) | float64 checkpointed vs "
             "float64 | float32 φ_K vs float64 |", "|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['K']} | {cell(row['exact'])} | {cell(row['exact_checkpointed'])} (m={row['checkpoint_every']}) | "
                     + (cell(row["unrolled_autograd"]) if "unrolled_autograd" in row else "not run (memory)")
                     + f" | {cell(row['exact_float64_checkpointed'])} | {row['phi_K_drift']:.1e} |")
    lines += ["", f"{result['machine']}, torch {result['torch']}, {result['threads']} threads, {result['seconds']:.0f} s."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--unrolled-max-k", type=int, default=1000,
                   help="largest K for the unrolled float32 autograd reference (its graph: about 0.5 MiB per step)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "float32_drift_cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", bo.ExpansionDivergenceWarning)
    tic = time.perf_counter()
    chars = Characters.load(args.classes, seed=0, data_root=args.data_root, cache_dir=args.cache_dir, verbose=False)
    rows = [measure(chars, args, k) for k in args.ks]
    result = {"setup": f"ConvNet(hidden={args.hidden}) of the distillation example, {args.classes} Omniglot characters, "
                       f"one real drawing each as the synthetic images, SGD lr {args.lr}, one random initialisation",
              "rows": rows, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "seconds": time.perf_counter() - tic}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
