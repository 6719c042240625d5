"""Measuring one method inside its child process: wall time, peak memory, HVPs, and the float64 gradient."""

from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

import binom_opt as bo

from .configs import Config, build_batch, build_model
from .costs import count_costs, graph_breaks
from .methods import MetaStep, Method, float64_gradient, make_step


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



def run_child(job_path: Path) -> None:
    """Measure one method as described by the job file and write the result next to it."""
    job = json.loads(job_path.read_text())
    device = torch.device(job["device"])
    torch.set_num_threads(job["threads"])
    warnings.simplefilter("ignore", bo.ExpansionDivergenceWarning)  # both are flagged in the table instead
    warnings.simplefilter("ignore", bo.ImplicitSolveWarning)
    if "factory" in job:  # a meta-step of a setting outside the suite's configs (run_step_job)
        module, name = job["factory"].split(":")
        step = getattr(importlib.import_module(module), name)(job["spec"], device, job["engine_options"])
        Path(job["result_path"]).write_text(json.dumps(measure_step(step, device, job["repeats"])))
        return
    result = {}
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
    method = Method(**job["method"])
    if job["repeats"] >= 0:
        result = measure_cost(method, cfg, device, job["repeats"], job["engine_options"], job.get("count", False))
    if job["grad_path"]:
        torch.save(float64_gradient(method, cfg, device, job["error_tasks"], job["engine_options"]), job["grad_path"])
    Path(job["result_path"]).write_text(json.dumps(result))


def measure_cost(method: Method, cfg: Config, device: torch.device, repeats: int, engine_options: dict,
                 count: bool = False) -> dict:
    """One warm-up meta-step (which counts the HVPs), then ``repeats`` timed ones; peak memory over all. With
    ``count``, one more meta-step after the timed ones, under the cost counter (which slows what it counts):
    kernel ops and host syncs per meta-step, and the graph breaks of everything compiled in this child."""
    model, batch = build_model(cfg, device), build_batch(cfg, device)
    return measure_step(make_step(method, model, batch, cfg, engine_options), device, repeats, count)


def measure_step(step: MetaStep, device: torch.device, repeats: int, count: bool = False) -> dict:
    """:func:`measure_cost` of a meta-step already built."""
    memory = PeakMemory(device)
    breaks = graph_breaks()
    memory.start()
    first, (hvps, diverging) = timed(step, device)
    times = [timed(step, device)[0] for _ in range(repeats)]
    peak, costs = memory.peak_bytes(), {}
    if count:
        costs = {**count_costs(step).as_dict(), "graph_breaks": graph_breaks() - breaks}
    return {**costs,
        "seconds": statistics.median(times) if times else first,
        "times": times,
        "first_call_seconds": first,
        "peak_bytes": peak,
        "peak_reset": memory.reset_ok,
        "hvp_count": hvps,
        "diverging": diverging,
    }

