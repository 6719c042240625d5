"""The drop-in at the cost of the loop it replaces: small adapted parts, where host work per call shows.

Three settings, each with its hand-written twin, higher and binom_opt's entry points, side by side in one run:

- ``sine``: the MAML paper's sine regression, an MLP 1-40-40-1, 10 support and 10 query points, K = 5 SGD steps at
  lr 0.01, a meta-batch of 25 tasks adapted one after another (per task), and ``engine.adapt_batch`` (default
  options, and ``memory_budget=None``: the tasks vmapped);
- ``anil``: the main job's meta-step, a Conv4-64 body meta-learned and its linear head adapted (K = 5 at lr 0.1),
  5-way 1-shot with 5 queries per class on random 28x28 images, a meta-batch of 4, the body once per task.
- ``conv4``: ``run.py --config omniglot --quick``'s per-task meta-step, the whole Conv4-32 adapted (K = 5 at lr 0.4),
  5-way 1-shot with 15 queries per class on random 28x28 images, a meta-batch of 4: where compute dominates. ``run.py``
  runs each method in a process of its own, one after the other; here the peers share the rounds.

Times are the process's CPU time per meta-step (1 thread by default, so it is also its wall time on an idle
machine), the median of ``--repeats`` after two warm-ups, the methods interleaved so that a change in a shared
machine's load falls on all of them; ratios against higher and the hand-written exact loop. One command::

    python benchmarks/overhead.py      # writes benchmarks/results/overhead_cpu.{json,md}

``--sweep 1 5 10`` times the sine MLP's per-task methods at several numbers of inner steps instead and splits each
method's time into what it pays once per task and what it pays per inner step (``overhead_cpu_steps.{json,md}``).
``--phases`` splits each of them by phase of a task instead: its start (a clone, or higher's context), its inner steps,
the query's forward and its backward (``overhead_cpu_phases.{json,md}``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import higher
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import binom_opt as bo

from fewshot.models import Conv4
from suite.configs import CONFIGS, QUICK, build_batch, build_model
from suite.report import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
Steps = Dict[str, Callable[[], None]]


def check_peers_unhooked(after: str) -> None:
    """Raise if a global module hook is in place between meta-steps: the peers measured in this process would then run
    torch's slower path for modules with hooks, and every ratio against them would flatter binom_opt."""
    from torch.nn.modules import module as modules

    if modules._global_forward_pre_hooks or modules._global_forward_hooks:
        raise RuntimeError(f"A global module hook is still in place after {after!r}: binom_opt's hooks must be in place "
                           "only inside its own calls, or the peers measured beside it run slower than they do alone.")


def median_ms(steps: Steps, model: nn.Module, repeats: int) -> Dict[str, float]:
    """The median CPU time of each meta-step over ``repeats``, after two warm-ups, the methods interleaved (CPU time:
    what the process itself spent, on a shared machine); ``model``'s gradients are cleared and the seed reset first."""
    return {name: statistics.median(t) for name, t in times_ms(steps, model, repeats).items()}


class Ratio(NamedTuple):
    """A method's time over its peer's, round by round: the median of the rounds' ratios, their quartiles (the
    machine's spread from round to round) and a 95 % interval for the median itself (:func:`median_interval`)."""

    median: float
    q1: float
    q3: float
    low: float
    high: float


def paired_ratio(times: Dict[str, List[float]], name: str, peer: str) -> Ratio:
    """``name``'s time over ``peer``'s, repeat by repeat (the two ran in the same round of the interleaved loop, so a
    change in a shared machine's load falls on both)."""
    ratios = [a / b for a, b in zip(times[name], times[peer])]
    if len(ratios) < 2:  # one round: no spread
        return Ratio(*ratios * 5)
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return Ratio(median, q1, q3, *median_interval(ratios))


def median_interval(values: List[float], confidence: float = 0.95) -> Tuple[float, float]:
    """A distribution-free interval for the median of what ``values`` sample (the sign test's): the order statistics
    ``x_(k)`` and ``x_(n-k+1)`` with the largest ``k`` for which the median lies between them with probability at least
    ``confidence``, whatever the distribution; the whole range where no ``k`` reaches it (under six values at 95 %).
    Unlike the quartiles it narrows as rounds are added: it says how well the median is known.

    >>> median_interval([float(x) for x in range(1, 42)])  # 41 rounds: the 14th and 28th
    (14.0, 28.0)
    """
    ordered, n = sorted(values), len(values)
    k, tail = 0, 0.0
    while k < n // 2 and tail + math.comb(n, k) / 2 ** n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2 ** n
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def times_ms(steps: Steps, model: nn.Module, repeats: int) -> Dict[str, List[float]]:
    """The CPU time of each meta-step in each of ``repeats`` rounds (:func:`median_ms`), in ms."""
    times: Dict[str, list] = {name: [] for name in steps}
    for i in range(repeats + 2):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            start = time.process_time()
            step()
            if i >= 2:
                times[name].append(1e3 * (time.process_time() - start))
            check_peers_unhooked(name)
    return times


PHASES = ("start", "inner steps", "query forward", "backward")


def _unmarked(phase: Optional[str]) -> None:
    pass


class PhaseClock:
    """Wall time per phase of a per-task loop: ``mark(phase)`` gives ``phase`` the time since the last mark (``None``
    starts the clock). The loop's own time between tasks, and a task's teardown, fall in the next task's start."""

    def __init__(self) -> None:
        self.totals: Dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.last = 0.0

    def __call__(self, phase: Optional[str]) -> None:
        now = time.perf_counter()
        if phase is not None:
            self.totals[phase] += now - self.last
        self.last = now


def per_task(model: nn.Module, batch, loss: Callable, steps: int, lr: float, mark: Callable[[Optional[str]], None] = _unmarked) -> Steps:
    """The per-task meta-step of each peer on ``batch`` (``(x_s, y_s, x_q, y_q)`` per task), ``loss(outputs, targets)``:
    the hand-written loop (``create_graph`` autograd, learn2learn's idiom, and its first-order twin), higher, and
    ``bo.MAML`` with ``Exact``, ``Binomial(1)`` and ``FirstOrder``. ``mark`` is told where each phase of a task ends
    (:data:`PHASES`; a :class:`PhaseClock`)."""

    def hand(create_graph):
        def run():
            mark(None)
            for xs, ys, xq, yq in batch:
                phi = dict(model.named_parameters())
                mark("start")
                for _ in range(steps):
                    grads = torch.autograd.grad(loss(torch.func.functional_call(model, phi, (xs,)), ys), list(phi.values()),
                                                create_graph=create_graph)
                    phi = {n: p - lr * (g if create_graph else g.detach()) for (n, p), g in zip(phi.items(), grads)}
                mark("inner steps")
                query = loss(torch.func.functional_call(model, phi, (xq,)), yq)
                mark("query forward")
                query.backward()
                mark("backward")
        return run

    def with_higher():
        mark(None)
        for xs, ys, xq, yq in batch:
            with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=lr), copy_initial_weights=False) as (f, d):
                mark("start")
                for _ in range(steps):
                    d.step(loss(f(xs), ys))
                mark("inner steps")
                query = loss(f(xq), yq)
                mark("query forward")
                query.backward()
                mark("backward")

    def maml(estimator):
        wrapper = bo.MAML(model, lr=lr, estimator=estimator)

        def run():
            mark(None)
            for xs, ys, xq, yq in batch:
                learner = wrapper.clone()
                mark("start")
                for _ in range(steps):
                    learner.adapt(lambda m, xs=xs, ys=ys: loss(m(xs), ys))
                mark("inner steps")
                query = loss(learner(xq), yq)
                mark("query forward")
                query.backward()
                mark("backward")
        return run

    return {"hand-written exact": hand(True), "hand-written first-order": hand(False), "higher": with_higher,
            "bo.MAML Exact": maml(bo.Exact()), "bo.MAML Binomial(1)": maml(bo.Binomial(1)), "bo.MAML FirstOrder": maml(bo.FirstOrder())}


def sine_tasks(tasks: int):
    """The sine MLP and ``tasks`` tasks of 10 support and 10 query points, ``(x_s, y_s, x_q, y_q)`` each."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    gen = torch.Generator().manual_seed(0)
    return model, [tuple(torch.randn(10, 1, generator=gen) for _ in range(4)) for _ in range(tasks)]


def sine(tasks: int = 25, steps: int = 5, lr: float = 0.01):
    model, batch = sine_tasks(tasks)
    stacked = [torch.stack(t) for t in zip(*batch)]

    def adapt_batch(estimator, **options):
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=lr), steps, estimator, **options)

        def run():
            learners = engine.adapt_batch(lambda m, t: F.mse_loss(m(t[0]), t[1]), stacked[:2])
            engine.meta_backward(F.mse_loss(learners(stacked[2]), stacked[3], reduction="sum") / 10)  # the sum of task means
        return run

    return model, {**per_task(model, batch, F.mse_loss, steps, lr), "adapt_batch Exact": adapt_batch(bo.Exact()),
                   "adapt_batch Exact, memory_budget=None": adapt_batch(bo.Exact(), memory_budget=None),
                   "adapt_batch Binomial(1), memory_budget=None": adapt_batch(bo.Binomial(1), memory_budget=None)}


def anil(tasks: int = 4, steps: int = 5, lr: float = 0.1, ways: int = 5, queries: int = 5):
    torch.manual_seed(0)
    model = Conv4(out_features=ways, hidden=64)
    gen = torch.Generator().manual_seed(0)
    xs, xq = torch.rand(tasks, ways, 1, 28, 28, generator=gen), torch.rand(tasks, ways * queries, 1, 28, 28, generator=gen)
    ys, yq = torch.arange(ways), torch.arange(ways * queries) % ways
    linear = lambda p, f: F.linear(f, p["head.weight"], p["head.bias"])

    def hand(create_graph):
        def run():
            head = {n: p for n, p in model.named_parameters() if n.startswith("head.")}
            for t in range(tasks):
                features = model.features(xs[t])
                phi = head
                for _ in range(steps):
                    grads = torch.autograd.grad(F.cross_entropy(linear(phi, features), ys), list(phi.values()), create_graph=create_graph)
                    phi = {n: p - lr * (g if create_graph else g.detach()) for (n, p), g in zip(phi.items(), grads)}
                (F.cross_entropy(linear(phi, model.features(xq[t])), yq) / tasks).backward()
        return run

    def engine_step(estimator):
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=lr), steps, estimator)

        def run():
            for t in range(tasks):
                features = model.features(xs[t])
                learner = engine.adapt(lambda m, f=features: F.cross_entropy(linear(m.params, f), ys))
                (F.cross_entropy(linear(learner.params, model.features(xq[t])), yq) / tasks).backward()
        return run

    return model, {"hand-written exact": hand(True), "hand-written first-order": hand(False),
                   "engine.adapt Exact": engine_step(bo.Exact()), "engine.adapt Binomial(1)": engine_step(bo.Binomial(1)),
                   "engine.adapt FirstOrder": engine_step(bo.FirstOrder())}


def conv4(tasks: int = 4, steps: int = 5):
    """``run.py --config omniglot --quick``'s per-task meta-step, its model and its meta-batch of random images (Conv4-32,
    5-way 1-shot, 15 queries per class, K = 5 at lr 0.4, a meta-batch of 4), here with the peers interleaved and the
    ratios taken round by round: where compute dominates, what is left of the host work."""
    cfg = replace(CONFIGS["omniglot"], **QUICK["omniglot"])
    cfg = replace(cfg, meta_batch=tasks, steps=steps)
    model = build_model(cfg, torch.device("cpu"))
    (xs, ys), (xq, yq) = build_batch(cfg, torch.device("cpu"))
    return model, per_task(model, list(zip(xs, ys, xq, yq)), F.cross_entropy, cfg.steps, cfg.lr)


SETTINGS = {"sine": sine, "anil": anil, "conv4": conv4}


def sweep(ks: List[int], repeats: int, tasks: int = 25, lr: float = 0.01) -> List[dict]:
    """The sine MLP's per-task methods at each number of inner steps ``K`` of ``ks``, in ms per task, and the line
    ``a + b K`` fitted to them by least squares: ``a`` is what a method pays once per task (the clone, the closure's
    first call, the meta-gradient's checks and stats, its one host read), ``b`` what it pays per inner step (the
    step, and its HVP)."""
    model, batch = sine_tasks(tasks)
    steps = {f"{name} @{k}": step for k in ks for name, step in per_task(model, batch, F.mse_loss, k, lr).items()}
    times = median_ms(steps, model, repeats)
    rows = []
    for name in dict.fromkeys(key.split(" @")[0] for key in steps):
        per = [times[f"{name} @{k}"] / tasks for k in ks]
        mean_k, mean_t = statistics.fmean(ks), statistics.fmean(per)
        slope = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, per)) / sum((k - mean_k) ** 2 for k in ks)
        rows.append({"method": name, "ms_per_task": dict(zip(map(str, ks), per)), "per_task": mean_t - slope * mean_k,
                     "per_step": slope})
    return rows


def sweep_table(rows: List[dict], ks: List[int], machine: str, repeats: int) -> List[str]:
    hand = next(r for r in rows if r["method"] == "hand-written exact")
    lines = ["# Host overhead per task and per inner step (sine MLP)", "", f"CPU time per task at K = {', '.join(map(str, ks))} "
             f"inner steps (25 tasks per meta-step, median of {repeats} after 2 warm-ups, interleaved) and the line a + b K "
             f"fitted to it. Machine: {machine}. Command: `python benchmarks/overhead.py --sweep {' '.join(map(str, ks))}`.", "",
             "| method | " + " | ".join(f"K = {k}" for k in ks) + " | per task (a) | per step (b) | a - hand's a | b / hand's b |",
             "|---|" + "---:|" * (len(ks) + 4)]
    lines += [f"| {r['method']} | " + " | ".join(f"{r['ms_per_task'][str(k)]:.3f}" for k in ks) + f" | {r['per_task']:.3f} | "
              f"{r['per_step']:.3f} | {r['per_task'] - hand['per_task']:+.3f} | {r['per_step'] / hand['per_step']:.2f}x |" for r in rows]
    return lines


def phases(repeats: int, tasks: int = 25, steps: int = 5, lr: float = 0.01) -> List[dict]:
    """The sine MLP's per-task methods split by phase of a task (:data:`PHASES`): the wall time of each phase per task in
    microseconds, the median over ``repeats`` meta-steps of ``tasks`` tasks (after two warm-ups, methods interleaved)."""
    model, batch = sine_tasks(tasks)
    clock = PhaseClock()
    runs = per_task(model, batch, F.mse_loss, steps, lr, mark=clock)
    seen: Dict[str, List[Dict[str, float]]] = {name: [] for name in runs}
    for i in range(repeats + 2):
        for name, run in runs.items():
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            clock.totals = dict.fromkeys(PHASES, 0.0)
            run()
            if i >= 2:
                seen[name].append({phase: 1e6 * t / tasks for phase, t in clock.totals.items()})
            check_peers_unhooked(name)
    return [{"method": name, "us_per_task": {phase: statistics.median(r[phase] for r in rows) for phase in PHASES}}
            for name, rows in seen.items()]


def phases_table(rows: List[dict], machine: str, repeats: int, tasks: int, steps: int) -> List[str]:
    hand = next(r for r in rows if r["method"] == "hand-written exact")["us_per_task"]
    lines = ["# Host overhead by phase of a task (sine MLP)", "", "Wall time per task in microseconds, by phase: the "
             f"task's start (the clone, higher's context; the previous task's teardown falls here too), its K = {steps} "
             "inner steps, the query's forward, its backward (the meta-gradient). Median over "
             f"{repeats} meta-steps of {tasks} tasks after 2 warm-ups, methods interleaved; in brackets the difference to the "
             f"hand-written exact loop. Machine: {machine}. Command: `python benchmarks/overhead.py --phases`.", "",
             "| method | " + " | ".join(PHASES) + " | total |", "|---|" + "---:|" * (len(PHASES) + 1)]
    for r in rows:
        us = r["us_per_task"]
        cells = [*(f"{us[p]:.0f} ({us[p] - hand[p]:+.0f})" for p in PHASES),
                 f"{sum(us.values()):.0f} ({sum(us.values()) - sum(hand.values()):+.0f})"]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS), metavar="SETTING")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is measured: 1 keeps it wall time)")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--sweep", type=int, nargs="+", metavar="K",
                        help="instead: the sine MLP's per-task methods at these numbers of inner steps, split into a cost per "
                             "task and one per step (writes overhead_cpu_steps.{json,md})")
    parser.add_argument("--phases", action="store_true",
                        help="instead: the sine MLP's per-task methods split by phase of a task (writes overhead_cpu_phases.{json,md})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = f"{cpu_model()}, {args.threads} thread(s), torch {torch.__version__}"
    if args.sweep and args.phases:
        parser.error("--sweep and --phases are two different runs: give one of them")
    if args.phases:
        sizes = {"tasks": 2, "steps": 2} if args.small else {"tasks": 25, "steps": 5}
        rows = phases(args.repeats, **sizes)
        result = {"machine": machine, "repeats": args.repeats, **sizes, "rows": rows}
        return write(args.out, "overhead_cpu_phases", result, phases_table(rows, machine, args.repeats, **sizes))
    if args.sweep:
        if len(set(args.sweep)) < 2:
            parser.error("--sweep needs at least two different numbers of steps to fit a line")
        rows = sweep(sorted(set(args.sweep)), args.repeats, **({"tasks": 2} if args.small else {}))
        result = {"machine": machine, "repeats": args.repeats, "steps": sorted(set(args.sweep)), "rows": rows}
        return write(args.out, "overhead_cpu_steps", result, sweep_table(rows, result["steps"], machine, args.repeats))
    rows = []
    for setting in args.settings:
        model, steps = SETTINGS[setting](**({"tasks": 2, "steps": 2} if args.small else {}))
        times = times_ms(steps, model, args.repeats)
        for name, t in times.items():
            row = {"setting": setting, "method": name, "ms": statistics.median(t)}
            for key, peer in (("vs_hand_written", "hand-written exact"), ("vs_higher", "higher")):
                ratio = paired_ratio(times, name, peer) if peer in times else None
                row[key], row[f"{key}_quartiles"], row[f"{key}_ci95"] = ((None, None, None) if ratio is None else
                                                                          (ratio.median, [ratio.q1, ratio.q3], [ratio.low, ratio.high]))
            rows.append(row)
    result = {"machine": machine, "repeats": args.repeats, "rows": rows}
    lines = ["# Host overhead on small adapted parts", "", f"CPU time per meta-step, median of {args.repeats} after 2 "
             f"warm-ups, methods interleaved. Ratios are taken round by round (each method against its peer in the same "
             f"round of the interleaved loop, so that a change in the machine's load falls on both): their median, a 95 % "
             f"interval for that median (the sign test's, distribution-free), and their quartiles (the spread from round "
             f"to round). Machine: {machine}. Settings: see `benchmarks/overhead.py`.", "",
             "| setting | method | ms per meta-step | vs hand-written exact | vs higher |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['method']} | {r['ms']:.1f} | {_ratio(r, 'vs_hand_written')} | {_ratio(r, 'vs_higher')} |"
              for r in rows]
    return write(args.out, "overhead_cpu", result, lines)


def _ratio(row: dict, key: str) -> str:
    if row[key] is None:
        return ""
    (q1, q3), (low, high) = row[f"{key}_quartiles"], row[f"{key}_ci95"]
    return f"{row[key]:.2f}x (CI {low:.2f}-{high:.2f}; quartiles {q1:.2f}-{q3:.2f})"


def write(out: Path, stem: str, result: dict, lines: List[str]) -> dict:
    """``result`` as ``out/stem.json`` and the table ``lines`` as ``out/stem.md`` (and printed); returns ``result``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
