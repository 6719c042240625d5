"""The memory wall's report: the markdown (peaks against K, growth, largest K per budget, the targets) and the plot."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import List, Optional, Tuple

from . import log
from .wall import LARGEST_K_SCANNED, acceptance, fit, growth, largest_k, peak_at, predict

LABELS = {"higher": "higher exact", "autograd": "autograd exact", "exact": "Exact", "exact-ckpt": "Exact, checkpointed",
          "binom1": "Binomial(1)", "binom2": "Binomial(2)", "exact-inner-step": 'Exact, memory_budget="inner_step"'}
BUDGETS_GIB = (8, 16)
SHOWN_KS = (10, 100)  # rows the table always has, from the fits where not measured
PLOT_MAX_K = 100


def methods_of(document: dict) -> List[str]:
    return list(dict.fromkeys(p["method"] for p in document["points"]))


def cell(points: List[dict], method: str, k: int) -> str:
    own = [p for p in points if p["method"] == method and p["K"] == k]
    if own and own[0]["status"] == "measured":
        return f"{own[0]['peak_mib']:,.0f} ({own[0]['seconds']:.1f} s)"
    if all(k < p["K"] for p in points if p["method"] == method):
        return "—"  # a line extrapolated below the method's first point says nothing
    peak, _ = peak_at(points, method, k)
    note = f"; {own[0]['status']}" if own else ""
    return "—" + note if peak is None else f"*~{peak:,.0f} (extrapolated{note})*"


def largest_cell(entry: dict) -> str:
    return {"none": "none (K=1 does not fit)", "unbounded": f"> {LARGEST_K_SCANNED:,}", "unknown": "— (no fit)"}.get(
        entry["how"], f"{entry['K']} ({entry['how']})")


def copy_unit(document: dict) -> Tuple[str, float]:
    """What the growth per step is counted in: copies of the parameters, or of ``document["copy_unit"]`` (a run
    where only part of the model adapts: ``{"name", "mib"}``)."""
    unit = document.get("copy_unit")
    return ("parameter copies", document["parameter_mib"]) if unit is None else (f"copies of the {unit['name']}", unit["mib"])


def derive(document: dict) -> dict:
    """Per method the fit, the growth per step and the largest K per budget; the ResNet-12 targets unless the document
    says ``"targets": false``; for each ``[a, b]`` of ``"compare"``, method a's peaks and growth over method b's."""
    points, pmib = document["points"], document["parameter_mib"]
    per_method = {}
    for m in methods_of(document):
        per_method[m] = {"fit": fit(points, m), "growth": growth(points, m, copy_unit(document)[1]),
                         "largest_k": {f"{b}GiB": largest_k(points, m, b * 1024) for b in BUDGETS_GIB}}
    derived = {"methods": per_method}
    if document.get("targets", True):
        derived["acceptance"] = acceptance(points, pmib)
    if document.get("compare"):
        derived["ratios"] = [ratio(document, a, b, per_method) for a, b in document["compare"] if {a, b} <= set(per_method)]
    return derived


def ratio(document: dict, a: str, b: str, per_method: dict) -> dict:
    """Method a over method b: the peak at every K of the table (each measured or extrapolated) and the growth per step."""
    points, rows = document["points"], []
    for k in sorted({p["K"] for p in points} | set(SHOWN_KS)):
        (pa, how_a), (pb, how_b) = peak_at(points, a, k), peak_at(points, b, k)
        if pa is not None and pb is not None and pb > 0:
            rows.append({"K": k, "ratio": pa / pb, "how": "measured" if how_a == how_b == "measured" else "extrapolated"})
    ga, gb = (per_method[m]["growth"] for m in (a, b))
    growth_ratio = ga["mib_per_step"] / gb["mib_per_step"] if ga and gb and gb["mib_per_step"] > 0 else None
    return {"of": [a, b], "peaks": rows, "growth": growth_ratio}


def markdown(document: dict) -> Tuple[str, dict]:
    derived = derive(document)
    points, methods = document["points"], methods_of(document)
    ks = sorted({p["K"] for p in points} | set(SHOWN_KS))
    lines = [
        f"# The memory wall on {document['device']}: {document['machine']}",
        "",
        f"Command: `{document['command']}` (wall time {document['wall_seconds'] / 60:.1f} min)",
        "",
        f"{document['setting']}. {document['parameters'] / 1e6:.1f}M parameters; one copy of them is "
        f"{document['parameter_mib']:.1f} MiB."
        + (f" The {document['copy_unit']['name']} (what adapts): {document['copy_unit']['parameters']:,} parameters, "
           f"{document['copy_unit']['mib']:.3f} MiB." if document.get("copy_unit") else "")
        + f" Memory: {document['memory']}; each (method, K) point in a fresh process. "
        "Time: that one meta-step (the process's first, so it includes first-call costs"
        + (", and on the CPU under the fixed mmap threshold, which slows large allocations" if document["device"] == "cpu" else "")
        + "; slower on a busy machine, where the peaks stay the same). Extrapolated (*italic*): from a least-squares "
        "line of the measured peaks in the inner-loop points held (K, or for the checkpointed method K/m stored points "
        "plus a segment of m, m = round(sqrt(K))), over K >= 2 where two such K were measured (K = 1, with no interior "
        "point, can sit below that line); the checkpointed method measured at one K takes Exact's growth per point. "
        "Points predicted above --max-memory "
        f"({document['max_memory_mib'] / 1024:.1f} GiB) are skipped, not run.",
        "",
        "Peak MiB (seconds per meta-step) against K:",
        "",
        "| K | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---:|" + "---:|" * len(methods),
        *[f"| {k} | " + " | ".join(cell(points, m, k) for m in methods) + " |" for k in ks],
        "",
        f"| method | growth per inner step | in {copy_unit(document)[0]} | largest K in 8 GiB | largest K in 16 GiB | fitted on |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m in methods:
        info = derived["methods"][m]
        g = info["growth"]
        grown = ("—", "—", "fewer than two K") if g is None else (f"{g['mib_per_step']:,.1f} MiB", f"{g['copies_per_step']:.2f}", g["basis"])
        largest = [largest_cell(info["largest_k"][f"{b}GiB"]) for b in BUDGETS_GIB]
        lines.append(f"| {LABELS[m]} | {grown[0]} | {grown[1]} | {largest[0]} | {largest[1]} | {grown[2]} |")
    for r in derived.get("ratios", []):
        a, b = r["of"]
        cells = [f"{row['ratio']:,.1f}x at K={row['K']}" + ("" if row["how"] == "measured" else " (extrapolated)")
                 for row in r["peaks"]]
        lines += ["", f"{LABELS[a]} / {LABELS[b]}: peak " + ", ".join(cells) + "; growth per inner step "
                  + ("— (no fit)" if r["growth"] is None else f"{r['growth']:,.1f}x") + "."]
    if "acceptance" in derived:
        lines += ["", "Targets:", ""]
        for key, target in derived["acceptance"].items():
            verdict = {True: "met", False: "NOT met", None: "not judged"}[target["met"]]
            lines.append(f"- ({key}) {verdict}: {target['text']}.")
    unmeasured = [p for p in points if p["status"] != "measured"]
    if unmeasured:
        lines += ["", "Not measured: " + "; ".join(f"{LABELS[p['method']]} K={p['K']}: {p['note']}" for p in unmeasured) + "."]
    return "\n".join(lines) + "\n", derived


def plot(document: dict, path: Path) -> Optional[Path]:
    """Peak GiB against K (log axis): measured points solid, each fit dashed up to K=100, the 8 and 16 GiB lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    points = document["points"]
    fig, ax = plt.subplots(figsize=(8, 5))
    top = 1.5 * max(BUDGETS_GIB)
    for i, m in enumerate(methods_of(document)):
        color = f"C{i}"
        own = sorted((p["K"], p["peak_mib"] / 1024) for p in points if p["method"] == m and p["status"] == "measured")
        if own:
            ax.plot(*zip(*own), "-o", color=color, label=LABELS[m])
        line = document.get("methods", {}).get(m, {}).get("fit") or fit(points, m)
        if line is not None:
            start = own[-1][0] if own else 1
            ks = [k for k in range(start, PLOT_MAX_K + 1)]
            ax.plot(ks, [min(predict(line, m, k) / 1024, 2 * top) for k in ks], "--", color=color, alpha=0.8,
                    label=None if own else LABELS[m])
    for budget in BUDGETS_GIB:
        ax.axhline(budget, color="grey", linestyle=":", linewidth=1)
        ax.text(1, budget, f" {budget} GiB", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlim(1, PLOT_MAX_K)
    ax.set_ylim(0, top)
    ax.set_xlabel("inner steps K")
    ax.set_ylabel("peak memory of one meta-step, GiB")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    title = f"{document['setting']} ({document['device']}: {document['machine']}); dashed: extrapolated"
    ax.set_title(textwrap.fill(title, 110), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
