"""Finished runs side by side: the paper's Table 1 layout and its Figure 5a (training curves).

Reads the ``results.json`` of each run folder given (from ``omniglot_maml.py``,
``miniimagenet_maml.py`` or ``omniglot_anil.py``), and writes to ``--out``:

* ``table.md``: one table per setting (data set, ways, shots), a row per estimator ordered as in
  Table 1 (first-order, Reptile, then iMAML, truncated and binomial by L, exact MAML last), with
  the meta-test accuracy and its 95% CI, the difference to exact MAML in percentage points, the
  seconds per iteration and the HVPs per task;
* ``curves.png``: the query loss and accuracy of the training tasks against the iteration, one line
  per run (a moving average), as Figure 5a.

    python examples/compare_runs.py runs/table1/* --out runs/table1
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List

ORDER = ("FirstOrder", "Reptile", "Implicit", "Truncated", "Binomial", "Hybrid", "Exact")
NAMES = {"FirstOrder": "FOMAML", "Reptile": "Reptile", "Implicit": "iMAML", "Truncated": "TruncMAML", "Binomial": "BinomMAML",
         "Hybrid": "Hybrid", "Exact": "MAML"}


def load(folders: List[Path]) -> List[dict]:
    runs = []
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: give the folders of finished runs (their --out)")
        result = json.loads(path.read_text())
        result["folder"] = str(folder)
        runs.append(result)
    if not runs:
        raise SystemExit("error: no runs given")
    return runs


def kind_and_level(estimator: str) -> tuple:
    """``("Binomial", 2)`` from ``"Binomial(L=2, hessian_scale='paper')"``; the level of Implicit is its CG steps."""
    kind = estimator.split("(")[0]
    level = re.search(r"(?:L|cg_steps)=(\d+)", estimator)
    return kind, int(level.group(1)) if level else None


def tables(runs: List[dict]) -> str:
    settings: Dict[tuple, List[dict]] = {}
    for run in runs:
        c = run["config"]
        settings.setdefault((run.get("dataset", "Omniglot"), run["method"], c["ways"], c["shots"]), []).append(run)
    out = []
    for (dataset, method, ways, shots), group in settings.items():
        group.sort(key=lambda r: (ORDER.index(kind_and_level(r["estimator"])[0]), kind_and_level(r["estimator"])[1] or 0))
        maml = next((r for r in group if r["estimator"].startswith("Exact")), None)
        c = group[0]["config"]
        out += [f"### {dataset} {ways}-way {shots}-shot ({method}, K={c['steps']}, alpha={c['inner_lr']}, meta-batch "
                f"{c['meta_batch']}, {group[0]['iterations']} iterations, {group[0]['test']['tasks']} test tasks)", "",
                "| method | L | accuracy (%) | Δ vs MAML (pp) | s / iteration | HVPs / task |", "|---|---|---|---|---|---|"]
        for r in group:
            kind, level = kind_and_level(r["estimator"])
            accuracy, ci = 100 * r["test"]["accuracy"], 100 * r["test"]["ci95"]
            delta = "" if maml is None or r is maml else f"{accuracy - 100 * maml['test']['accuracy']:+.2f}"
            scale = " (paper scale)" if "hessian_scale='paper'" in r["estimator"] else ""
            out.append(f"| {NAMES.get(kind, kind)}{scale} | {'' if level is None else level} | {accuracy:.2f} ± {ci:.2f} | "
                       f"{delta} | {r['seconds_per_iteration']:.3f} | {r['hvps_per_task']:g} |")
        out += ["", "Δ: accuracy minus exact MAML's; with 95% intervals of about ±{:.1f} pp on each side, differences smaller "
                "than their sum are not resolved by these runs.".format(max(100 * r["test"]["ci95"] for r in group)), ""]
    return "\n".join(out)


def curves(runs: List[dict], path: Path) -> bool:
    """Figure 5a: training query loss and accuracy against the iteration, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)", file=sys.stderr)
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        train = run["history"]["train"]
        window = max(1, len(train) // 40)
        its = [r["iteration"] for r in train]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            values = [r[key] for r in train]
            smooth = [sum(values[max(0, i - window + 1): i + 1]) / min(window, i + 1) for i in range(len(values))]
            ax.plot(its, smooth, label=run["estimator"].replace(", hessian_scale='exact'", ""), lw=1.2)
    ax_loss.set(xlabel="meta-iteration", ylabel="query loss (training tasks)")
    ax_acc.set(xlabel="meta-iteration", ylabel="query accuracy (training tasks)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="lower right")
    c = runs[0]["config"]
    fig.suptitle(f"{runs[0].get('dataset', 'Omniglot')} {c['ways']}-way {c['shots']}-shot {runs[0]['method']}: training curves "
                 f"(moving average over {max(1, len(runs[0]['history']['train']) // 40)} iterations)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="folders of finished runs (each holds results.json)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="where table.md and curves.png go")
    args = parser.parse_args(argv)
    runs = load(args.runs)
    text = tables(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    drawn = curves(runs, args.out / "curves.png")
    print(text)
    print(f"wrote {args.out / 'table.md'}" + (f" and {args.out / 'curves.png'}" if drawn else ""))
    return text


if __name__ == "__main__":
    main()
