"""Running and reporting a few-shot meta-training run: the common flags, checkpoints, the report.

The example scripts keep the model, the task sampling, the meta-training loop and the evaluation
in view; what is the same for all of them lives here: :func:`common_parser` and :func:`parse`
(flags, presets, the estimator the flags name), :func:`load_tasks` (the data, or a short error
with the fixes), and :class:`Run` (history, checkpoint/resume, ``results.json``, a titled
``curves.png`` and a summary table that says how to read it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import binom_opt as bo

from .omniglot import ALLOW_MODIFIED_ENV, OmniglotCharacters, OmniglotDataError, OmniglotNotFound, TaskSampler

__all__ = ["common_parser", "parse", "make_estimator", "load_tasks", "sampler", "confidence", "meta_batch_numbers", "Run"]

ESTIMATORS = ("fo", "reptile", "imaml", "trunc", "binom", "hybrid", "exact")
# Settings that define the model and the task stream: a checkpoint resumes only with the same ones (layers, heads,
# lora_rank, adapt: the ViT example's; a script without them has None on both sides).
RESUME_KEYS = ("network", "ways", "shots", "queries", "steps", "inner_lr", "estimator", "L", "C", "hessian_scale", "reg",
               "meta_batch", "meta_lr", "hidden", "seed", "layers", "heads", "lora_rank", "adapt")
# what a checkpoint written before a setting existed ran with (every network was Conv4 before --network)
RESUME_DEFAULTS = {"network": "conv4"}


def common_parser(description: str, defaults: dict, presets: Dict[str, dict], omniglot: bool = True) -> argparse.ArgumentParser:
    """The flags every few-shot example takes; ``defaults`` are the script's (its CPU budget). ``omniglot``: the data
    flags find or download Omniglot; otherwise ``--data-root`` is the data set's folder and must be given."""
    p = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    a = p.add_argument
    a("--ways", type=_positive, default=5, help="classes per task")
    a("--shots", type=_positive, default=1, help="support images per class")
    a("--queries", type=_positive, default=15, help="query images per class")
    a("--steps", type=_positive, default=5, help="inner SGD steps K in meta-training")
    a("--eval-steps", type=_positive, default=None, help="inner steps at evaluation (default: --steps)")
    a("--inner-lr", type=_positive_float, default=0.4, help="inner SGD step size alpha")
    a("--estimator", choices=ESTIMATORS, default="binom", help="meta-gradient estimator")
    a("--L", type=_non_negative, default=1, help="expansion order of trunc / binom / hybrid; CG steps of imaml")
    a("--C", type=_non_negative, default=None, help="hybrid: last steps that keep Hessians (default K - 1)")
    a("--hessian-scale", choices=("exact", "paper"), default="paper",
      help="alpha inside binom/hybrid: 'paper' uses L*alpha/K, as the paper does on real data")
    a("--reg", type=_positive_float, default=2.0, help="imaml: the proximal regularisation lambda")
    a("--nan-policy", choices=("raise", "skip_task"), default="raise",
      help="a non-finite meta-gradient (or imaml's CG meeting negative curvature): stop, or drop the task and warn")
    a("--meta-batch", type=_positive, default=32, help="tasks per meta-gradient")
    a("--iterations", type=_non_negative, default=60000, help="meta-training iterations")
    a("--meta-lr", type=_positive_float, default=1e-3, help="Adam step size")
    a("--hidden", type=_positive, default=64, help="filters of the first layer (Conv4: of every layer)")
    a("--task-batched", action="store_true", help="adapt each meta-batch at once (engine.adapt_batch; meant for GPUs)")
    a("--seed", type=int, default=0)
    a("--preset", choices=sorted(presets), default=None, help="a whole setting (flags given explicitly still win)")
    a("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    a("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's, one per core)")
    if omniglot:
        a("--data-root", type=Path, default=None, help="the Omniglot folder (default: $OMNIGLOT_ROOT, then ~/.cache/binom_opt/omniglot)")
        a("--download", action=argparse.BooleanOptionalAction, default=True,
          help="download Omniglot into ~/.cache/binom_opt/omniglot when it is found nowhere")
        a("--allow-modified-data", action="store_true",
          help=f"use Omniglot zips whose SHA-256 is not the release's, with a warning (or ${ALLOW_MODIFIED_ENV}=1)")
    else:
        a("--data-root", type=Path, required=True, help="the data set's folder")
    a("--cache-dir", type=Path, default=None, help="decoded-image cache (default ~/.cache/binom_opt)")
    a("--out", type=Path, default=Path("runs/omniglot"), help="output folder")
    a("--eval-every", type=_non_negative, default=1000, help="validate every N iterations (0: never)")
    a("--val-tasks", type=_positive, default=100, help="validation tasks (the same ones every time)")
    a("--eval-tasks", type=_positive, default=600, help="meta-test tasks of the final evaluation")
    a("--checkpoint-every", type=_positive, default=1000, help="checkpoint every N iterations")
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--early-stopping", action=argparse.BooleanOptionalAction, default=False,
      help="meta-test the model of the best validation, not the last one")
    a("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(**defaults)
    p.presets, p.images_per_class = presets, 20 if omniglot else None
    return p


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, apply ``--preset`` under the explicit flags, and check the flags against each other."""
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**parser.presets[args.preset])
        args = parser.parse_args(argv)
    args.eval_steps = args.eval_steps or args.steps
    args.C = max(args.L, args.steps - 1) if args.C is None else args.C
    if parser.images_per_class and args.shots + args.queries > parser.images_per_class:
        parser.error(f"--shots + --queries must be at most {parser.images_per_class} (images per class), got "
                     f"{args.shots + args.queries}")
    try:
        make_estimator(args).plan(args.steps)
    except ValueError as e:
        parser.error(f"--estimator {args.estimator} with --L {args.L}" + (f" --C {args.C}" if args.estimator == "hybrid" else "")
                     + f" --steps {args.steps}: {e}")
    return args


def make_estimator(args: argparse.Namespace) -> bo.Estimator:
    """The estimator the flags name."""
    return {"fo": lambda: bo.FirstOrder(), "exact": lambda: bo.Exact(), "trunc": lambda: bo.Truncated(args.L),
            "reptile": lambda: bo.Reptile(), "imaml": lambda: bo.Implicit(args.L, args.reg),
            "binom": lambda: bo.Binomial(args.L, hessian_scale=args.hessian_scale),
            "hybrid": lambda: bo.Hybrid(args.L, args.C, hessian_scale=args.hessian_scale)}[args.estimator]()


def load_tasks(args: argparse.Namespace) -> Dict[str, object]:
    """The MAML splits of Omniglot, or a short error (no traceback) that says how to get the data."""
    try:
        characters = OmniglotCharacters.load(args.data_root, cache_dir=args.cache_dir, download=args.download,
                                             verbose=not args.no_progress, allow_modified=args.allow_modified_data)
    except (OmniglotNotFound, OmniglotDataError) as e:
        raise SystemExit(f"error: {e}") from None
    return characters.splits(seed=0)


def sampler(split, args: argparse.Namespace, seed: int) -> TaskSampler:
    return TaskSampler(split, args.ways, args.shots, args.queries, generator=torch.Generator().manual_seed(seed))


def confidence(accuracies: List[float]) -> dict:
    """Mean accuracy over tasks with the half-width of its 95% confidence interval."""
    acc = torch.tensor(accuracies, dtype=torch.float64)
    std = float(acc.std()) if len(acc) > 1 else 0.0
    return {"accuracy": float(acc.mean()), "ci95": 1.96 * std / math.sqrt(len(acc)), "tasks": len(acc)}


class Run:
    """One run's history, checkpoints and report in ``args.out`` (created once the data is there).

    ``Run(args, method, estimator, splits, rank, world)``; ``restore(model, meta_opt, sampler)`` after
    ``--resume``; ``train(...)`` runs the iterations and validates; ``finish(evaluate)`` runs the meta-test,
    writes ``results.json`` and ``curves.png`` and prints the summary table. Under torchrun only rank 0
    validates, tests and writes. With ``--early-stopping`` the meta-test takes the model of the best validation.
    """

    def __init__(self, args: argparse.Namespace, method: str, estimator: bo.Estimator, splits: dict, rank: int = 0,
                 world: int = 1, dataset: str = "Omniglot"):
        self.args, self.method, self.estimator, self.splits, self.rank, self.world = args, method, estimator, splits, rank, world
        self.dataset, self.best = dataset, None  # best: (validation accuracy, iteration, model state)
        self.config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        self.history: dict = {"train": [], "val": []}
        self.iteration, self.train_seconds, self.start = 0, 0.0, time.perf_counter()
        self.checkpoint = args.out / "checkpoint.pt"
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)

    def restore(self, model, meta_opt, train: TaskSampler) -> None:
        if not self.checkpoint.is_file():
            raise SystemExit(f"error: --resume: no checkpoint at {self.checkpoint}")
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        pairs = {k: tuple(c.get(k, RESUME_DEFAULTS.get(k)) for c in (state["config"], self.config)) for k in RESUME_KEYS}
        changed = {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}
        if changed:
            detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise SystemExit(f"error: --resume: {self.checkpoint} was written with other settings ({detail})")
        model.load_state_dict(state["model"])
        meta_opt.load_state_dict(state["meta_opt"])
        train.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.history, self.train_seconds = state["iteration"], state["history"], state["train_seconds"]
        self.best = state.get("best")

    def log(self, iteration: int, seconds: float, **step) -> None:
        self.iteration, self.train_seconds = iteration, self.train_seconds + seconds
        self.history["train"].append({"iteration": iteration, **step})

    def save(self, model, meta_opt, train: TaskSampler) -> None:
        """Write the checkpoint atomically: a crash never leaves half a file."""
        if self.rank != 0:
            return
        state = {"model": model.state_dict(), "meta_opt": meta_opt.state_dict(), "sampler": train.state_dict(),
                 "torch_rng": torch.get_rng_state(), "iteration": self.iteration, "history": self.history,
                 "train_seconds": self.train_seconds, "config": self.config, "best": self.best}
        temporary = self.checkpoint.with_suffix(".tmp")  # an ordinary file (the umask's mode), renamed in one step
        torch.save(state, temporary)
        os.replace(temporary, self.checkpoint)

    def train(self, model, meta_opt, train: TaskSampler, meta_step, evaluate, device) -> None:
        """Iterations ``run.iteration + 1 .. --iterations`` of ``meta_step(batch) -> (loss, accuracy, diverging,
        hvps_per_task)`` on meta-batches of ``train``, with a progress bar, ``evaluate(tasks, count)`` on the same
        --val-tasks validation tasks every --eval-every iterations and a checkpoint every --checkpoint-every."""
        args = self.args
        bar = tqdm(range(self.iteration + 1, args.iterations + 1), initial=self.iteration, total=args.iterations,
                   desc=f"{self.method} {self.estimator}", disable=args.no_progress or self.rank != 0, dynamic_ncols=True)
        shown: set = set()
        for iteration in bar:
            tic = time.perf_counter()
            # a diverging series and an unreliable implicit solve are counted per meta-step and explained in the summary
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss, accuracy, diverging, hvps = meta_step([t.to(device) for t in train.sample_batch(args.meta_batch)])
            for w in caught:  # any other warning is shown once per text and place (the filters' registry resets here)
                place = (str(w.message), w.category, w.filename, w.lineno)
                if not issubclass(w.category, (bo.ExpansionDivergenceWarning, bo.ImplicitSolveWarning)) and place not in shown:
                    shown.add(place)
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            unreliable = any(issubclass(w.category, bo.ImplicitSolveWarning) for w in caught)
            self.log(iteration, time.perf_counter() - tic, loss=loss, accuracy=accuracy, hvps_per_task=hvps, diverging=diverging,
                     unreliable_solve=unreliable)
            if self.rank == 0 and args.eval_every and iteration % args.eval_every == 0:
                validation = sampler(self.splits["val"], args, args.seed + 1)  # the same tasks every time
                self.history["val"].append({"iteration": iteration, **evaluate(validation, args.val_tasks)})
                accuracy = self.history["val"][-1]["accuracy"]
                if args.early_stopping and (self.best is None or accuracy > self.best[0]):
                    self.best = (accuracy, iteration, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                bar.set_postfix(val=f"{accuracy:.3f}")
            if iteration % args.checkpoint_every == 0 or iteration == args.iterations:
                self.save(model, meta_opt, train)

    def finish(self, evaluate, model=None) -> dict:
        """The meta-test (``evaluate(tasks, count)`` on --eval-tasks test tasks; with --early-stopping, of ``model``
        at its best validation), ``results.json``, ``curves.png`` and the summary table; the results (on ranks
        other than 0, only the iteration count)."""
        args, trained = self.args, len(self.history["train"])
        if self.rank != 0:
            return {"rank": self.rank, "iterations": self.iteration}
        if args.early_stopping and self.best is not None and model is not None:
            model.load_state_dict(self.best[2])
        test = evaluate(sampler(self.splits["test"], args, args.seed + 2), args.eval_tasks)
        last = self.history["train"][-1] if trained else {}
        results = {
            "method": self.method, "estimator": repr(self.estimator), "config": self.config, "iterations": trained,
            "test": test, "hvps_per_task": last.get("hvps_per_task", 0), "diverging_fraction": _mean(self.history, "diverging"),
            "unreliable_solve_fraction": _mean(self.history, "unreliable_solve"),
            "train_seconds": self.train_seconds, "seconds_per_iteration": self.train_seconds / trained if trained else float("nan"),
            "wall_seconds_this_process": time.perf_counter() - self.start, "machine": machine(args.device),
            "world_size": self.world, "history": self.history, "dataset": self.dataset,
            "tested_iteration": self.best[1] if args.early_stopping and self.best is not None else trained,
        }
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        title = (f"{self.method} {self.estimator!r}: {self.dataset} {args.ways}-way {args.shots}-shot, K={args.steps}, "
                 f"alpha={args.inner_lr}, meta-batch {args.meta_batch}, {trained} iterations")
        plot(self.history, test, args.out / "curves.png", title, results["tested_iteration"])
        print(summary(results, args), flush=True)
        return results


def meta_batch_numbers(logits: torch.Tensor, labels: torch.Tensor, diverging: bool, engine, tasks: int, world: int):
    """``(loss, accuracy, diverging, HVPs per task)`` of a whole meta-batch of ``tasks``, from this rank's query
    ``logits`` [its tasks, queries, ways] and ``labels`` (summed over the ranks under torchrun)."""
    logits = logits.detach()
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)
    correct = (logits.argmax(-1) == labels).double().mean(1)
    totals = torch.stack([losses.double().sum(), correct.sum(), correct.new_tensor(float(diverging))])
    if world > 1:
        torch.distributed.all_reduce(totals)  # on the tensors' device, as NCCL needs
    totals, stats = totals.cpu(), engine.last_stats
    return float(totals[0]) / tasks, float(totals[1]) / tasks, bool(totals[2]), stats.hvp_count / stats.tasks


def summary(results: dict, args: argparse.Namespace) -> str:
    """The run in a short table, with what it means."""
    test, diverging = results["test"], results["diverging_fraction"]
    lines = [
        "", f"| {results['method']} | {results['estimator']} |", "|---|---|",
        f"| test accuracy ({test['tasks']} tasks of {args.ways}-way {args.shots}-shot"
        + (f", the model of iteration {results['tested_iteration']}, the best validation" if args.early_stopping else "")
        + ") | "
        f"{100 * test['accuracy']:.2f} % ± {100 * test['ci95']:.2f} (95% CI) |",
        f"| training | {results['iterations']} iterations, {results['seconds_per_iteration']:.3f} s each, "
        f"{results['train_seconds'] / 60:.1f} min |",
        f"| HVPs per task's meta-gradient | {results['hvps_per_task']:g} |",
        f"| binomial series diverging | {100 * diverging:.0f} % of the meta-steps |",
        "",
        "How to read it: the accuracy is the mean over the meta-test tasks after --eval-steps plain SGD steps on each "
        "task's support set, with the half-width of its 95% confidence interval.",
    ]
    unreliable = results["unreliable_solve_fraction"]
    if args.estimator == "imaml":
        lines.insert(lines.index("", 1), f"| conjugate gradient unreliable | {100 * unreliable:.0f} % of the meta-steps |")
    if unreliable > 0:
        lines.append(
            f"On {100 * unreliable:.0f} % of the meta-steps the conjugate gradient of some task met negative curvature or "
            f"did not converge (H + reg I is not positive definite where --steps inner steps ended: the inner loop did not "
            f"reach the proximal minimum), so those implicit meta-gradients were unreliable and --nan-policy skip_task "
            f"kept them with a warning. If the accuracy falls short, raise --reg, --steps or --L (CG iterations).")
    if diverging > 0:
        remedies = ("" if args.hessian_scale == "paper" else "--hessian-scale paper, ") + "--estimator trunc or a lower --inner-lr"
        lines.append(
            f"On {100 * diverging:.0f} % of the meta-steps the binomial series of some task grew with the order (a "
            f"higher-order term outweighed the one before it): alpha * ||H|| is large for this expansion there, so those "
            f"meta-gradients were rough estimates of the exact one. The accuracy above is what training reached with "
            f"them; if it falls short, try {remedies}.")
    lines.append(f"Results: {args.out / 'results.json'}" + (", curves.png" if (args.out / "curves.png").is_file() else ""))
    return "\n".join(lines)


def _mean(history: dict, key: str) -> float:
    values = [r.get(key, 0) for r in history["train"]]
    return sum(values) / len(values) if values else 0.0


def machine(device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def plot(history: dict, test: dict, path: Path, title: str, tested: Optional[int] = None) -> Optional[Path]:
    """Training loss and accuracy (moving average), validation and test accuracy; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)", file=sys.stderr)
        return None
    train = history["train"]
    its = [r["iteration"] for r in train]
    window = max(1, len(train) // 50)

    def smooth(key):
        values = [r[key] for r in train]
        return [sum(values[max(0, i - window + 1): i + 1]) / min(window, i + 1) for i in range(len(values))]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(its, smooth("loss"))
    ax_loss.set(xlabel="meta-iteration", ylabel="query loss (training tasks)")
    ax_acc.plot(its, smooth("accuracy"), label="training tasks (query)")
    if history["val"]:
        ax_acc.errorbar([r["iteration"] for r in history["val"]], [r["accuracy"] for r in history["val"]],
                        yerr=[r["ci95"] for r in history["val"]], fmt="o-", label="validation")
    if its:
        ax_acc.errorbar([tested or its[-1]], [test["accuracy"]], yerr=[test["ci95"]], fmt="s", color="black",
                        label=f"test ({test['tasks']} tasks): {100 * test['accuracy']:.1f} %")
    ax_acc.set(xlabel="meta-iteration", ylabel="accuracy", ylim=(0, 1))
    ax_acc.legend(loc="lower right", fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the script docstring's layout and shows each flag's default."""


def _number(text: str, kind: type, check, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not check(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def _non_negative(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0 and math.isfinite(v), "a positive number")
