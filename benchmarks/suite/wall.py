"""The memory wall's arithmetic: peak memory against K fitted per method, extrapolated, and read against budgets.

Pure functions of measured points (dicts with ``method``, ``K``, ``status`` and ``peak_mib``), so that a run's
JSON can be re-read without measuring. A method's peak is fitted as ``a + b * x(K)``, where ``x`` counts the
inner-loop points the method holds at once: ``K`` for every method but the checkpointed one, which stores every
m-th point (m = round(sqrt(K))) and recomputes one segment of m points at a time.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

CHECKPOINTED = "exact-ckpt"
EXACT = "exact"
LARGEST_K_SCANNED = 100_000


def checkpoint_every(k: int) -> int:
    return max(1, round(math.sqrt(k)))


def held_points(method: str, k: int) -> int:
    """Inner-loop points held at once: K, or for the checkpointed method about K/m stored plus a segment of m."""
    if method != CHECKPOINTED:
        return k
    m = checkpoint_every(k)
    return math.ceil(k / m) + (m if m > 1 else 0)


LEVELS = {"binom1": 1, "binom2": 2}  # the binomial methods' L


def measured(points: List[dict], method: str) -> List[dict]:
    """A method's measured points by K; for ``Binomial(L)`` also Exact's at ``K <= L``, where Binomial(L) keeps every
    term and runs Exact's computation (so the default run does not measure it twice)."""
    own = {p["K"]: p for p in points if p["method"] == method and p["status"] == "measured"}
    level = LEVELS.get(method, 0)
    same = {p["K"]: p for p in points if p["method"] == EXACT and p["status"] == "measured" and p["K"] <= level}
    return [both[k] for both in [{**same, **own}] for k in sorted(both)]


def line_fit(xs: List[float], ys: List[float]) -> Optional[Tuple[float, float]]:
    """Least-squares ``(intercept, slope)``; None without two distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def fit(points: List[dict], method: str) -> Optional[dict]:
    """``{"intercept", "slope", "basis"}`` of ``peak = intercept + slope * held_points(K)`` in MiB.

    K = 1 is left out where two larger K were measured. The checkpointed method measured at a single K borrows
    Exact's slope (each held point costs what one of Exact's does) and is anchored at its point; any other method
    needs two K values.
    """
    own = measured(points, method)
    # K = 1 is a special case of the graph-free loop (no interior point; the initial one is a view of the
    # parameters), whose peak can sit below the line of larger K: where two larger K were measured, it is left out.
    beyond_one = [p for p in own if p["K"] > 1]
    used = beyond_one if len({p["K"] for p in beyond_one}) >= 2 else own
    line = line_fit([held_points(method, p["K"]) for p in used], [p["peak_mib"] for p in used])
    if line is not None:
        left_out = " (K=1 left out)" if len(used) < len(own) else ""
        return {"intercept": line[0], "slope": line[1],
                "basis": f"least squares over K={', '.join(str(p['K']) for p in used)}{left_out}"}
    exact = fit(points, EXACT) if method == CHECKPOINTED else None
    if own and exact is not None:
        anchor = own[-1]
        return {"intercept": anchor["peak_mib"] - exact["slope"] * held_points(method, anchor["K"]), "slope": exact["slope"],
                "basis": f"K={anchor['K']} with Exact's growth per held point"}
    return None


def predict(line: dict, method: str, k: int) -> float:
    return line["intercept"] + line["slope"] * held_points(method, k)


def peak_at(points: List[dict], method: str, k: int) -> Tuple[Optional[float], str]:
    """The peak at K: ``(MiB, "measured")``, ``(MiB, "extrapolated")`` from the fit, or ``(None, "unknown")``."""
    for p in measured(points, method):
        if p["K"] == k:
            return p["peak_mib"], "measured"
    line = fit(points, method)
    return (predict(line, method, k), "extrapolated") if line else (None, "unknown")


def guess_next(points: List[dict], method: str, k: int) -> Optional[float]:
    """A point's peak before running it: the fit, or with one measured point the peak scaled by the held points
    (an overestimate wherever part of the peak does not grow with K); None before any point."""
    line = fit(points, method)
    if line is not None:
        return predict(line, method, k)
    own = measured(points, method)
    if not own:
        return None
    last = own[-1]
    return last["peak_mib"] * held_points(method, k) / held_points(method, last["K"])


def largest_k(points: List[dict], method: str, budget_mib: float) -> dict:
    """The largest K whose meta-step fits in ``budget_mib``: ``{"K", "how"}``, ``how`` one of "measured" (K fits and
    K + 1 does not, both measured), "extrapolated" (from the fit), "none" (K = 1 does not fit), "unbounded" (no
    growth with K measured, or none up to ``LARGEST_K_SCANNED``) or "unknown" (no fit)."""
    own = {p["K"]: p["peak_mib"] for p in measured(points, method)}
    over = [k for k, peak in own.items() if peak > budget_mib]
    line = fit(points, method)
    if line is None:
        if over and min(over) - 1 in own:
            return {"K": min(over) - 1, "how": "measured"}
        return {"K": None, "how": "unknown"}
    if line["slope"] <= 0:
        return {"K": None, "how": "unbounded"}
    best = 0
    for k in range(1, LARGEST_K_SCANNED + 1):
        if (min(over) if over else math.inf) <= k:
            break
        if predict(line, method, k) <= budget_mib:
            best = k
        elif method != CHECKPOINTED:  # a line only grows; the checkpointed count wobbles with m
            break
    if best == LARGEST_K_SCANNED:
        return {"K": None, "how": "unbounded"}
    if best == 0:
        return {"K": None, "how": "none"}
    fits, next_over = own.get(best), own.get(best + 1)
    how = "measured" if fits is not None and fits <= budget_mib and next_over is not None and next_over > budget_mib else "extrapolated"
    return {"K": best, "how": how}


def growth(points: List[dict], method: str, parameter_mib: float) -> Optional[dict]:
    """The fitted growth per held inner-loop point, in MiB and in copies of the parameters."""
    line = fit(points, method)
    if line is None:
        return None
    return {"mib_per_step": line["slope"], "copies_per_step": line["slope"] / parameter_mib, "basis": line["basis"]}


def acceptance(points: List[dict], parameter_mib: float) -> Dict[str, dict]:
    """The three targets of the memory wall, each ``{"met", "text"}`` (``met`` None where it cannot be judged)."""
    out = {}
    exact10, how_e = peak_at(points, EXACT, 10)
    higher10, how_h = peak_at(points, "higher", 10)
    if exact10 is None or higher10 is None:
        out["a"] = {"met": None, "text": "Exact and higher at K=10: not enough points to judge"}
    else:
        ratio = exact10 / higher10
        out["a"] = {"met": ratio <= 0.25, "ratio": ratio,
                    "text": f"Exact at K=10 {exact10:,.0f} MiB ({how_e}) = {ratio:.2f}x higher's {higher10:,.0f} MiB ({how_h}); "
                            "target <= 0.25x"}
    g = growth(points, EXACT, parameter_mib)
    out["b"] = ({"met": None, "text": "Exact's growth per step: fewer than two K measured"} if g is None else
                {"met": g["copies_per_step"] <= 1.2, "copies": g["copies_per_step"],
                 "text": f"Exact grows {g['mib_per_step']:.1f} MiB = {g['copies_per_step']:.2f} parameter copies per step "
                         f"({g['basis']}); target <= 1.2"})
    ckpt100, how_c = peak_at(points, CHECKPOINTED, 100)
    higher3, how_3 = peak_at(points, "higher", 3)
    if ckpt100 is None or higher3 is None:
        out["c"] = {"met": None, "text": "checkpointed Exact at K=100 and higher at K=3: not enough points to judge"}
    else:
        out["c"] = {"met": ckpt100 < higher3,
                    "text": f"checkpointed Exact at K=100 {ckpt100:,.0f} MiB ({how_c}: {held_points(CHECKPOINTED, 100)} held "
                            f"points, m={checkpoint_every(100)}) vs higher at K=3 {higher3:,.0f} MiB ({how_3}); target: less"}
    return out
