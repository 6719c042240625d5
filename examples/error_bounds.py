"""The paper's Figure 2: error bounds of FirstOrder, Truncated(L) and Binomial(L) against L.

Three panels, one per theorem (3.6: ||H_k|| <= H; 3.8: convex; 3.10: local strong convexity
over the last M steps), K=5, alpha=0.25, H=1, h=0.1, M=1. Lines are the bounds of
``binom_opt.bounds``; markers are the largest measured error ``||estimate - exact||`` over
random Hessian sequences satisfying each assumption (unit ``g``, d=4, computed with the
library's estimators). Under 3.8 and 3.10 the Hessians share eigenvectors, since the paper's
first-order and truncated bounds there assume commuting Hessians (see ``binom_opt.bounds``).
Theorem 3.10 needs M <= min(L, K - L), so its panel runs over L = 1..K-1.

    python examples/error_bounds.py --out runs/error_bounds --samples 200 --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from binom_opt.bounds import measured_errors, sample_hessians, theorem_3_6, theorem_3_8, theorem_3_10

K, ALPHA, H, SMALL_H, M, DIM = 5, 0.25, 1.0, 0.1, 1, 4
ESTIMATORS = ("fo", "truncated", "binomial")
PANELS = {  # title -> (bound as a function of L, L values, assumption for sample_hessians)
    "Thm 3.6 (||H_k|| <= H)": (lambda L: theorem_3_6(K, L, ALPHA, H), range(K + 1), "3.6"),
    "Thm 3.8 (convex)": (lambda L: theorem_3_8(K, L, ALPHA, H), range(K + 1), "3.8"),
    "Thm 3.10 (strongly convex, last M=1)": (
        lambda L: theorem_3_10(K, L, ALPHA, H, SMALL_H, M),
        range(M, K - M + 1),
        "3.10",
    ),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/error_bounds"), help="output folder for the PNG")
    parser.add_argument("--samples", type=int, default=200, help="random Hessian sequences per assumption")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def worst_measured(assumption, Ls, samples, generator):
    """{L: Bounds-like tuple of the largest measured error of each estimator}."""
    worst = {L: [0.0, 0.0, 0.0] for L in Ls}
    for _ in range(samples):
        hessians = sample_hessians(assumption, K, DIM, H, h=SMALL_H, M=M, generator=generator)
        g = torch.randn(DIM, generator=generator, dtype=torch.float64)
        g = g / g.norm()
        for L in Ls:
            worst[L] = [max(w, e) for w, e in zip(worst[L], measured_errors(hessians, g, ALPHA, L))]
    return worst


def markdown_table(title, bound, Ls, worst):
    lines = [f"### {title}", "", "| L | FO bound | FO max | Trunc bound | Trunc max | Binom bound | Binom max |", "|" + "---|" * 7]
    for L in Ls:
        cells = [f"{b:.3e} | {w:.3e}" for b, w in zip(bound(L), worst[L])]
        lines.append(f"| {L} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib).")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    colors = dict(zip(ESTIMATORS, ("tab:red", "tab:orange", "tab:blue")))
    labels = dict(zip(ESTIMATORS, ("FirstOrder", "Truncated(L)", "Binomial(L)")))
    for ax, (title, (bound, Ls, worst)) in zip(axes, results.items()):
        for i, name in enumerate(ESTIMATORS):
            # Zero errors (exact at L = K) have no place on a log axis.
            points = [(L, bound(L)[i], worst[L][i]) for L in Ls]
            ax.plot([L for L, b, _ in points if b > 0], [b for _, b, _ in points if b > 0], "-", color=colors[name], label=f"{labels[name]} bound")
            measured = [(L, w) for L, _, w in points if w > 0]
            ax.plot(*zip(*measured), "o", mfc="none", color=colors[name], label=f"{labels[name]} measured max")
        ax.set(title=title, xlabel="L", yscale="log", xticks=list(Ls))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("error / ||g||")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Error bounds vs L (K={K}, alpha={ALPHA}, H={H}, h={SMALL_H}, M={M})")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    results, tables = {}, []
    for title, (bound, Ls, assumption) in PANELS.items():
        worst = worst_measured(assumption, Ls, args.samples, generator)
        results[title] = (bound, Ls, worst)
        tables.append(markdown_table(title, bound, Ls, worst))
        print(tables[-1], end="\n\n")
    above = [f"{title} L={L} {name}" for title, (bound, Ls, worst) in results.items() for L in Ls
             for name, b, w in zip(ESTIMATORS, bound(L), worst[L]) if w > b * (1 + 1e-9)]
    tables.append(f"How to read them: a bound is the theorem's worst case for ||estimate - exact|| (unit g); 'max' is the "
                  f"largest error measured over {args.samples} random Hessian sequences that satisfy the assumption. "
                  + (f"Above their bound: {', '.join(above)}." if above else "Every max stays under its bound.")
                  + " The paper's claim is that Binomial's bound falls fastest with L.")
    print(tables[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "error_bounds.md").write_text("\n\n".join(tables) + "\n")
    print(f"wrote {args.out / 'error_bounds.md'}")
    plot(results, args.out / "error_bounds.png")


if __name__ == "__main__":
    main()
