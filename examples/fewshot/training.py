"""Meta-training on Omniglot, shared by the example scripts: CLI, training loop, checkpoints, evaluation, report.

A script chooses what adapts in the inner loop (:data:`ANIL`: the linear head; :data:`MAML`: all
of Conv4) and its CPU defaults, and gets its ``main(argv)`` from :func:`entry_point`::

    main = entry_point(ANIL, __doc__, defaults={"iterations": 1000})
    results = main(["--estimator", "trunc", "--L", "2"])

Outputs in ``--out``: ``checkpoint.pt`` (every ``--checkpoint-every`` iterations and at the end,
written atomically), ``results.json`` and ``curves.png`` (when matplotlib is installed).
``--resume`` continues from ``checkpoint.pt`` with the same random streams, so the run ends
where an uninterrupted one would (bitwise on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call

import binom_opt as bo

from .models import Conv4
from .omniglot import OmniglotCharacters, OmniglotDataError, TaskSampler

Tensors = Dict[str, torch.Tensor]
SupportLoss = Callable[[Tensors], torch.Tensor]

__all__ = ["ANIL", "MAML", "Method", "build_parser", "parse_args", "make_estimator", "run", "entry_point", "evaluate"]

ESTIMATORS = ("fo", "trunc", "binom", "hybrid", "exact")
CHECKPOINT = "checkpoint.pt"
# Settings that define the model and the task stream: a checkpoint may only resume with the same ones.
RESUME_KEYS = (
    "method", "ways", "shots", "queries", "steps", "inner_lr", "estimator", "L", "C", "hessian_scale",
    "meta_batch", "meta_lr", "hidden", "seed",
)
# The standard protocol for a GPU (Finn et al. 2017 for Omniglot 5-way 1-shot: 32 tasks a meta-batch,
# 60000 iterations, alpha = 0.4; K = 5 inner steps in training and 10 at test time).
PRESETS = {
    "paper": dict(
        ways=5, shots=1, queries=15, steps=5, eval_steps=10, inner_lr=0.4, meta_batch=32,
        iterations=60000, meta_lr=1e-3, hidden=64, eval_every=1000, val_tasks=600, checkpoint_every=1000,
    ),
}


# --- what adapts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """Which Conv4 parameters adapt in the inner loop, and the support loss as a function of them.

    `support_loss(model, x, y)` returns a pure function of the adapted parameters (by name); it
    may precompute whatever does not depend on them, once per task. `batched_support(model, x, y)`
    gives the same for a meta-batch (``x``: ``[B, N, ...]``): ``(closure, tasks)`` for
    ``engine.adapt_batch``.
    """

    name: str
    adapted_names: Callable[[Conv4], List[str]]
    support_loss: Callable[[Conv4, torch.Tensor, torch.Tensor], SupportLoss]
    batched_support: Callable[[Conv4, torch.Tensor, torch.Tensor], Tuple[Callable, tuple]]


def _anil_support_loss(model: Conv4, x: torch.Tensor, y: torch.Tensor) -> SupportLoss:
    # The body's features do not change in the inner loop: compute them once per task. The engine
    # still finds their dependence on the body and gives the body its meta-gradient.
    features = model.features(x)
    return lambda p: F.cross_entropy(F.linear(features, p["head.weight"], p["head.bias"]), y)


def _maml_support_loss(model: Conv4, x: torch.Tensor, y: torch.Tensor) -> SupportLoss:
    return lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)


def _anil_batched(model: Conv4, x: torch.Tensor, y: torch.Tensor):
    # Each task's features with its own BatchNorm statistics (vmap over tasks); they require grad,
    # and adapt_batch gives them (so the body) their meta-gradient through the inner loop.
    features = torch.func.vmap(model.features)(x)
    return (lambda m, task: F.cross_entropy(F.linear(task[0], m.params["head.weight"], m.params["head.bias"]), task[1]),
            (features, y))


def _maml_batched(model: Conv4, x: torch.Tensor, y: torch.Tensor):
    return lambda m, task: F.cross_entropy(m(task[0]), task[1]), (x, y)


ANIL = Method("anil", lambda model: ["head.weight", "head.bias"], _anil_support_loss, _anil_batched)
"""ANIL (Raghu et al., 2020): the linear head adapts, the Conv4 body is meta-learned."""
MAML = Method("maml", lambda model: [n for n, _ in model.named_parameters()], _maml_support_loss, _maml_batched)
"""MAML (Finn et al., 2017): every Conv4 parameter adapts."""


# --- command line -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the script docstring's layout and shows each flag's default."""


def build_parser(description: str, defaults: Optional[dict] = None, *, choose_estimator: bool = True) -> argparse.ArgumentParser:
    """The Omniglot meta-training CLI; `defaults` overrides the built-in defaults (a script's CPU budget).

    ``choose_estimator=False`` leaves out ``--estimator``, for scripts that run several
    (``defaults["estimator"]`` then names the one whose constraints on ``--L``/``--C`` are checked).
    """
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    task = p.add_argument_group("tasks")
    task.add_argument("--ways", type=_positive_int, default=5, help="classes per task")
    task.add_argument("--shots", type=_positive_int, default=1, help="support images per class")
    task.add_argument("--queries", type=_positive_int, default=15, help="query images per class")
    inner = p.add_argument_group("inner loop and estimator")
    inner.add_argument("--steps", type=_positive_int, default=5, help="inner SGD steps K in meta-training")
    inner.add_argument("--eval-steps", type=_positive_int, default=None, help="inner steps at evaluation; None: as --steps")
    inner.add_argument("--inner-lr", type=_positive_float, default=0.4, help="inner SGD step size alpha")
    if choose_estimator:
        inner.add_argument("--estimator", choices=ESTIMATORS, default="binom", help="meta-gradient estimator")
    else:
        p.set_defaults(estimator="binom")
    inner.add_argument("--L", type=_non_negative_int, default=1, help="expansion order of trunc/binom/hybrid")
    inner.add_argument("--C", type=_non_negative_int, default=None, help="hybrid: last steps that keep Hessians; None: K-1")
    inner.add_argument(
        "--hessian-scale", choices=("exact", "paper"), default="paper",
        help="alpha inside binom/hybrid: 'paper' uses L*alpha/K as the paper does on real data; with 'exact' the "
             "series diverges for Omniglot ANIL at alpha=0.1 (Binomial(1) 88.8%%, Binomial(2) 72.6%% vs 95.6%%, see README)",
    )
    outer = p.add_argument_group("meta-training")
    outer.add_argument("--meta-batch", type=_positive_int, default=32, help="tasks per meta-gradient")
    outer.add_argument("--iterations", type=_non_negative_int, default=60000, help="meta-training iterations")
    outer.add_argument("--meta-lr", type=_positive_float, default=1e-3, help="Adam step size")
    outer.add_argument("--hidden", type=_positive_int, default=64, help="Conv4 filters per layer")
    outer.add_argument("--task-batched", action="store_true",
                       help="adapt the meta-batch at once (engine.adapt_batch; meant for GPUs) instead of task by task")
    outer.add_argument("--seed", type=int, default=0)
    outer.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="the standard GPU protocol (flags given explicitly still win)")
    run_ = p.add_argument_group("running")
    run_.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    run_.add_argument("--threads", type=_positive_int, default=1,
                      help="torch CPU threads: one task's kernels are small, so 1 is fastest on a small or busy CPU")
    run_.add_argument("--data-root", type=Path, default=None, help="Omniglot folder; None: $OMNIGLOT_ROOT")
    run_.add_argument("--cache-dir", type=Path, default=None,
                      help="decoded-image cache; None: beside the data, or ~/.cache/binom_opt if that is read-only")
    run_.add_argument("--out", type=Path, default=Path("runs/omniglot"), help="output folder")
    run_.add_argument("--eval-every", type=_non_negative_int, default=1000, help="validate every N iterations (0: never)")
    run_.add_argument("--val-tasks", type=_positive_int, default=100, help="validation tasks")
    run_.add_argument("--checkpoint-every", type=_positive_int, default=1000, help="checkpoint every N iterations")
    run_.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT}")
    run_.add_argument("--eval-tasks", type=_positive_int, default=600, help="meta-test tasks of the final evaluation")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(**(defaults or {}))
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, apply ``--preset`` under the explicit flags, and check the flags against each other."""
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    if args.eval_steps is None:
        args.eval_steps = args.steps
    if args.C is None:
        args.C = max(args.L, args.steps - 1)
    if args.shots + args.queries > 20:
        parser.error(f"--shots + --queries must be at most 20 (drawings per character), got {args.shots + args.queries}")
    try:
        make_estimator(args).plan(args.steps)
    except ValueError as e:
        window = f" --C {args.C}" if args.estimator == "hybrid" else ""
        parser.error(f"--estimator {args.estimator} with --L {args.L}{window} --steps {args.steps}: {e}")
    return args


def make_estimator(args: argparse.Namespace) -> bo.Estimator:
    """The estimator the flags name."""
    if args.estimator == "fo":
        return bo.FirstOrder()
    if args.estimator == "exact":
        return bo.Exact()
    if args.estimator == "trunc":
        return bo.Truncated(args.L)
    if args.estimator == "binom":
        return bo.Binomial(args.L, hessian_scale=args.hessian_scale)
    return bo.Hybrid(args.L, args.C, hessian_scale=args.hessian_scale)


# --- one meta-step and evaluation ---------------------------------------------------------------


def meta_step(model, engine, method: Method, meta_opt, batch, device, rank: int = 0, world: int = 1,
              task_batched: bool = False) -> Dict[str, float]:
    """One meta-gradient over a meta-batch and one Adam step.

    The tasks are adapted one by one (gradients accumulate), or all at once with
    ``engine.adapt_batch`` when ``task_batched``. Under ``torchrun`` every rank holds the same
    meta-batch and takes its share of the tasks; the gradients (each task's loss divided by the
    whole meta-batch size) are summed over ranks, so every rank takes the step a single process
    would take on the whole meta-batch.
    """
    x_s, y_s, x_q, y_q = (t.to(device) for t in batch)
    tasks = len(x_s)
    meta_opt.zero_grad(set_to_none=True)
    totals = torch.zeros(4, dtype=torch.float64)  # loss, accuracy, HVPs, rounds: summed over tasks
    share = list(bo.distributed.shard(tasks, rank, world))
    if task_batched and share:
        closure, support = method.batched_support(model, x_s[share], y_s[share])
        logits = engine.adapt_batch(closure, support)(x_q[share])  # [tasks of this rank, queries, ways]
        losses = F.cross_entropy(logits.flatten(0, 1), y_q[share].flatten(), reduction="none").view(len(share), -1).mean(1)
        (losses.sum() / tasks).backward()
        stats = engine.last_stats
        correct = (logits.argmax(-1) == y_q[share]).float().mean(1).sum()
        totals += torch.tensor([losses.sum().item(), correct.item(), stats.hvp_count, stats.rounds * len(share)],
                               dtype=torch.float64)
    else:
        for t in share:
            support = method.support_loss(model, x_s[t], y_s[t])
            learner = engine.adapt(lambda m: support(m.params))
            logits = learner(x_q[t])
            loss = F.cross_entropy(logits, y_q[t])
            (loss / tasks).backward()
            stats = engine.last_stats
            totals += torch.tensor(
                [loss.item(), (logits.argmax(1) == y_q[t]).float().mean().item(), stats.hvp_count, stats.rounds],
                dtype=torch.float64,
            )
    bo.distributed.all_reduce_gradients(model.parameters())
    if world > 1:
        torch.distributed.all_reduce(totals)
    meta_opt.step()
    loss_sum, correct, hvps, rounds = (float(v) / tasks for v in totals)
    return {"loss": loss_sum, "accuracy": correct, "hvps_per_task": hvps, "rounds_per_task": rounds}


def adapt_plain(model, method: Method, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> Tensors:
    """K plain SGD steps on the support loss with torch autograd (no meta-gradient, no graph kept)."""
    with torch.no_grad():  # ANIL: the body's features, without a graph
        support = method.support_loss(model, x, y)
    names = method.adapted_names(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    for _ in range(steps):
        with torch.enable_grad():
            point = {n: p.requires_grad_(True) for n, p in params.items()}
            grads = torch.autograd.grad(support(point), list(point.values()))
        params = {n: (p - lr * g).detach() for (n, p), g in zip(point.items(), grads)}
    return params


def evaluate(model, method: Method, sampler: TaskSampler, tasks: int, steps: int, lr: float, device) -> Dict[str, float]:
    """Mean query accuracy after adaptation over `tasks` tasks, with its 95% confidence interval.

    BatchNorm uses batch statistics (Conv4's default), as in meta-training.
    """
    accuracies = []
    for _ in range(tasks):
        x_s, y_s, x_q, y_q = (t.to(device) for t in sampler.sample())
        params = adapt_plain(model, method, x_s, y_s, steps, lr)
        with torch.no_grad():
            logits = functional_call(model, params, (x_q,))
        accuracies.append((logits.argmax(1) == y_q).float().mean().item())
    acc = torch.tensor(accuracies, dtype=torch.float64)
    std = acc.std().item() if tasks > 1 else 0.0
    return {"accuracy": acc.mean().item(), "ci95": 1.96 * std / math.sqrt(tasks), "tasks": tasks}


# --- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (temporary file in the same folder, then rename): a crash never leaves half a file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(state, out)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load_checkpoint(path: Path, config: dict) -> dict:
    """The checkpoint at `path`, after checking it was written with the same model and task settings."""
    if not path.is_file():
        raise SystemExit(f"error: --resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = {k: (state["config"].get(k), config[k]) for k in RESUME_KEYS if state["config"].get(k) != config[k]}
    if changed:
        detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise SystemExit(f"error: --resume: {path} was written with other settings ({detail})")
    return state


# --- the run ------------------------------------------------------------------------------------


def _progress(iterable, enabled: bool, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)


def machine_description(device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(method: Method, args: argparse.Namespace) -> dict:
    """Meta-train (or resume), evaluate on ``--eval-tasks`` meta-test tasks, write the report; return it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(method, args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting (e.g. a test session) as it was


def _run(method: Method, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    device = torch.device(args.device)
    rank, world = bo.distributed.init_from_env(device)  # (0, 1) without torchrun
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    main = rank == 0  # rank 0 alone logs, validates, evaluates and writes files
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["method"] = method.name
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        verbose = main and not args.no_progress
        splits = OmniglotCharacters.load(args.data_root, cache_dir=args.cache_dir, verbose=verbose).splits(seed=0)
    except (FileNotFoundError, OmniglotDataError) as e:
        raise SystemExit(f"error: --data-root: {e}") from None

    torch.manual_seed(args.seed)
    model = Conv4(out_features=args.ways, hidden=args.hidden).to(device)
    names = method.adapted_names(model)
    adapted = [p for n, p in model.named_parameters() if n in names]
    estimator = make_estimator(args)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(adapted, lr=args.inner_lr), steps=args.steps, estimator=estimator)
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    sampler = _sampler(splits["train"], args, args.seed)
    history: dict = {"train": [], "val": []}
    iteration, train_seconds = 0, 0.0

    checkpoint = args.out / CHECKPOINT
    if args.resume:
        state = load_checkpoint(checkpoint, config)
        model.load_state_dict(state["model"])
        meta_opt.load_state_dict(state["meta_opt"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        iteration, history, train_seconds = state["iteration"], state["history"], state["train_seconds"]

    def save():
        save_checkpoint(checkpoint, {
            "model": model.state_dict(), "meta_opt": meta_opt.state_dict(), "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(), "iteration": iteration, "history": history,
            "train_seconds": train_seconds, "config": config,
        })

    def validate():
        # The same validation tasks every time (own generator), so the curve compares like with like.
        result = evaluate(model, method, _sampler(splits["val"], args, args.seed + 1), args.val_tasks,
                          args.eval_steps, args.inner_lr, device)
        history["val"].append({"iteration": iteration, **result})
        return result

    bar = _progress(range(iteration, args.iterations), main and not args.no_progress, initial=iteration,
                    total=args.iterations, desc=f"{method.name} {estimator}" + (f" x{world} ranks" if world > 1 else ""))
    shown = {"val": f'{history["val"][-1]["accuracy"]:.3f}'} if history["val"] else {}
    for iteration in (i + 1 for i in bar):
        tic = time.perf_counter()
        step = meta_step(model, engine, method, meta_opt, sampler.sample_batch(args.meta_batch), device, rank, world,
                         args.task_batched)
        train_seconds += time.perf_counter() - tic
        history["train"].append({"iteration": iteration, **step})
        if main and args.eval_every and iteration % args.eval_every == 0:
            shown["val"] = f'{validate()["accuracy"]:.3f}'
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{step['loss']:.3f}", acc=f"{step['accuracy']:.3f}", **shown)
        if main and (iteration % args.checkpoint_every == 0 or iteration == args.iterations):
            save()
    if not main:  # the other ranks' work ends with training
        return {"rank": rank, "iterations": len(history["train"])}

    test = evaluate(model, method, _sampler(splits["test"], args, args.seed + 2), args.eval_tasks,
                    args.eval_steps, args.inner_lr, device)
    trained = len(history["train"])
    results = {
        "config": config,
        "estimator": repr(estimator),
        "iterations": trained,
        "test": test,
        "hvps_per_task": history["train"][-1]["hvps_per_task"] if trained else 0,
        "rounds_per_task": history["train"][-1]["rounds_per_task"] if trained else 0,
        "train_seconds": train_seconds,
        "seconds_per_iteration": train_seconds / trained if trained else float("nan"),
        "wall_seconds_this_process": time.perf_counter() - start,
        "machine": machine_description(device),
        "world_size": world,
        "history": history,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(history, args.out / "curves.png", f"{method.name.upper()} {estimator}")
    print(f"{method.name.upper()} {estimator}, {args.ways}-way {args.shots}-shot, {trained} iterations: "
          f"test accuracy {100 * test['accuracy']:.2f} +- {100 * test['ci95']:.2f} % over {test['tasks']} tasks "
          f"({train_seconds / max(trained, 1):.2f} s/iteration); results in {args.out}")
    return results


def _sampler(split, args, seed: int) -> TaskSampler:
    return TaskSampler(split, args.ways, args.shots, args.queries, generator=torch.Generator().manual_seed(seed))


def plot_curves(history: dict, path: Path, title: str) -> Optional[Path]:
    """Training loss and accuracy (moving average) with validation accuracy; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no training curves (pip install matplotlib)", file=sys.stderr)
        return None
    train = history["train"]
    its = [r["iteration"] for r in train]
    window = max(1, len(train) // 50)
    def smooth(key):  # moving average over `window` iterations
        values = [r[key] for r in train]
        return [sum(values[max(0, i - window + 1): i + 1]) / min(window, i + 1) for i in range(len(values))]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(its, smooth("loss"))
    ax_loss.set(xlabel="iteration", ylabel="query loss (train)", title=title)
    ax_acc.plot(its, smooth("accuracy"), label="train (query)")
    if history["val"]:
        ax_acc.errorbar([r["iteration"] for r in history["val"]], [r["accuracy"] for r in history["val"]],
                        yerr=[r["ci95"] for r in history["val"]], fmt="o-", label="validation")
    ax_acc.set(xlabel="iteration", ylabel="accuracy", ylim=(0, 1))
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def entry_point(method: Method, description: str, defaults: Optional[dict] = None) -> Callable[..., dict]:
    """A script's ``main(argv=None)``: parse `argv` with the shared CLI (under the script's `defaults`) and :func:`run`."""

    def main(argv: Optional[Sequence[str]] = None) -> dict:
        return run(method, parse_args(build_parser(description, defaults), argv))

    return main
