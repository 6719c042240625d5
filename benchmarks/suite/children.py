"""Running each method in a child process of its own, forked from a server that imported torch and binom_opt once."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import multiprocessing
import os
from dataclasses import asdict
from pathlib import Path

import torch

from . import SUITE_PATHS, log
from .configs import Config
from .measure import run_child
from .methods import Method

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
CHILD_PRELOAD = ["torch", "torch.func", "torch.nn.functional", "higher", "binom_opt", "fewshot.models", "suite.children"]
# A child's entry: the suite imported by name from the folder that holds it (the parent may be run.py as
# a script or a test that loaded it from its path, so the child puts that folder on its path itself).
CHILD_ENTRY = """
import sys
sys.path[:0] = [p for p in SUITE_PATHS if p not in sys.path]
from suite.children import child_main
child_main(JOB, LOG, FOR_MEMORY)
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
    options = {} if args.memory_budget is None else {"memory_budget": None if args.memory_budget == "none" else args.memory_budget}
    return {**options, "compile_hvps": True} if args.compile else options


def preload(*modules: str) -> None:
    """Modules the forkserver imports once for all children (before its first child; later, each child imports them)."""
    CHILD_PRELOAD.extend(m for m in modules if m not in CHILD_PRELOAD)


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
        "count": with_grad,  # the table's own rows: count their kernel ops and host syncs after the timed steps
    }
    result = run_child_job(job, tag, method.name, workdir, for_memory)
    if with_grad and "error" not in result:
        result["grad"] = torch.load(job["grad_path"])
    return result


def run_step_job(factory: str, spec: dict, tag: str, args: argparse.Namespace, workdir: Path, repeats: int,
                 for_memory: bool = False) -> dict:
    """Measure a meta-step that ``factory`` ("module:function", importable from ``SUITE_PATHS``) builds as
    ``function(spec, device, engine_options)`` in a child of its own, as :func:`run_job` measures a method."""
    tag += f"_r{repeats}" + ("_memory" if for_memory else "")
    job = {"factory": factory, "spec": spec, "device": args.device, "threads": args.threads, "engine_options": engine_options(args),
           "repeats": repeats, "grad_path": None, "result_path": str(workdir / f"{tag}.json")}
    return run_child_job(job, tag, tag, workdir, for_memory)


def run_child_job(job: dict, tag: str, name: str, workdir: Path, for_memory: bool) -> dict:
    """Write ``job``, run it in a forked child and read its result; ``{"error": ...}`` with its log's tail if it failed."""
    job_path, log_path = workdir / f"{tag}.job.json", workdir / f"{tag}.log"
    job_path.write_text(json.dumps(job))
    names = {"SUITE_PATHS": SUITE_PATHS, "JOB": str(job_path), "LOG": str(log_path), "FOR_MEMORY": for_memory}
    child = child_context().Process(target=exec, args=(CHILD_ENTRY, {"__name__": "__benchmark_child__", **names}))
    child.start()
    child.join()
    if child.exitcode != 0:
        lines = log_path.read_text().strip().splitlines() if log_path.exists() else []
        tail = "\n".join(lines[-8:])
        why = f"exit code {child.exitcode}" if child.exitcode > 0 else f"killed by signal {-child.exitcode}"
        log(f"  {name} failed ({why}):\n{tail}")
        return {"error": lines[-1] if lines else why}
    return json.loads(Path(job["result_path"]).read_text())
