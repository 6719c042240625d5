"""The machine, the markdown table, the plot and the files a benchmark run writes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import log
from .children import MMAP_THRESHOLD
from .configs import Config
from .methods import OTHER_OBJECTIVES
from .results import PEER_MAX_K


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


def fmt_count(value: Optional[int]) -> str:
    return "—" if value is None else f"{value:,}"


def table_header(compiled: bool) -> List[str]:
    breaks = " graph breaks |" if compiled else ""
    return [
        "| method | ms per meta-step | vs higher exact | vs our FirstOrder | vs our Truncated(L) | peak MiB "
        f"| vs higher exact peak | HVPs | kernel ops | vs higher ops | host syncs |{breaks} rel. error vs exact |",
        "|---|" + "---:|" * (11 + compiled),
    ]


def table_line(row: dict, compiled: bool) -> str:
    if row["error"]:
        return f"| {row['method']} | failed: {row['error']} |" + "  |" * (10 + compiled)
    r = row["ratios"]
    ratio = r.get("kernel_ops_vs_higher")
    cells = [
        row["method"], fmt_number(row["seconds"] * 1e3), fmt_ratio(r.get("time_vs_higher")),
        fmt_ratio(r.get("time_vs_first_order")), fmt_ratio(r.get("time_vs_truncated")), fmt_number(row["peak_mib"]),
        fmt_ratio(r.get("peak_vs_higher")), fmt_count(row["hvp_count"]), fmt_count(row["kernel_ops"]),
        "" if ratio is None else f"{ratio:.3g}x", fmt_count(row["host_syncs"]),
        *([fmt_count(row["graph_breaks"])] if compiled else []), fmt_error(row),
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
    budget = "None (everything at once)" if args.memory_budget == "none" else budget
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
        "HVPs: per meta-step (all tasks). Kernel ops and host syncs: counted in one more meta-step after the timed "
        "ones (benchmarks/suite/costs.py): every ATen operator dispatched except views and other operators that "
        "launch nothing on a GPU, and the reads that make the host wait for the device (.item(), bool(), float(), "
        ".tolist() of a tensor, nonzero, ...); deterministic for a torch version, they predict the time of a "
        "launch-bound GPU meta-step"
        + ("; graph breaks: torch._dynamo's count over the method's process, compilation included (dynamo does not "
           "compile under the counter: the kernel ops are those of the eager code)." if args.compile else "."),
        "",
        *table_header(args.compile),
        *[table_line(row, args.compile) for row in rows],
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
    ok = [r for r in rows if not r["error"] and r.get("api", "engine") == "engine"]
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

