"""Cost and accuracy of every estimator next to exact MAML by higher and by autograd, in one run.

For each method it measures one meta-step (the meta-gradient of the whole meta-batch into
``.grad``) on few-shot tasks of the given shapes: the median wall time after one warm-up, the
peak memory, the Hessian-vector products taken, and the relative error of the meta-gradient
against exact MAML (autograd unrolled with ``create_graph=True``) in float64. Every method runs
in child processes of its own, so that the peak memory of one does not hide another's.

Methods (``--methods`` takes shell-style patterns over these names, e.g. ``'*-task' higher``):

* ``higher``: ``higher.innerloop_ctx`` exact MAML, a Python loop over the tasks;
* ``autograd``: unrolled ``torch.func.functional_call`` + ``torch.autograd.grad(create_graph=True)``
  (the learn2learn way), a loop over the tasks; also the reference of the error column;
* ``fo``, ``trunc<L>``, ``binom<L>``, ``hybrid<L>.<C>``, ``exact``, ``imaml<L>`` (``Implicit(L, reg=1)``, L
  conjugate-gradient steps), ``reptile``: binom_opt's estimators through
  ``MetaGradientEngine``, with the suffix ``-task`` (``engine.adapt`` in a loop over the tasks) or
  ``-batch`` (``engine.adapt_batch``, the tasks vmapped), and (only when ``--methods`` asks for them) with
  ``-ftask`` (``functional.meta_gradient`` in a loop over the tasks) or ``-fbatch``
  (``functional.meta_gradient_batched``).

Configs (random data of the real shapes: the values of the data do not change the cost):

* ``omniglot``: Conv4-64 on 1x28x28, 5-way 1-shot, 15 queries per class, K=5 at lr 0.4, B=32;
* ``miniimagenet``: Conv4-32 on 3x84x84, 5-way 5-shot, 15 queries per class, K=10 at lr 0.01, B=4.

Commands::

    python benchmarks/run.py --config omniglot --quick         # B=4, Conv4-32: about 2 minutes on 2 CPU cores
    python benchmarks/run.py --config miniimagenet --quick     # B=2, Conv4-16 on 3x42x42: about 4.5 minutes
    python benchmarks/run.py --config omniglot                 # the full table (much longer on a CPU)
    python benchmarks/run.py --config omniglot --device cuda
    python benchmarks/run.py --config omniglot --quick --methods higher 'exact-*' 'binom*'

Writes ``<config>_<device>[_quick].{json,md,png}`` to ``--out`` and prints the markdown. The
plot needs matplotlib (the ``examples`` extra) and is skipped without it.

A second table gives the peak memory of ``higher``, ``exact-task`` and ``exact-batch`` (those of
them that ``--methods`` selects) at each K of ``--ks``, one meta-step each, to show how it grows
with the number of inner steps.

Relative error: ``||g - g_exact|| / ||g_exact||`` over all parameters concatenated, after the
timings, with the model and the fixed meta-batch cast to float64 on the run's device (so TF32 plays
no part on CUDA); ``g_exact`` is the ``autograd`` method's float64 meta-gradient. The timings use
float32 and torch's default precision settings.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
minus the memory allocated just before the method's first call. On the CPU the peak resident
set size of the child (``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs`` just before the first call) minus its resident set size at that
moment (``/proc/self/statm``). ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: Linux carries
the parent's peak over into a child across fork and exec, so it can report the parent's memory.
The memory is measured in a second child per method, one meta-step, with glibc's mmap threshold
fixed at 131072 bytes (``mallopt``, as ``MALLOC_MMAP_THRESHOLD_=131072`` would; an explicit
``MALLOC_MMAP_THRESHOLD_`` wins): with glibc's adaptive threshold, freed tensors fragment the heap
and the resident peak grows with the number of allocations rather than with the live tensors; the
fixed threshold would slow the timed child 3-4x (see ``MMAP_THRESHOLD``). The children are forked
from a server process that has imported torch and binom_opt (``multiprocessing``'s forkserver); a
memory child maps the shared libraries' pages before its baseline, so that library code run for
the first time is not counted as the method's memory.

The code is in ``benchmarks/suite/``, one module per concern (configs, methods, measure, children,
results, report); this file is the command line.

Timings need an otherwise idle machine: with another process busy on the same cores, torch's
worker threads wait on each other and small meta-steps can take many times longer (use
``--threads 1`` on a shared machine).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import MIB, log
from suite.children import run_job
from suite.configs import CONFIGS, Config, build_model, config_from_args
from suite.methods import OTHER_OBJECTIVES, Method, all_methods, flagged, make_engine, select_methods
from suite.report import fmt_error, machine_info, machine_text, markdown, memory_note, write_outputs
from suite.results import add_errors, add_ratios, growth_per_step, make_row, memory_vs_k, progress_text, reference_gradient

__all__ = ["CONFIGS", "Method", "all_methods", "build_model", "flagged", "fmt_error", "main", "make_engine", "measure_methods",
           "run_job"]


def measure_methods(methods: List[Method], cfg: Config, args: argparse.Namespace, workdir: Path) -> List[dict]:
    rows = []
    for i, method in enumerate(methods, 1):
        start = time.perf_counter()
        result = run_job(method, cfg, args, workdir, cfg.repeats, with_grad=True)
        if args.device == "cpu" and "error" not in result:
            memory = run_job(method, cfg, args, workdir, repeats=0, with_grad=False, for_memory=True)
            result = {**result, "peak_bytes": memory.get("peak_bytes"), "peak_reset": memory.get("peak_reset", True)}
            result.update({"error": memory["error"]} if "error" in memory else {})
        row = make_row(method, cfg, result)
        rows.append(row)
        log(f"[{i}/{len(methods)}] {progress_text(row)} ({time.perf_counter() - start:.1f} s)")
    return rows


# --------------------------------------------------------------------------- command line


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="omniglot", metavar="{omniglot,miniimagenet,mlp}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="a smaller meta-batch (and network), fewer repeats, L in (1, 2); "
                   "without --methods, Implicit and Reptile only per task")
    p.add_argument("--levels", type=int, nargs="+", help="the L values of Truncated and Binomial")
    p.add_argument("--methods", nargs="+", metavar="PATTERN", help="shell-style patterns over the method names (default: all)")
    p.add_argument("--repeats", type=int, help="timed meta-steps after the warm-up")
    p.add_argument("--ks", type=int, nargs="*", help="K values of the memory-vs-K table (none: no table)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--memory-budget", help="memory_budget= of the binom_opt engines (bytes, e.g. 512MiB, inner_step, or none: "
                   "everything at once, what a GPU with room runs)")
    p.add_argument("--compile", action="store_true", help="compile_hvps=True for binom_opt (the warm-up pays the compile)")
    p.add_argument("--error-tasks", type=int, help="tasks of the meta-batch for the float64 error (default: all)")
    args = p.parse_args(argv)
    if args.memory_budget is not None and args.memory_budget.isdigit():
        args.memory_budget = int(args.memory_budget)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return args


def main(argv: Optional[List[str]] = None) -> List[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = config_from_args(args)
    methods = select_methods(all_methods(cfg), args.methods)
    if not args.methods:  # the functional entry points run the engine's pipeline: measured when asked for (task_batching.py)
        methods = [m for m in methods if m.api == "engine"]
    if args.quick and not args.methods:  # batching changes nothing in the other objectives; keeps --quick under 3 minutes
        methods = [m for m in methods if not (m.how == "batched" and m.estimator in OTHER_OBJECTIVES)]
    command = "python benchmarks/run.py " + shlex.join(argv)
    log(f"{cfg.describe()}; {len(methods)} methods on {args.device}")
    with tempfile.TemporaryDirectory(prefix="binom_opt_bench_") as tmp:
        rows = measure_methods(methods, cfg, args, Path(tmp))
        add_errors(rows, reference_gradient(rows, cfg, args, Path(tmp)))
        ks_table = memory_vs_k(rows, methods, cfg, args, Path(tmp))
    add_ratios(rows)
    machine = machine_info(args)
    parameter_mib = sum(p.numel() * p.element_size() for p in build_model(cfg, torch.device("cpu")).parameters()) / MIB
    growth = growth_per_step(ks_table, parameter_mib)
    text = markdown(cfg, args, machine, rows, ks_table, command, growth, parameter_mib)
    for row in rows:
        row.pop("_grad", None)
        row.pop("_peak_reset", None)
    document = {
        "command": command,
        "config": {**asdict(cfg), "device": args.device, "quick": args.quick, "memory_budget": args.memory_budget,
                   "compile_hvps": args.compile, "error_tasks": args.error_tasks or cfg.meta_batch, "error_dtype": "float64",
                   "data": "random values of the real shapes (the values do not change the cost)",
                   "memory": memory_note(args.device)},
        "machine": machine,
        "rows": rows,
        "memory_vs_k": ks_table,
        "parameter_mib": parameter_mib,
        "growth_per_step": growth,
    }
    stem = f"{cfg.name}_{args.device}" + ("_quick" if args.quick else "") + ("_compiled" if args.compile else "")
    title = f"{cfg.describe()} ({args.device}: {machine_text(machine)})"
    paths = write_outputs(args.out, stem, document, text, rows, title)
    print(text)
    log("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
