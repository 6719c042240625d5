"""The memory wall: peak memory of one MAML meta-step on ResNet-12 against the number of inner steps K.

ResNet-12 (64-160-320-640, 12.4M parameters) on 3x84x84 images, 5-way 5-shot with 5 queries per
class (25 support and 25 query images), one task per meta-step (meta-batch 1), K inner SGD steps;
one meta-step is the meta-gradient into ``.grad``. Methods (``--methods`` takes shell-style patterns):

* ``higher``: ``higher.innerloop_ctx``, exact MAML through the unrolled graph;
* ``autograd``: unrolled ``torch.func.functional_call`` + ``torch.autograd.grad(create_graph=True)``;
* ``exact``: binom_opt's ``Exact()`` (graph-free: the inner loop's points and Hessian-vector products);
* ``exact-ckpt``: the same with ``checkpoint_every=round(sqrt(K))`` (about 2 sqrt(K) points held);
* ``binom1``, ``binom2``: binom_opt's ``Binomial(1)`` and ``Binomial(2)``.

Each (method, K) point runs in a fresh child process of its own (``benchmarks/suite``'s children, with
the fixed mmap threshold on the CPU, so the resident peak follows the live tensors): one meta-step, its
peak memory above the memory in use just before it (on CUDA ``torch.cuda.max_memory_allocated``) and its
wall time. Per method the peak is fitted as a line in the inner-loop points held (K; for the checkpointed
method stored points plus one segment) and the fit gives, marked as extrapolated, the peak where a point
was not measured and the largest K that fits in 8 GiB and 16 GiB. Before each point the fit so far
predicts its peak: a point predicted above ``--max-memory`` (default 60 % of the memory) is skipped, never run.

    python benchmarks/memory_wall.py                        # the default points (11): about 7 min on 2 idle CPU cores
    python benchmarks/memory_wall.py --methods exact --ks 10  # more points (--ks applies to every chosen method)
    python benchmarks/memory_wall.py --device cuda --ks 1 2 3 10 100
    python benchmarks/memory_wall.py --from-json benchmarks/results/memory_wall_cpu.json   # re-render only

Writes ``memory_wall_<device>[_tiny].{json,md,png}`` to ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import MIB, log
from suite.children import run_job
from suite.configs import CONFIGS, Config, build_model
from suite.methods import Method, all_methods
from suite.report import machine_info, machine_text, memory_note
from suite.wall import LEVELS, guess_next, held_points
from suite.wall_report import markdown, plot

# this script's names -> the suite's methods, and the K values each is measured at by default on a CPU: chosen so
# that the run takes minutes (a ResNet-12 inner step costs about 15 s on 2 cores) and still gives every method a
# fit. Binomial(L) at K = L is Exact, so each binomial method is measured at one K above its L and fitted with
# Exact's point at K = L; the checkpointed method at one K, with Exact's growth per held point. Exact runs the
# K=10 of the first target only where --ks asks for it.
METHODS: Dict[str, Tuple[str, Tuple[int, ...]]] = {
    "higher": ("higher", (1, 2, 3)),
    "autograd": ("autograd", (1, 2)),
    "exact": ("exact-task", (1, 2, 3)),
    "exact-ckpt": ("exact-ckpt-task", (3,)),
    "binom1": ("binom1-task", (2,)),
    "binom2": ("binom2-task", (3,)),
}
MEMORY_SHARE = 0.6  # the default --max-memory: this share of the machine's (or the GPU's) memory


def total_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / MIB
    return meminfo_mib("MemTotal")


def meminfo_mib(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/meminfo has no {field}")


def parse_mib(text: str) -> float:
    """``14GiB``, ``900MiB`` or a number of MiB."""
    units = {"gib": 1024.0, "mib": 1.0}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def plan(names: List[str], ks: Optional[List[int]], methods: Dict[str, Tuple[str, Tuple[int, ...]]] = METHODS) -> List[Tuple[str, int]]:
    """(method, K) in order: each method's Ks ascending, so that each point is predicted from the ones before;
    without ``ks``, each method's own of ``methods``."""
    return [(name, k) for name in names for k in sorted(set(ks or methods[name][1])) if k >= LEVELS.get(name, 1)]


def suite_method(name: str, cfg: Config, k: int) -> Method:
    method = next(m for m in all_methods(cfg) if m.slug == METHODS[name][0])
    return replace(method, L=k if method.exact else method.L)


def measure(points_plan: List[Tuple[str, int]], cfg: Optional[Config], args: argparse.Namespace, workdir: Path,
            run_point: Optional[Callable[[str, int], dict]] = None) -> List[dict]:
    """Each (method, K) of the plan in a child of its own, or skipped where predicted above ``args.max_memory``.
    ``run_point(method, K)`` measures one point (default: the suite's method on ``cfg``; ``run_job``'s result)."""
    if run_point is None:
        def run_point(name: str, k: int) -> dict:
            return run_job(suite_method(name, cfg, k), replace(cfg, steps=k), args, workdir, repeats=0, with_grad=False,
                           for_memory=args.device == "cpu")
    points: List[dict] = []
    start = time.perf_counter()
    for i, (name, k) in enumerate(points_plan, 1):
        limit = args.max_memory if args.device == "cuda" else min(args.max_memory, meminfo_mib("MemAvailable"))
        guess = guess_next(points, name, k)
        point = {"method": name, "K": k, "peak_mib": None, "seconds": None, "predicted_mib": guess}
        if guess is not None and guess > limit:
            point.update(status="skipped", note=f"skipped: predicted {guess / 1024:.1f} GiB > --max-memory {limit / 1024:.1f} GiB")
        else:
            result = run_point(name, k)
            if "error" in result:
                point.update(status="failed", note=f"failed: {result['error']}")
            else:
                point.update(status="measured", peak_mib=result["peak_bytes"] / MIB, seconds=result["first_call_seconds"])
        points.append(point)
        elapsed = time.perf_counter() - start
        log(f"[{i}/{len(points_plan)}] {name} K={k}: {describe(point)} | elapsed {elapsed:.0f} s, "
            f"ETA {eta(points, points_plan[i:]):.0f} s")
    return points


def describe(point: dict) -> str:
    if point["status"] != "measured":
        return point["note"]
    return f"peak {point['peak_mib']:,.0f} MiB, {point['seconds']:.1f} s"


def eta(points: List[dict], remaining: List[Tuple[str, int]]) -> float:
    """Seconds left, at the measured seconds per held inner-loop point (the checkpointed method's replay counted)."""
    done = [p for p in points if p["status"] == "measured"]
    work = sum(held_points(p["method"], p["K"]) + (p["K"] if p["method"] == "exact-ckpt" else 0) for p in done)
    if not work:
        return 0.0
    left = sum(held_points(name, k) + (k if name == "exact-ckpt" else 0) for name, k in remaining)
    return sum(p["seconds"] for p in done) / work * left


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--methods", nargs="+", metavar="PATTERN", help=f"patterns over {' '.join(METHODS)} (default: all)")
    p.add_argument("--ks", type=int, nargs="+", help="the K values of every chosen method (default: each method's own)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--max-memory", type=parse_mib, help="skip a point whose predicted peak is above this (e.g. 14GiB; "
                   f"default {MEMORY_SHARE * 100:.0f}%% of the memory; on the CPU never above the memory available then)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--memory-budget", help="memory_budget= of the binom_opt engines (bytes, e.g. 512MiB)")
    p.add_argument("--tiny", action="store_true", help="ResNet-12 4-10-20-40 on 3x16x16 at K=1, 2: a smoke test of seconds")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--from-json", type=Path, metavar="PATH", help="re-render a run's table and plot without measuring")
    args = checked(p.parse_args(argv), METHODS)
    args.error_tasks = None  # what the suite's children read besides
    return args


def checked(args: argparse.Namespace, methods) -> argparse.Namespace:
    """A wall's command line checked (device, K values, method patterns over ``methods``), ``--memory-budget`` in
    bytes where it is a number, and ``compile`` off (the suite's children read it)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.ks and min(args.ks) < 1:
        raise SystemExit(f"--ks {args.ks}: every K must be at least 1")
    if args.methods:
        unmatched = [pat for pat in args.methods if not fnmatch.filter(methods, pat)]
        if unmatched:
            raise SystemExit(f"--methods {unmatched} match none of: {' '.join(methods)}")
    if args.memory_budget is not None and args.memory_budget.isdigit():
        args.memory_budget = int(args.memory_budget)
    args.compile = False
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json:
        document = json.loads(args.from_json.read_text())
        return write(document, args.from_json.parent, args.from_json.stem)
    cfg = CONFIGS["resnet12-tiny" if args.tiny else "resnet12"]
    names = [n for n in METHODS if not args.methods or any(fnmatch.fnmatch(n, pat) for pat in args.methods)]
    ks = args.ks or (list(cfg.ks) if args.tiny else None)
    if args.max_memory is None:
        args.max_memory = MEMORY_SHARE * total_memory_mib(args.device)
    todo = plan(names, ks)
    model = build_model(cfg, torch.device("cpu"))
    parameter_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    setting = f"{cfg.describe().rsplit(', K=', 1)[0]}, K inner SGD steps at lr {cfg.lr}, meta-batch 1; one meta-step into .grad"
    log(f"{setting}: {len(todo)} points on {args.device}, --max-memory {args.max_memory / 1024:.1f} GiB")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="binom_opt_wall_") as tmp:
        points = measure(todo, cfg, args, Path(tmp))
    document = {
        "command": "python benchmarks/memory_wall.py " + shlex.join(argv),
        "setting": setting,
        "device": args.device,
        "machine": machine_text(machine_info(args)),
        "memory": memory_note(args.device),
        "max_memory_mib": args.max_memory,
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_mib": parameter_mib,
        "wall_seconds": time.perf_counter() - started,
        "points": points,
    }
    return write(document, args.out, f"memory_wall_{args.device}" + ("_tiny" if args.tiny else ""))


def write(document: dict, out: Path, stem: str) -> dict:
    """The JSON (with the fits, largest K and targets recomputed from the points), the markdown and the plot."""
    text, derived = markdown(document)
    document = {**document, **derived}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    png = plot(document, out / f"{stem}.png")
    print(text)
    log("wrote " + ", ".join(str(p) for p in paths + ([png] if png else [])))
    return document


if __name__ == "__main__":
    main()
