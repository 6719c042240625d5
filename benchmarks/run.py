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
  ``-batch`` (``engine.adapt_batch``, the tasks vmapped).

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

Timings need an otherwise idle machine: with another process busy on the same cores, torch's
worker threads wait on each other and small meta-steps can take many times longer (use
``--threads 1`` on a shared machine).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import fnmatch
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import binom_opt as bo

from fewshot.models import Conv4

MIB = 2**20
IMPLICIT_REG = 1.0  # iMAML's lambda: it changes the meta-gradient, not the cost of one
OTHER_OBJECTIVES = ("Implicit", "Reptile")  # not estimates of MAML's meta-gradient: no error against it


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """One benchmark setting: the network, the task shapes, the inner loop and the meta-batch."""

    name: str
    in_channels: int
    image_size: int
    hidden: int
    ways: int
    shots: int
    queries: int  # per class
    steps: int  # K
    lr: float
    meta_batch: int  # B
    levels: Tuple[int, ...]
    hybrid: Tuple[int, int]  # (L, C)
    repeats: int
    ks: Tuple[int, ...]  # K values of the memory-vs-K table
    network: str = "conv4"  # or "mlp": input -> hidden -> hidden -> ways, ReLU

    def describe(self) -> str:
        side = f"{self.in_channels}x{self.image_size}x{self.image_size}"
        net = (f"MLP {self.in_channels * self.image_size ** 2}-{self.hidden}-{self.hidden}-{self.ways}" if self.network == "mlp"
               else f"Conv4-{self.hidden}")
        return (
            f"{net} on {side}, {self.ways}-way {self.shots}-shot ({self.ways * self.shots} support), "
            f"{self.queries} queries per class ({self.ways * self.queries} query), K={self.steps} inner SGD steps "
            f"at lr {self.lr}, meta-batch B={self.meta_batch}"
        )


CONFIGS: Dict[str, Config] = {
    "omniglot": Config("omniglot", 1, 28, 64, 5, 1, 15, 5, 0.4, 32, (1, 2, 3), (1, 3), 3, (5, 10, 20)),
    "miniimagenet": Config("miniimagenet", 3, 84, 32, 5, 5, 15, 10, 0.01, 4, (1, 2, 3), (2, 5), 3, (5, 10, 20)),
    # the memory-vs-K table of a model whose parameters outweigh its activations (1.9M parameters)
    "mlp": Config("mlp", 1, 28, 1024, 5, 1, 15, 5, 0.1, 1, (1, 2), (1, 3), 3, (5, 25, 100, 1000), "mlp"),
    # for the smoke test; not listed in --help
    "tiny": Config("tiny", 1, 28, 8, 5, 1, 3, 2, 0.4, 2, (1,), (1, 2), 1, ()),
}

QUICK = {
    "omniglot": dict(meta_batch=4, hidden=32, repeats=2, levels=(1, 2), ks=(5, 10)),
    # 3x42x42 and Conv4-16: at 84x84 with Conv4-32 one Binomial meta-step alone takes about a
    # minute on a 2-core CPU, so the quick run keeps K, the task shapes and the methods, not the images
    "miniimagenet": dict(meta_batch=2, hidden=16, image_size=42, repeats=1, levels=(1, 2), ks=(5, 10)),
    "mlp": dict(repeats=1, ks=(5, 25, 100)),
    "tiny": {},
}


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = CONFIGS[args.config]
    if args.quick:
        cfg = replace(cfg, **QUICK[args.config])
    overrides = {"levels": args.levels, "repeats": args.repeats, "ks": args.ks}
    cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})
    bad = [L for L in cfg.levels if not 1 <= L <= cfg.steps]
    if bad:
        raise SystemExit(f"--levels {bad}: each L must be between 1 and K={cfg.steps}")
    return cfg


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A way to compute the meta-gradient: a peer's exact MAML or a binom_opt estimator."""

    slug: str  # the name --methods matches
    name: str  # the name in the table
    how: str  # "peer", "per-task" or "batched"
    estimator: str  # "Exact", "FirstOrder", "Truncated", "Binomial", "Hybrid", "Implicit" or "Reptile"
    L: Optional[int] = None
    C: Optional[int] = None
    checkpoint: bool = False  # checkpoint_every = round(sqrt(K)): the trajectory stores about 2 sqrt(K) points

    @property
    def exact(self) -> bool:
        return self.estimator == "Exact"


def estimator_specs(cfg: Config) -> List[Tuple[str, str, str, Optional[int], Optional[int]]]:
    """(slug, label, estimator, L, C) for each binom_opt estimator the config runs."""
    hl, hc = cfg.hybrid
    return [
        ("fo", "FirstOrder", "FirstOrder", 0, None),
        *[(f"trunc{L}", f"Truncated({L})", "Truncated", L, None) for L in cfg.levels],
        *[(f"binom{L}", f"Binomial({L})", "Binomial", L, None) for L in cfg.levels],
        (f"hybrid{hl}.{hc}", f"Hybrid({hl}, {hc})", "Hybrid", hl, hc),
        ("exact", "Exact", "Exact", cfg.steps, None),
        *[(f"imaml{L}", f"Implicit({L}, reg={IMPLICIT_REG:g})", "Implicit", L, None) for L in cfg.levels],
        ("reptile", "Reptile", "Reptile", 0, None),
    ]


def all_methods(cfg: Config) -> List[Method]:
    methods = [
        Method("higher", "higher exact", "peer", "Exact", cfg.steps),
        Method("autograd", "autograd exact", "peer", "Exact", cfg.steps),
    ]
    for how, suffix in (("per-task", "task"), ("batched", "batch")):
        for slug, label, estimator, L, C in estimator_specs(cfg):
            methods.append(Method(f"{slug}-{suffix}", f"{label} ({how})", how, estimator, L, C))
    methods.append(Method("exact-ckpt-task", "Exact, checkpointed (per-task)", "per-task", "Exact", cfg.steps, checkpoint=True))
    return methods


def batched_api_available() -> bool:
    return hasattr(bo.MetaGradientEngine, "adapt_batch")


def select_methods(methods: List[Method], patterns: Optional[List[str]]) -> List[Method]:
    """The methods whose slug matches one of the patterns (all without patterns), in table order."""
    if patterns:
        unmatched = [p for p in patterns if not any(fnmatch.fnmatch(m.slug, p) for m in methods)]
        if unmatched:
            raise SystemExit(f"--methods {unmatched} match none of: {' '.join(m.slug for m in methods)}")
        methods = [m for m in methods if any(fnmatch.fnmatch(m.slug, p) for p in patterns)]
    if not batched_api_available() and any(m.how == "batched" for m in methods):
        log("skipping the batched methods: this binom_opt has no MetaGradientEngine.adapt_batch")
        methods = [m for m in methods if m.how != "batched"]
    return methods


def make_estimator(method: Method) -> bo.Estimator:
    if method.estimator == "FirstOrder":
        return bo.FirstOrder()
    if method.estimator == "Truncated":
        return bo.Truncated(method.L)
    if method.estimator == "Binomial":
        return bo.Binomial(method.L)
    if method.estimator == "Hybrid":
        return bo.Hybrid(method.L, method.C)
    if method.estimator == "Implicit":
        return bo.Implicit(method.L, IMPLICIT_REG)
    if method.estimator == "Reptile":
        return bo.Reptile()
    return bo.Exact()


# --------------------------------------------------------------------------- model, data, meta-steps

Batch = Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if cfg.network == "mlp":
        nn = torch.nn
        width = cfg.in_channels * cfg.image_size**2
        return nn.Sequential(nn.Flatten(), nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden),
                             nn.ReLU(), nn.Linear(cfg.hidden, cfg.ways)).to(device)
    model = Conv4(in_channels=cfg.in_channels, out_features=cfg.ways, hidden=cfg.hidden, image_size=cfg.image_size)
    return model.to(device)


def build_batch(cfg: Config, device: torch.device) -> Batch:
    """A meta-batch of random images: support [B, ways*shots, C, H, W], query [B, ways*queries, C, H, W]."""
    gen = torch.Generator().manual_seed(0)
    image = (cfg.in_channels, cfg.image_size, cfg.image_size)
    B, n_s, n_q = cfg.meta_batch, cfg.ways * cfg.shots, cfg.ways * cfg.queries
    xs, xq = torch.rand(B, n_s, *image, generator=gen), torch.rand(B, n_q, *image, generator=gen)
    ys, yq = torch.arange(n_s).remainder(cfg.ways).repeat(B, 1), torch.arange(n_q).remainder(cfg.ways).repeat(B, 1)
    return (xs.to(device), ys.to(device)), (xq.to(device), yq.to(device))


# Each make_*_step returns a function that runs one meta-step and returns its HVP count (None
# for the peers) and whether binom_opt's monitor saw the binomial series diverge.
MetaStep = Callable[[], Tuple[Optional[int], bool]]


def make_higher_step(model: torch.nn.Module, batch: Batch, cfg: Config) -> MetaStep:
    import higher

    (xs, ys), (xq, yq) = batch
    B, inner_opt = xs.shape[0], torch.optim.SGD(model.parameters(), lr=cfg.lr)

    def step():
        model.zero_grad(set_to_none=True)
        for t in range(B):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(cfg.steps):
                    diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
                (F.cross_entropy(fmodel(xq[t]), yq[t]) / B).backward()
        return None, False

    return step


def make_autograd_step(model: torch.nn.Module, batch: Batch, cfg: Config) -> MetaStep:
    (xs, ys), (xq, yq) = batch
    B = xs.shape[0]

    def adapted(x, y):
        params = dict(model.named_parameters())
        for _ in range(cfg.steps):
            loss = F.cross_entropy(functional_call(model, params, (x,)), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {name: p - cfg.lr * g for (name, p), g in zip(params.items(), grads)}
        return params

    def step():
        model.zero_grad(set_to_none=True)
        for t in range(B):
            params = adapted(xs[t], ys[t])
            (F.cross_entropy(functional_call(model, params, (xq[t],)), yq[t]) / B).backward()
        return None, False

    return step


def make_engine(model: torch.nn.Module, cfg: Config, method: Method, engine_options: dict) -> bo.MetaGradientEngine:
    """``engine_options``: extra keyword arguments of the engines (``memory_budget``, ``compile_hvps``)."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    if method.checkpoint:
        engine_options = {**engine_options, "checkpoint_every": max(1, round(math.sqrt(cfg.steps)))}
    if method.estimator == "Implicit":  # a broken-down CG costs the same: time it, and flag it in the table
        engine_options = {**engine_options, "nan_policy": "skip_task"}
    return bo.MetaGradientEngine(model, inner_opt, steps=cfg.steps, estimator=make_estimator(method), **engine_options)


def make_per_task_step(model: torch.nn.Module, batch: Batch, cfg: Config, method: Method, engine_options: dict) -> MetaStep:
    (xs, ys), (xq, yq) = batch
    B, engine = xs.shape[0], make_engine(model, cfg, method, engine_options)

    def step():
        model.zero_grad(set_to_none=True)
        hvps, diverging = 0, False
        for t in range(B):
            learner = engine.adapt(lambda m, x=xs[t], y=ys[t]: F.cross_entropy(m(x), y))
            (F.cross_entropy(learner(xq[t]), yq[t]) / B).backward()
            hvps += engine.last_stats.hvp_count
            diverging |= flagged(engine.last_stats)
        return hvps, diverging

    return step


def make_batched_step(model: torch.nn.Module, batch: Batch, cfg: Config, method: Method, engine_options: dict) -> MetaStep:
    (xs, ys), (xq, yq) = batch
    engine = make_engine(model, cfg, method, engine_options)

    def step():
        model.zero_grad(set_to_none=True)
        learners = engine.adapt_batch(lambda m, task: F.cross_entropy(m(task[0]), task[1]), (xs, ys))
        logits = learners(xq)  # [B, Q, ways]
        F.cross_entropy(logits.flatten(0, 1), yq.flatten()).backward()
        return engine.last_stats.hvp_count, flagged(engine.last_stats)

    return step


def flagged(stats: bo.MetaGradientStats) -> bool:
    """What the table flags: a binomial series that grows with the order, or a conjugate gradient that broke down."""
    return stats.diverging or stats.unreliable_solve


def make_step(method: Method, model: torch.nn.Module, batch: Batch, cfg: Config, engine_options: dict) -> MetaStep:
    if method.slug == "higher":
        return make_higher_step(model, batch, cfg)
    if method.slug == "autograd":
        return make_autograd_step(model, batch, cfg)
    if method.how == "per-task":
        return make_per_task_step(model, batch, cfg, method, engine_options)
    return make_batched_step(model, batch, cfg, method, engine_options)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


# --------------------------------------------------------------------------- measuring (in the child)


def current_rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_rss_peak() -> bool:
    """Reset this process's peak resident set size (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory above what was in use at ``start()``: CUDA allocations, or resident memory on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.baseline = 0
        self.reset_ok = True

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.reset_ok = reset_rss_peak()
            self.baseline = current_rss_bytes()

    def peak_bytes(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return rss_peak_bytes() - self.baseline


def timed(step: MetaStep, device: torch.device) -> Tuple[float, Tuple[Optional[int], bool]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def float64_gradient(method: Method, cfg: Config, device: torch.device, error_tasks: Optional[int], engine_options: dict) -> torch.Tensor:
    """The method's meta-gradient of the fixed meta-batch (its first ``error_tasks`` tasks) in float64."""
    model = build_model(cfg, device).double()
    (xs, ys), (xq, yq) = build_batch(cfg, device)
    n = error_tasks or cfg.meta_batch
    batch = ((xs[:n].double(), ys[:n]), (xq[:n].double(), yq[:n]))
    make_step(method, model, batch, cfg, engine_options)()
    return flat_grad(model).cpu()


def run_child(job_path: Path) -> None:
    """Measure one method as described by the job file and write the result next to it."""
    job = json.loads(job_path.read_text())
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
    method, device = Method(**job["method"]), torch.device(job["device"])
    torch.set_num_threads(job["threads"])
    warnings.simplefilter("ignore", bo.ExpansionDivergenceWarning)  # both are flagged in the table instead
    warnings.simplefilter("ignore", bo.ImplicitSolveWarning)
    result = {}
    if job["repeats"] >= 0:
        result = measure_cost(method, cfg, device, job["repeats"], job["engine_options"])
    if job["grad_path"]:
        torch.save(float64_gradient(method, cfg, device, job["error_tasks"], job["engine_options"]), job["grad_path"])
    Path(job["result_path"]).write_text(json.dumps(result))


def measure_cost(method: Method, cfg: Config, device: torch.device, repeats: int, engine_options: dict) -> dict:
    """One warm-up meta-step (which counts the HVPs), then ``repeats`` timed ones; peak memory over all."""
    model, batch = build_model(cfg, device), build_batch(cfg, device)
    step = make_step(method, model, batch, cfg, engine_options)
    memory = PeakMemory(device)
    memory.start()
    first, (hvps, diverging) = timed(step, device)
    times = [timed(step, device)[0] for _ in range(repeats)]
    return {
        "seconds": statistics.median(times) if times else first,
        "times": times,
        "first_call_seconds": first,
        "peak_bytes": memory.peak_bytes(),
        "peak_reset": memory.reset_ok,
        "hvp_count": hvps,
        "diverging": diverging,
    }


# --------------------------------------------------------------------------- running children (parent)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# glibc raises its mmap threshold after large blocks are freed, after which tensors come from the
# heap, whose freed space fragments and stays resident: the peak resident memory then creeps up
# with the number of allocations (first-order MAML at 84x84 measured 498 MiB at K=5 and 757 MiB at
# K=20 with the same live tensors). A fixed threshold maps every tensor above 128 KiB on its own,
# so the resident peak follows the live tensors, like CUDA's max_memory_allocated(). It also makes
# every large allocation a system call (meta-steps measured 3-4x slower), so on the CPU the time
# and the memory of a method come from two children: one with the default allocator, timed, and
# one with the fixed threshold, one meta-step.
MMAP_THRESHOLD = 131072
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MADV_POPULATE_READ = 22  # madvise's advice number (Linux >= 5.14)

# Children are forked from one server process that imported these once (multiprocessing's
# forkserver): a fresh interpreter per child spent about 1.7 s of a method's 8 s importing them.
# The server never runs an operator, so no thread pool or CUDA context crosses a fork.
CHILD_PRELOAD = ["torch", "torch.func", "torch.nn.functional", "higher", "binom_opt", "fewshot.models"]
# A child's entry: this file as a module of its own, so that the parent may be run.py as a script or
# a test that loaded it from its path (neither can be imported by name in the child).
CHILD_ENTRY = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("benchmark_child", RUN_PY)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module.child_main(JOB, LOG, FOR_MEMORY)
"""


def child_main(job_path: str, log_path: str, for_memory: bool) -> None:
    """A forked child: output to ``log_path``, the fixed mmap threshold for a memory child, then the job."""
    with open(log_path, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    if for_memory:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc read an explicit one at start-up
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        map_libraries(libc)
    run_child(Path(job_path))


def map_libraries(libc) -> None:
    """Map every page of the shared libraries into this process's page tables (a fork leaves them out), so
    that the library code a meta-step runs for the first time is not counted as its memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[1].startswith("r") and ".so" in Path(fields[5]).name:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_POPULATE_READ)  # no-op where unknown


_server: list = []  # the forkserver context, set up once per process


def child_context():
    if not _server:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(CHILD_PRELOAD)
        _server.append(context)
    return _server[0]


def engine_options(args: argparse.Namespace) -> dict:
    """The binom_opt engine options the command line sets (none: the engines' defaults)."""
    options = {} if args.memory_budget is None else {"memory_budget": args.memory_budget}
    return {**options, "compile_hvps": True} if args.compile else options


def run_job(method: Method, cfg: Config, args: argparse.Namespace, workdir: Path, repeats: int, with_grad: bool,
            for_memory: bool = False) -> dict:
    """Run one method in a child process of its own; its result, or ``{"error": ...}`` if it failed."""
    tag = f"{method.slug}_K{cfg.steps}_r{repeats}" + ("_memory" if for_memory else "")
    job = {
        "config": asdict(cfg),
        "method": asdict(method),
        "device": args.device,
        "threads": args.threads,
        "engine_options": engine_options(args),
        "repeats": repeats,
        "error_tasks": args.error_tasks,
        "grad_path": str(workdir / f"{tag}.pt") if with_grad else None,
        "result_path": str(workdir / f"{tag}.json"),
    }
    job_path, log_path = workdir / f"{tag}.job.json", workdir / f"{tag}.log"
    job_path.write_text(json.dumps(job))
    names = {"RUN_PY": str(Path(__file__).resolve()), "JOB": str(job_path), "LOG": str(log_path), "FOR_MEMORY": for_memory}
    child = child_context().Process(target=exec, args=(CHILD_ENTRY, {"__name__": "__benchmark_child__", **names}))
    child.start()
    child.join()
    if child.exitcode != 0:
        lines = log_path.read_text().strip().splitlines() if log_path.exists() else []
        tail = "\n".join(lines[-8:])
        why = f"exit code {child.exitcode}" if child.exitcode > 0 else f"killed by signal {-child.exitcode}"
        log(f"  {method.name} failed ({why}):\n{tail}")
        return {"error": lines[-1] if lines else why}
    result = json.loads(Path(job["result_path"]).read_text())
    if with_grad:
        result["grad"] = torch.load(job["grad_path"])
    return result


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


def make_row(method: Method, cfg: Config, result: dict) -> dict:
    peak = result.get("peak_bytes")
    return {
        "method": method.name,
        "slug": method.slug,
        "how": method.how,
        "estimator": method.estimator,
        "L": method.L,
        "C": method.C,
        "K": cfg.steps,
        "seconds": result.get("seconds"),
        "times": result.get("times"),
        "first_call_seconds": result.get("first_call_seconds"),
        "peak_mib": None if peak is None else peak / MIB,
        "hvp_count": result.get("hvp_count"),
        "diverging": result.get("diverging"),
        "rel_error": None,
        "ratios": {},
        "error": result.get("error"),
        "_grad": result.get("grad"),
        "_peak_reset": result.get("peak_reset", True),
    }


def progress_text(row: dict) -> str:
    if row["error"]:
        return f"{row['method']}: FAILED ({row['error']})"
    hvps = "" if row["hvp_count"] is None else f", {row['hvp_count']} HVPs"
    return f"{row['method']}: {row['seconds'] * 1e3:.1f} ms per meta-step, peak {row['peak_mib']:.1f} MiB{hvps}"


def reference_gradient(rows: List[dict], cfg: Config, args: argparse.Namespace, workdir: Path) -> Optional[torch.Tensor]:
    """Exact MAML by autograd in float64: the autograd row's gradient, or a run of its own."""
    for row in rows:
        if row["slug"] == "autograd" and row["_grad"] is not None:
            return row["_grad"]
    log("computing the float64 reference (autograd exact)")
    result = run_job(all_methods(cfg)[1], cfg, args, workdir, repeats=-1, with_grad=True)
    return result.get("grad")


def add_errors(rows: List[dict], reference: Optional[torch.Tensor]) -> None:
    if reference is None:
        return
    norm = float(reference.norm())
    for row in rows:
        grad = row.pop("_grad")
        if grad is not None:
            row["rel_error"] = float((grad - reference).norm()) / norm


def add_ratios(rows: List[dict]) -> None:
    """Time and peak memory against higher exact; time against our FirstOrder (same how) and against our
    Truncated(L) at the same L and how."""
    peer = next((r for r in rows if r["slug"] == "higher" and not r["error"]), None)
    truncated = {(r["how"], r["L"]): r for r in rows if r["estimator"] == "Truncated" and not r["error"]}
    first_order = {r["how"]: r for r in rows if r["estimator"] == "FirstOrder" and not r["error"]}
    for row in rows:
        if row["error"]:
            continue
        ratios = row["ratios"]
        if peer is not None:
            ratios["time_vs_higher"] = row["seconds"] / peer["seconds"]
            ratios["peak_vs_higher"] = row["peak_mib"] / peer["peak_mib"] if peer["peak_mib"] > 0 else None
        if row["how"] in first_order:
            ratios["time_vs_first_order"] = row["seconds"] / first_order[row["how"]]["seconds"]
        same_l = truncated.get((row["how"], row["L"]))
        if row["estimator"] in ("Binomial", "Hybrid", "Implicit") and same_l is not None:
            ratios["time_vs_truncated"] = row["seconds"] / same_l["seconds"]


MEMORY_VS_K = ("higher", "fo-task", "exact-task", "exact-ckpt-task", "exact-batch")
PEER_MAX_K = 100  # higher keeps every step's graph: beyond this K it takes too long to measure here


def memory_vs_k(rows: List[dict], methods: List[Method], cfg: Config, args: argparse.Namespace, workdir: Path) -> List[dict]:
    """Peak memory of the methods of ``MEMORY_VS_K`` that were selected, at each K of ``cfg.ks`` (one meta-step
    each; K = cfg.steps reuses the rows)."""
    chosen = [m for m in methods if m.slug in MEMORY_VS_K]
    table = []
    for k in cfg.ks:
        for method in chosen:
            if method.how == "peer" and k > PEER_MAX_K:
                continue
            if k == cfg.steps:
                row = next(r for r in rows if r["slug"] == method.slug)
                peak, error = row["peak_mib"], row["error"]
            else:
                level = k if method.exact else method.L
                result = run_job(replace(method, L=level), replace(cfg, steps=k), args, workdir, repeats=0, with_grad=False,
                                 for_memory=args.device == "cpu")
                peak = None if "error" in result else result["peak_bytes"] / MIB
                error = result.get("error")
                log(f"  memory at K={k}: {method.name}: " + (f"FAILED ({error})" if error else f"peak {peak:.1f} MiB"))
            table.append({"K": k, "method": method.name, "slug": method.slug, "peak_mib": peak, "error": error})
    return table


def growth_per_step(ks_table: List[dict], parameter_mib: float) -> Dict[str, dict]:
    """Per method, the peak's growth per inner step between its two largest K, in MiB and in parameter copies."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in ks_table):
        points = sorted((r["K"], r["peak_mib"]) for r in ks_table if r["method"] == name and not r["error"])
        if len(points) >= 2:
            (k0, m0), (k1, m1) = points[-2], points[-1]
            mib = (m1 - m0) / (k1 - k0)
            out[name] = {"from_K": k0, "to_K": k1, "mib_per_step": mib, "copies_per_step": mib / parameter_mib}
    return out


# --------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(args: argparse.Namespace) -> dict:
    info = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__, "python": platform.python_version()}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_text(machine: dict) -> str:
    gpu = f"{machine['gpu']}, " if "gpu" in machine else ""
    return f"{gpu}{machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}"


def fmt_ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}x"


def fmt_number(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def fmt_error(row: dict) -> str:
    if row["slug"] == "autograd":
        return "0 (reference)"
    if row["estimator"] in OTHER_OBJECTIVES:
        return "other objective" + (" (CG broke down)" if row["diverging"] else "")
    if row["rel_error"] is None:
        return "—"
    return f"{row['rel_error']:.1e}" + (" (series grows)" if row["diverging"] else "")


def table_line(row: dict) -> str:
    if row["error"]:
        return f"| {row['method']} | failed: {row['error']} |  |  |  |  |  |  |  |"
    r = row["ratios"]
    hvps = "—" if row["hvp_count"] is None else str(row["hvp_count"])
    cells = [
        row["method"], fmt_number(row["seconds"] * 1e3), fmt_ratio(r.get("time_vs_higher")),
        fmt_ratio(r.get("time_vs_first_order")), fmt_ratio(r.get("time_vs_truncated")), fmt_number(row["peak_mib"]),
        fmt_ratio(r.get("peak_vs_higher")),
        hvps, fmt_error(row),
    ]
    return "| " + " | ".join(cells) + " |"


def memory_note(device: str) -> str:
    if device == "cuda":
        return "peak = torch.cuda.max_memory_allocated() minus the memory allocated before the first call"
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    return ("peak = the child process's peak resident memory (VmHWM, reset before the first call) minus its resident "
            f"memory then, with the mmap threshold at {threshold} bytes so that freed tensors leave the resident set and the "
            "shared libraries mapped before, so that their code is not counted")


def markdown(cfg: Config, args: argparse.Namespace, machine: dict, rows: List[dict], ks_table: List[dict], command: str,
             growth: Dict[str, dict], parameter_mib: float) -> str:
    auto = "a quarter of the free memory, at most 512 MiB" if args.device == "cuda" else "no cap on a CPU"
    budget = repr(args.memory_budget) if args.memory_budget is not None else f"'auto' (the default: {auto})"
    lines = [
        f"# {cfg.name}{' (quick)' if args.quick else ''} on {args.device}: {machine_text(machine)}",
        "",
        f"Command: `{command}`",
        "",
        f"{cfg.describe()}. binom_opt engines: memory_budget={budget}, compile_hvps={args.compile}. "
        "Random data of these shapes (the values of the data do not change the cost). "
        f"Time: median of {cfg.repeats} meta-steps after one warm-up; one meta-step is the meta-gradient of the "
        f"whole meta-batch into .grad. Memory: {memory_note(args.device)}, each method in its own process. "
        f"Rel. error: ||g - g_exact|| / ||g_exact|| over all parameters, in float64 on {args.device}, "
        f"on the {args.error_tasks or cfg.meta_batch} task(s) of the fixed meta-batch; exact = autograd unrolled with "
        "create_graph=True; \"series grows\": binom_opt's monitor saw the terms of the binomial series grow "
        "with the order (last_stats.diverging) on some task; Implicit (iMAML, proximal inner loop) and Reptile are "
        "meta-gradients of other objectives, so they have no error against MAML's; \"CG broke down\": Implicit's "
        "conjugate gradient met negative curvature on some task (last_stats.unreliable_solve; timed all the same). "
        "HVPs: per meta-step (all tasks).",
        "",
        "| method | ms per meta-step | vs higher exact | vs our FirstOrder | vs our Truncated(L) | peak MiB "
        "| vs higher exact peak | HVPs | rel. error vs exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[table_line(row) for row in rows],
    ]
    if not all(row.get("_peak_reset", True) for row in rows):
        lines += ["", "Note: the peak could not be reset before the first call; it may include the set-up of the model."]
    if ks_table:
        lines += ["", *memory_vs_k_lines(ks_table, growth, parameter_mib)]
    return "\n".join(lines) + "\n"


def memory_vs_k_lines(ks_table: List[dict], growth: Dict[str, dict], parameter_mib: float) -> List[str]:
    names = list(dict.fromkeys(r["method"] for r in ks_table))
    lines = [
        f"Peak memory (MiB) vs the number of inner steps K (one meta-step each; one copy of the parameters is "
        f"{parameter_mib:.2f} MiB; checkpointed: checkpoint_every = round(sqrt(K)); higher up to K = {PEER_MAX_K}):",
        "",
        "| K | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for k in dict.fromkeys(r["K"] for r in ks_table):
        cells = {r["method"]: ("failed" if r["error"] else fmt_number(r["peak_mib"])) for r in ks_table if r["K"] == k}
        lines.append(f"| {k} | " + " | ".join(cells.get(n, "—") for n in names) + " |")
    if growth:
        cells = [(f"{g['mib_per_step']:.2f} MiB = {g['copies_per_step']:.2f} copies (K {g['from_K']}→{g['to_K']})"
                  if (g := growth.get(n)) else "") for n in names]
        lines.append("| growth per step | " + " | ".join(cells) + " |")
    return lines


def plot(rows: List[dict], path: Path, title: str) -> Optional[Path]:
    """Time and peak memory against L (the paper's Figure 4): lines for Truncated, Binomial and Implicit (L = its
    conjugate-gradient steps), from FirstOrder at L = 0; horizontal lines for exact MAML (ours and higher's)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    ok = [r for r in rows if not r["error"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, label in ((axes[0], "seconds", "seconds per meta-step"), (axes[1], "peak_mib", "peak MiB")):
        for estimator, color in (("Truncated", "tab:blue"), ("Binomial", "tab:orange"), ("Implicit", "tab:purple")):
            for how, style in (("per-task", "-o"), ("batched", "--s")):
                start = [(0, r[key]) for r in ok if r["estimator"] == "FirstOrder" and r["how"] == how]
                points = sorted((r["L"], r[key]) for r in ok if r["estimator"] == estimator and r["how"] == how)
                if points:
                    ax.plot(*zip(*(start + points)), style, color=color, label=f"{estimator} ({how})")
        flat = [("higher", "black"), ("exact-task", "tab:red"), ("exact-batch", "tab:red")]
        for slug, color in flat:
            row = next((r for r in ok if r["slug"] == slug), None)
            if row is not None:
                ax.axhline(row[key], color=color, linestyle=":" if slug.endswith("batch") else "-.", label=row["method"])
        ax.set_xticks(sorted({0} | {r["L"] for r in ok if r["estimator"] in ("Truncated", "Binomial", "Implicit")}))
        ax.set_xlabel("L (Hessian factors kept)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.suptitle(textwrap.fill(title, 140), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, stem: str, document: dict, text: str, rows: List[dict], title: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(document, indent=2) + "\n")
    paths[1].write_text(text)
    png = plot(rows, out / f"{stem}.png", title)
    return paths + ([png] if png else [])


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
    p.add_argument("--memory-budget", help="memory_budget= of the binom_opt engines (bytes, e.g. 512MiB, or inner_step)")
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
