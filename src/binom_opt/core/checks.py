"""The checks of a meta-gradient, raised after its one host read (module readback), in the order of their causes.

Each check reads the host values a :class:`~binom_opt.core.readback.Readback` brought back and raises an error that
names the problem and the fix: a non-finite inner loop, a closure that is not a pure function (the replay check), an
estimator the recorded loop cannot serve, a non-finite meta-gradient.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from .batching import Tasks, over_tasks
from .calls import calls
from .readback import Readback
from .reductions import INF, nonfinite_groups, norms, not_finite

__all__ = ["check_estimator_fits", "check_inner_loop", "replay", "check_replay", "flags_from_norms", "raise_bad_tasks", "raise_bad_others",
           "naming", "finite_flag", "all_finite", "nan_max"]


def naming(tasks: Tasks, indices: Sequence[int]) -> str:
    """`` for task(s) [...]`` in a meta-batch, nothing for one task."""
    return f" for task(s) {tasks.name(indices)}" if tasks.batched else ""


def check_estimator_fits(estimator, plan, proximal: Optional[float], hyper_inputs: list, meta_inputs: list) -> None:
    """Refuse an estimator this recorded loop cannot serve: another proximal term, or inputs it has no meta-gradient for."""
    wanted = estimator.reg if plan.schedule == "implicit" else None  # pyright: ignore[reportAttributeAccessIssue]  # Implicit's schedule
    if proximal != wanted:
        recorded = "without the proximal term" if proximal is None else f"with Implicit's proximal term (reg={proximal})"
        raise ValueError(
            f"This inner loop was recorded {recorded}, but its meta-gradient was asked of {estimator!r}: Implicit's "
            "inner loop minimises the support loss plus reg/2 ||phi - theta||^2, so it is a different loop. Adapt with the "
            "estimator the meta-gradient uses."
        )
    if plan.schedule in ("implicit", "reptile") and hyper_inputs:
        raise ValueError(
            f"{estimator!r} has no meta-gradient for learned learning rates: at the fixed point Implicit "
            "differentiates they do not matter, and Reptile is not a gradient. Use another estimator, or leave the "
            "learning rates fixed (requires_grad=False)."
        )
    if plan.schedule == "reptile" and meta_inputs:
        raise ValueError(
            "Reptile() gives a direction to the adapted parameters only, but the support loss also uses "
            f"{len(meta_inputs)} other tensor(s) that require grad (the model's parameters that do not adapt, such "
            "as an ANIL body, or features computed outside the closure). Adapt every parameter the support loss uses, "
            "detach the others, or use another estimator."
        )

def check_inner_loop(host: Dict[str, list], tasks: Tasks, names: List[str], trajectory) -> None:
    """Raise for the first inner step whose loss or gradient was not finite.

    The inner loop records no flag per step (host work per step is what small models pay for): each step's loss is
    read back with the checks, and a non-finite gradient makes every later point non-finite (``phi - lr * grad`` and
    the other rules carry a NaN or an infinity on, whatever the rate), so the final point is checked, and only when it
    is not finite are the stored points searched for the step that caused it (an error path: its host reads cost
    nothing in the loop that succeeds).
    """
    losses = host.get("losses", [])
    k_loss = next((k for k, row in enumerate(losses) if not all(map(math.isfinite, row))), None)
    found = _first_bad_gradient(trajectory) if any(host.get("final_bad", [])) else None
    if k_loss is not None and (found is None or k_loss <= found[0]):
        row = losses[k_loss]
        bad = [b for b, value in enumerate(row) if not math.isfinite(value)]
        raise FloatingPointError(
            f"The inner loss is {row[bad[0]]} at inner step {k_loss}{naming(tasks, bad)}: the inner loop diverged or the "
            "support data holds NaN/Inf (or is empty). Lower the inner learning rate or check the support set."
        )
    if found is None:
        return
    k, flags, exact = found
    which = naming(tasks, [b for b in range(tasks.size) if any(f[b] for f in flags)])
    raise FloatingPointError(
        f"The inner gradient of {[n for n, row in zip(names, flags) if any(row)]} is not finite at inner step "
        f"{k}{'' if exact else ' (or an earlier step, whose point was not kept)'}{which} although the loss is finite: an "
        "operation in the support loss has an infinite derivative there (e.g. sqrt or log at 0). Clamp its input away "
        "from the singularity."
    )


def _first_bad_gradient(trajectory) -> Optional[tuple]:
    """``(k, flags [entries][B], exact)``: the step whose gradient first made the next point non-finite, found from the
    kept points (``exact``: the point before it was kept and finite, so it is that step and no earlier one)."""
    points = [(k, trajectory.stored[k].phi) for k in range(1, trajectory.steps)
              if trajectory.stored[k] is not None and trajectory.available(k)]
    previous_kept = 0  # the initial point is finite (the meta-parameters)
    for k, point in [*points, (trajectory.steps, trajectory.final)]:
        flags = not_finite(norms(point.values(), INF)).tolist()
        if any(map(any, flags)):
            return k - 1, flags, previous_kept == k - 1
        previous_kept = k
    return None


def replay(trajectory, tasks: Tasks, options, read: Readback) -> List[int]:
    """Replay each distinct support loss at its first kept point, for :func:`check_replay`.

    The estimators replay the support loss at recorded points; a closure that reads a variable that has
    changed since (a loop variable captured by a lambda, a later batch) would silently differentiate
    another loss. One forward per distinct support loss catches that. Steps whose kept graphs serve the
    meta-gradient replay nothing (``Trajectory.replays``): it differentiates the loop as it ran, and needs no check.
    """
    firsts: Dict[int, int] = {}  # the first step of each support loss whose point is kept
    for k, fn in enumerate(trajectory.loss_fns):
        if trajectory.replays(k):
            firsts.setdefault(id(fn), k)
    if not firsts:
        return []
    replayed = []
    for k in firsts.values():
        with torch.no_grad(), calls(options, trajectory.context(k), f"the replay check at step {k}"):
            replayed.append(over_tasks(trajectory.loss_fns[k], tasks, options.randomness)(trajectory.point(k)))
    now, then = torch.stack(replayed), trajectory.losses[list(firsts.values())]
    tolerance = 1e-9 if then.dtype == torch.float64 else 1e-5
    read.add("replay_now", now)
    read.add("replay_then", then)
    read.add("replay_close", torch.isclose(now, then, rtol=tolerance, atol=tolerance))
    return list(firsts.values())

def check_replay(host: Dict[str, list], steps: List[int], tasks: Tasks) -> None:
    """Raise if a support loss replayed by :func:`replay` differs from its value in the inner loop."""
    close = host.get("replay_close", [])
    row = next((r for r, flags in enumerate(close) if not all(flags)), None)
    if row is None:
        return
    pure = "(learner, task)" if tasks.batched else "the learner"
    raise RuntimeError(
        f"The support loss replayed for the meta-gradient is {host['replay_now'][row]}, but it was "
        f"{host['replay_then'][row]} at inner step {steps[row]}: the closure is not a pure "
        f"function of {pure}. Either it reads a "
        "variable that changed after the inner loop, such as a loop variable captured by a lambda (bind the data "
        "when you build it, e.g. lambda m, x=x_s, y=y_s: F.cross_entropy(m(x), y)) or a cache one call fills and the "
        "next reads (a key/value cache, past_key_values, made outside the closure: build it inside the closure), or it "
        "draws random numbers, "
        "e.g. dropout, which randomness='error' does not replay (leave the default randomness='replay', or pass "
        "'same' or 'different'; see binom_opt.Options)."
    )

def flags_from_norms(host: Dict[str, list], final: List[torch.Tensor], vectors: List[torch.Tensor]) -> None:
    """One task's ``"final_bad"`` and ``"bad"`` flags in ``host`` from the norms of its final point and of its
    meta-gradient vectors (``"group_norms"``, :func:`~binom_opt.core.reductions.group_norms`; and the adjoints' own
    flags, ``"bad_adjoints"``), as the device flags would give them. A NaN norm holds a NaN; an infinite one an infinity,
    or finite values whose squares overflowed: that group is checked exactly (a second host read, on that path only)."""
    flags = []
    for norm, tensors in zip(host.pop("group_norms"), (final, vectors)):
        bad = not math.isfinite(norm)
        if bad and not math.isnan(norm):
            bad = bool(nonfinite_groups([tensors], 1)[0, 0])
        flags.append([float(bad)])
    host["final_bad"] = flags[0]
    host["bad"] = [float(flags[1][0] or any(host.pop("bad_adjoints", [])))]


def raise_bad_tasks(host: Dict[str, list], tasks: Tasks, nan_policy: str) -> None:
    """Under ``nan_policy="raise"``, raise for the tasks whose meta-gradient is not finite."""
    flags = host["bad"]
    if nan_policy != "raise" or not any(flags):
        return
    rounds = [r + 1 for r, norms in enumerate(host.get("contributions", [])) if not all(map(math.isfinite, norms))]
    where = f"in HVP round {rounds[0]}" if rounds else "in the outer-loss gradient"
    raise FloatingPointError(
        f"The meta-gradient is not finite{naming(tasks, [b for b, f in enumerate(flags) if f])} (first seen {where}): "
        "the Hessian-vector products overflowed or the query loss is NaN/Inf. Lower the inner learning rate, use a "
        "smaller L, or check the data (nan_policy='skip_task' drops such tasks)."
    )

def raise_bad_others(host: Dict[str, list]) -> None:
    """Raise if the meta-gradient of a meta-parameter other than the initialisation is not finite."""
    if host.get("implicit_others_bad", 0.0):
        raise FloatingPointError(
            "The implicit meta-gradient of a meta-parameter other than the initialisation is not finite: raise reg "
            "or check the data."
        )
    if host.get("others_bad", 0.0):
        raise FloatingPointError(
            "The meta-gradient of a meta-parameter other than the initialisation (a tensor the support loss uses, "
            "or a learned learning rate) is not finite: lower the inner learning rate or check the data."
        )


def finite_flag(tensors) -> Optional[torch.Tensor]:
    """Whether every tensor (``None`` for an unreached input) holds only finite values, as a device bool
    (``None`` when there is no tensor)."""
    present = [t for t in tensors if t is not None]
    return nonfinite_groups([present], 1)[0, 0].logical_not() if present else None  # one flat concatenation


def all_finite(tensors) -> bool:
    """:func:`finite_flag` read back (one host sync)."""
    flag = finite_flag(tensors)
    return flag is None or bool(flag)


def nan_max(values: Sequence[float]) -> float:
    """``max`` as ``torch.max`` takes it: NaN when any value is NaN."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)
