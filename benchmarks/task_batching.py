"""Task batching against the per-task loop: batched / per-task time and peak memory for each estimator.

Reads the JSON that ``benchmarks/run.py`` wrote for each configuration (every estimator run ``-task`` and
``-batch``, and through the functional entry points ``-ftask`` and ``-fbatch``, in the same run) and writes
one table with the ratios and whether each meets the targets (time <= 1.0x, peak memory <= 1.1x the
per-task loop's)::

    python benchmarks/run.py --config omniglot --quick --threads 2 --levels 1 2 --ks --out RUNS/quick \\
        --methods 'fo-*' 'trunc1-*' 'binom1-*' 'binom2-*' exact-task exact-batch exact-ftask exact-fbatch
    python benchmarks/run.py --config omniglot --threads 2 --levels 1 2 --repeats 2 --error-tasks 2 --ks --out RUNS/full \\
        --methods (the same)
    python benchmarks/task_batching.py RUNS/quick/omniglot_cpu_quick.json RUNS/full/omniglot_cpu.json \\
        --out benchmarks/results/task_batching_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

TIME_TARGET, MEMORY_TARGET = 1.0, 1.1


def ratios(run: dict) -> List[dict]:
    """One row per estimator that ran both per task and batched."""
    by = {(r.get("api", "engine"), r["how"], r["slug"].rsplit("-", 1)[0]): r for r in run["rows"] if not r["error"]}
    cfg = run["config"]
    rows = []
    for (api, how, key), task in by.items():
        batch = by.get((api, "batched", key))
        if how != "per-task" or batch is None:
            continue
        time, memory = batch["seconds"] / task["seconds"], batch["peak_mib"] / task["peak_mib"]
        rows.append({
            "setting": f"B={cfg['meta_batch']}, Conv4-{cfg['hidden']}",
            "api": {"engine": "adapt / adapt_batch", "functional": "meta_gradient / meta_gradient_batched"}[api],
            "estimator": task["method"].replace(" (per-task)", "").replace(" (meta_gradient)", ""),
            "per_task_ms": task["seconds"] * 1e3, "batched_ms": batch["seconds"] * 1e3, "time_ratio": time,
            "per_task_mib": task["peak_mib"], "batched_mib": batch["peak_mib"], "memory_ratio": memory,
            "time_met": time <= TIME_TARGET, "memory_met": memory <= MEMORY_TARGET,
        })
    return rows


def markdown(runs: List[dict], rows: List[dict], note: str) -> str:
    machine = runs[0]["machine"]
    lines = [
        f"# Task batching against the per-task loop, {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}",
        "",
        *([note, ""] if note else []),
        "Commands (each estimator per task and batched in the same run, each method in its own process):",
        "",
        *[f"- `{run['command']}`" for run in runs],
        "",
        "Omniglot shapes (1x28x28, 5-way 1-shot, 15 queries per class, K=5 inner SGD steps at lr 0.4), random data, default "
        "options (memory_budget='auto'). Engine: per task `engine.adapt` and a backward per task, batched `engine.adapt_batch`, "
        "the query forward of the whole meta-batch (written by the user, so the CPU plan checkpoints it per task), one "
        "backward. Functional: per task `functional.meta_gradient` in a loop, batched `functional.meta_gradient_batched` "
        "(given the query loss, so nothing is recomputed). Time: median of the timed meta-steps after a warm-up; "
        "memory: peak resident memory of a meta-step above the baseline (benchmarks/README.md). "
        f"Targets: batched/per-task time <= {TIME_TARGET:.1f}x, memory <= {MEMORY_TARGET:.1f}x.",
        "",
        "| setting | entry points | estimator | per task ms | batched ms | time ratio | per task MiB | batched MiB | memory ratio "
        "| time met | memory met |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['api']} | {r['estimator']} | {r['per_task_ms']:.0f} | {r['batched_ms']:.0f} | {r['time_ratio']:.2f}x | "
            f"{r['per_task_mib']:.1f} | {r['batched_mib']:.1f} | {r['memory_ratio']:.2f}x | {'met' if r['time_met'] else 'NOT met'} | "
            f"{'met' if r['memory_met'] else 'NOT met'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by benchmarks/run.py")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix (.json and .md are written)")
    parser.add_argument("--note", default="", help="a line on the machine and the conditions of the runs")
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.runs]
    rows = [row for run in runs for row in ratios(run)]
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "ratios": rows, "note": args.note}, indent=1))
    text = markdown(runs, rows, args.note)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
