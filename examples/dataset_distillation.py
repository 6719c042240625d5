"""Dataset distillation on Omniglot (Wang et al., 2018): a meta-gradient through hundreds of inner steps.

Learn one synthetic image per character so that K plain SGD steps on those images alone, from a RANDOM
initialisation, train a small ConvNet that recognises real held-out drawings of the characters. The images
are the meta-parameters of the support loss; their meta-gradient goes through all K steps, exactly
(graph-free ``bo.Exact()``, memory flat in K) or with the estimator dial (``--estimator``). Each
meta-iteration draws a new initialisation, so the images must work for any.

The run then trains the net from fresh initialisations on the distilled images and, as the baseline, on the
same number of randomly chosen real drawings (same K, same step size), and reports test accuracy with 95%
confidence intervals; it measures the meta-gradient of Truncated and Binomial against Exact at equal cost,
and one meta-step's peak memory of higher against ours (child processes). Outputs in ``--out``:
``results.json``, ``table.md``, ``distilled.png``.

    python examples/dataset_distillation.py                         # 10 characters, K = 200 (CPU, < 10 min)
    python examples/dataset_distillation.py --estimator trunc --L 20 --out runs/distill_trunc
    python examples/dataset_distillation.py --steps 1000 --checkpoint-every 32 --iterations 20
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import binom_opt as bo
from binom_opt.functional import meta_gradient

from fewshot.distillation import Characters, ConvNet, accuracy, confidence, peak_memory_in_child, random_init, train_from_scratch
from fewshot.omniglot import OmniglotDataError, OmniglotNotFound
from fewshot.run import machine

# On the CPU memory_budget="auto" runs a round's products at once, and the images' meta-gradient then holds the
# activations of all K steps together (more than higher at K = 100); "inner_step" keeps one step's at a time.
MEMORY_BUDGET = "inner_step"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--classes", type=int, default=10, help="Omniglot characters (meta-test split), one synthetic image each")
    a("--steps", type=int, default=200, help="inner SGD steps K on the synthetic images")
    a("--lr", type=float, default=0.1, help="inner SGD step size (also the baseline's)")
    a("--learn-lr", action="store_true", help="meta-learn the inner step size too (Wang et al.); the baseline then uses it")
    a("--iterations", type=int, default=60, help="meta-iterations (one random initialisation each)")
    a("--meta-lr", type=float, default=0.02, help="Adam step size on the pixels")
    a("--init", choices=("real", "noise"), default="real", help="start from random real drawings or from noise")
    a("--estimator", choices=("exact", "binom", "trunc", "hybrid"), default="exact")
    a("--L", type=int, default=1, help="order of binom/trunc/hybrid")
    a("--C", type=int, default=None, help="hybrid: the last steps that keep Hessians")
    a("--checkpoint-every", type=int, default=None, help="store every m-th inner point, recompute the rest")
    a("--hidden", type=int, default=16, help="ConvNet width")
    a("--eval-inits", type=int, default=10, help="random initialisations (and real-image draws) in the evaluation")
    a("--compare", action=argparse.BooleanOptionalAction, default=True, help="estimators at equal cost against Exact")
    a("--memory", action=argparse.BooleanOptionalAction, default=True, help="peak memory of higher and ours, in children")
    a("--memory-ks", type=int, nargs="*", default=None, help="K values of the memory table (default K/2, K, 2K)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=None)
    a("--data-root", type=Path, default=None)
    a("--cache-dir", type=Path, default=None)
    a("--no-download", dest="download", action="store_false")
    a("--allow-modified-data", action="store_true", help="use Omniglot zips whose SHA-256 is not the release's, with a warning")
    a("--out", type=Path, default=Path("runs/dataset_distillation"))
    a("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("classes", "steps", "iterations", "eval_inits", "hidden"):
        if getattr(args, name) < (2 if name == "classes" else 1):
            p.error(f"--{name.replace('_', '-')} must be at least {2 if name == 'classes' else 1}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a positive number, got {args.lr}")
    try:
        estimator(args).plan(args.steps)
        bo.Options(checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        p.error(str(e))
    return args


def estimator(args) -> bo.Estimator:
    return {"exact": lambda: bo.Exact(), "binom": lambda: bo.Binomial(args.L), "trunc": lambda: bo.Truncated(args.L),
            "hybrid": lambda: bo.Hybrid(args.L, args.C if args.C is not None else args.steps)}[args.estimator]()


def distill(net, chars, args, log_lr):
    """Meta-train the synthetic images (and the step size with --learn-lr): the meta-gradient through all K steps."""
    real, real_labels = chars.flat("train")
    start = chars.random_real(1, args.seed) if args.init == "real" else torch.rand_like(chars.train[:, 0]) * 0.2
    images = start.clone().requires_grad_(True)
    labels = torch.arange(chars.classes)
    meta_opt = torch.optim.Adam([images, log_lr] if args.learn_lr else [images], lr=args.meta_lr)
    call = lambda p, x: torch.func.functional_call(net, p, (x,))
    history, est = [], estimator(args)
    bar = tqdm(range(args.iterations), desc=f"distilling, K={args.steps}, {est!r}", disable=args.no_progress)
    for it in bar:
        lr = log_lr.exp() if args.learn_lr else args.lr
        init = random_init(net, args.seed * 1_000_003 + it)  # a new random initialisation every meta-iteration
        meta = {"images": images, **({"lr": lr} if args.learn_lr else {})}
        grads, stats = meta_gradient(lambda p: F.cross_entropy(call(p, images), labels),
                                     lambda p: F.cross_entropy(call(p, real), real_labels), init, steps=args.steps, lr=lr,
                                     estimator=est, meta_params=meta, checkpoint_every=args.checkpoint_every,
                                     memory_budget=MEMORY_BUDGET, return_stats=True)
        meta_opt.zero_grad()
        images.grad = grads["images"]
        if args.learn_lr:
            log_lr.grad = (grads["lr"] * lr).detach()  # d/d log(lr) = lr * d/d lr
        meta_opt.step()
        history.append({"iteration": it + 1, "final_support_loss": stats.inner_losses[-1], "hvps": stats.hvp_count})
        bar.set_postfix(support_loss=f"{stats.inner_losses[-1]:.3f}")
    return start, images.detach(), history


def evaluate(net, chars, images, steps, lr, inits, seed, per_class_real=None):
    """Test accuracy after training from ``inits`` fresh initialisations on ``images`` (or, with ``per_class_real``,
    on that many randomly chosen real drawings per class, a new draw for each initialisation)."""
    test, test_labels = chars.flat("test")
    accuracies = []
    for i in range(inits):
        x = images if per_class_real is None else chars.random_real(per_class_real, seed + 7919 * (i + 1))
        y = torch.arange(chars.classes).repeat_interleave(len(x) // chars.classes)
        accuracies.append(accuracy(net, train_from_scratch(net, x, y, steps, lr, seed=10_000 + i), test, test_labels))
    return confidence(accuracies)


def compare_estimators(net, chars, images, args, lr):
    """Truncated and Binomial against Exact at equal cost (equal HVP counts), on one random initialisation and the
    distilled images: relative error and cosine of the images' meta-gradient, HVPs, seconds."""
    real, real_labels = chars.flat("train")
    x = images.clone().requires_grad_(True)
    call = lambda p, inp: torch.func.functional_call(net, p, (inp,))
    init, labels, K = random_init(net, 123), torch.arange(chars.classes), args.steps
    budget = max(1, K // 10)
    estimators = [bo.Exact(), bo.Binomial(1), bo.Truncated(budget), bo.Hybrid(1, budget)]
    rows, exact = [], None
    for est in estimators:
        tic = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bo.ExpansionDivergenceWarning)  # reported in the table instead
            g, stats = meta_gradient(lambda p: F.cross_entropy(call(p, x), labels),
                                     lambda p: F.cross_entropy(call(p, real), real_labels), init, steps=K, lr=lr,
                                     estimator=est, meta_params={"images": x}, return_stats=True)
        g, seconds = g["images"].flatten(), time.perf_counter() - tic
        exact = g if exact is None else exact
        rows.append({"estimator": repr(est), "hvps": stats.hvp_count, "seconds": seconds,
                     "relative_error": float((g - exact).norm() / exact.norm()),
                     "cosine": float(F.cosine_similarity(g, exact, dim=0)), "diverging": bool(stats.diverging)})
    return rows


def memory_table(net, chars, images, args, lr):
    """One meta-step's peak resident memory (MiB above the step's start) and seconds, each in a child process."""
    ks = args.memory_ks or [max(1, args.steps // 2), args.steps, 2 * args.steps]
    real, real_labels = chars.flat("train")
    job = dict(classes=chars.classes, hidden=args.hidden, images=images, real=real, real_labels=real_labels, lr=float(lr),
               threads=torch.get_num_threads(), memory_budget=MEMORY_BUDGET)
    plan = [("higher", None, k) for k in ks[:2]] + [("exact", None, k) for k in ks] + [("exact", "sqrt", 4 * ks[-1])]
    rows = []
    for method, every, k in tqdm(plan, desc="peak memory (child processes)", disable=args.no_progress):
        result = peak_memory_in_child({**job, "method": method, "steps": k, "checkpoint_every": every})
        name = {"higher": "higher (unrolled)", "exact": "binom_opt Exact"}[method]
        rows.append({"method": name + (f", checkpoint_every={round(math.sqrt(k))}" if every else ""), "K": k, **result})
    return rows


def picture(start, images, names, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no distilled.png", file=sys.stderr)
        return None
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.2), squeeze=False)
    for row, (label, batch) in enumerate((("start (real)", start), ("distilled", images))):
        for i, ax in enumerate(axes[row]):
            img = batch[i, 0].numpy()
            bound = float(abs(img).max()) or 1.0  # symmetric scale: 0 (background) is white, ink and its opposite show
            ax.imshow(img, cmap="RdGy_r", vmin=-bound, vmax=bound)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
            if row == 0:
                alphabet, character = names[i].split("/")
                ax.set_title(alphabet.split("_(")[0].replace("_", " ")[:16] + "\n" + character, fontsize=6)
    fig.suptitle(title + "\nred: ink (> 0), white: background (0), grey: below 0", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(results) -> str:
    a, e = results["config"], results["evaluation"]
    pct = lambda r: f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f} %"
    lines = [f"Test accuracy on {e['test_images']} held-out real drawings of {a['classes']} Omniglot characters after "
             f"K = {a['steps']} SGD steps (lr {results['inner_lr']:.4g}) from a random initialisation, mean ± 95% CI over "
             f"{a['eval_inits']} initialisations (chance {100 / a['classes']:.0f} %):", "",
             "| trained on | images | test accuracy |", "|---|---:|---:|",
             f"| distilled images ({results['estimator']}, {a['iterations']} meta-iterations) | {a['classes']} | "
             f"**{pct(e['distilled'])}** |",
             f"| random real drawings, 1 per class (a new draw per initialisation) | {a['classes']} | {pct(e['random_real'])} |",
             f"| all real training drawings (reference) | {e['real_train_images']} | {pct(e['all_real'])} |"]
    if results.get("estimators"):
        lines += ["", f"The images' meta-gradient at the distilled images, one random initialisation, K = {a['steps']}: "
                  "each estimator against Exact. Equal cost is equal HVPs (the cost on a CPU): Binomial(1) costs "
                  "K HVPs like Exact; Truncated(C) and Hybrid(1, C) (Binomial(1) over the last C steps) both cost C.", "",
                  "| estimator | HVPs | seconds | relative error | cosine to Exact |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['estimator']} | {r['hvps']} | {r['seconds']:.2f} | {r['relative_error']:.2e}"
                  f"{' (series grows)' if r['diverging'] else ''} | {r['cosine']:.4f} |" for r in results["estimators"]]
    if results.get("memory"):
        lines += ["", "One meta-step's peak resident memory above its start (MiB) and its time, each in a child process; "
                  "the growth per inner step is the slope from the method's previous row:", "",
                  "| method | K | peak MiB | MiB per inner step | seconds |", "|---|---:|---:|---:|---:|"]
        previous = {}
        for r in results["memory"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['K']} | failed: {r['error']} | | |")
                continue
            last = previous.get(r["method"])
            slope = f"{(r['peak_mib'] - last['peak_mib']) / (r['K'] - last['K']):.3f}" if last else ""
            lines.append(f"| {r['method']} | {r['K']} | {r['peak_mib']:.1f} | {slope} | {r['seconds']:.1f} |")
            previous[r["method"]] = r
    lines += ["", f"Wall time {results['wall_seconds'] / 60:.1f} min ({results['distill_seconds'] / 60:.1f} min distilling) "
              f"on {results['machine']['processor']}, {results['machine']['torch_threads']} threads."]
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    tic = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        chars = Characters.load(args.classes, args.seed, data_root=args.data_root, cache_dir=args.cache_dir,
                                download=args.download, verbose=not args.no_progress, allow_modified=args.allow_modified_data)
    except (OmniglotNotFound, OmniglotDataError) as e:
        raise SystemExit(f"error: {e}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    net = ConvNet(args.classes, args.hidden)
    log_lr = torch.tensor(math.log(args.lr), requires_grad=True)
    start, images, history = distill(net, chars, args, log_lr)
    distill_seconds = time.perf_counter() - tic
    lr = float(log_lr.detach().exp()) if args.learn_lr else args.lr
    seed = args.seed + 1
    evaluation = {"distilled": evaluate(net, chars, images, args.steps, lr, args.eval_inits, seed),
                  "random_real": evaluate(net, chars, None, args.steps, lr, args.eval_inits, seed, per_class_real=1),
                  "all_real": evaluate(net, chars, chars.flat("train")[0], args.steps, lr, args.eval_inits, seed),
                  "test_images": chars.test.shape[0] * chars.test.shape[1],
                  "real_train_images": chars.train.shape[0] * chars.train.shape[1]}
    results = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "estimator": repr(estimator(args)), "inner_lr": lr, "characters": list(chars.names), "evaluation": evaluation,
               "history": history, "distill_seconds": distill_seconds, "machine": machine("cpu")}
    results["estimators"] = compare_estimators(net, chars, images, args, lr) if args.compare else []
    results["memory"] = memory_table(net, chars, images, args, lr) if args.memory else []
    results["wall_seconds"] = time.perf_counter() - tic
    torch.save({"images": images, "start": start, "inner_lr": lr, "characters": chars.names}, args.out / "distilled.pt")
    picture(start, images, chars.names, args.out / "distilled.png",
            f"{args.classes} Omniglot characters distilled into one image each: K={args.steps} SGD steps from a random "
            f"init reach {100 * evaluation['distilled']['mean']:.1f} % on held-out drawings "
            f"(random real drawings: {100 * evaluation['random_real']['mean']:.1f} %)")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(table(results) + "\n")
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
