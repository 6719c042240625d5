"""From the children's results to table rows: errors against exact MAML, ratios against the peers, memory against K."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import MIB, log
from .children import run_job
from .configs import Config
from .methods import Method, all_methods


def make_row(method: Method, cfg: Config, result: dict) -> dict:
    peak = result.get("peak_bytes")
    return {
        "method": method.name,
        "slug": method.slug,
        "how": method.how,
        "api": method.api,
        "estimator": method.estimator,
        "L": method.L,
        "C": method.C,
        "K": cfg.steps,
        "seconds": result.get("seconds"),
        "times": result.get("times"),
        "first_call_seconds": result.get("first_call_seconds"),
        "peak_mib": None if peak is None else peak / MIB,
        "hvp_count": result.get("hvp_count"),
        "kernel_ops": result.get("kernel_ops"),
        "host_syncs": result.get("host_syncs"),
        "graph_breaks": result.get("graph_breaks"),
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
    ops = "" if row["kernel_ops"] is None else f", {row['kernel_ops']} kernel ops, {row['host_syncs']} host syncs"
    return f"{row['method']}: {row['seconds'] * 1e3:.1f} ms per meta-step, peak {row['peak_mib']:.1f} MiB{hvps}{ops}"


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
    """Time, peak memory and kernel ops against higher exact; time against our FirstOrder (same how) and against our
    Truncated(L) at the same L and how."""
    peer = next((r for r in rows if r["slug"] == "higher" and not r["error"]), None)
    path = lambda r: (r.get("api", "engine"), r["how"])  # the same entry point, per task or batched
    truncated = {(path(r), r["L"]): r for r in rows if r["estimator"] == "Truncated" and not r["error"]}
    first_order = {path(r): r for r in rows if r["estimator"] == "FirstOrder" and not r["error"]}
    for row in rows:
        if row["error"]:
            continue
        ratios = row["ratios"]
        if peer is not None:
            ratios["time_vs_higher"] = row["seconds"] / peer["seconds"]
            ratios["peak_vs_higher"] = row["peak_mib"] / peer["peak_mib"] if peer["peak_mib"] > 0 else None
            if row["kernel_ops"] is not None and peer["kernel_ops"]:
                ratios["kernel_ops_vs_higher"] = row["kernel_ops"] / peer["kernel_ops"]
        if path(row) in first_order:
            ratios["time_vs_first_order"] = row["seconds"] / first_order[path(row)]["seconds"]
        same_l = truncated.get((path(row), row["L"]))
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

