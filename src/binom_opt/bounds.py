"""The paper's error bounds (BinomGBML, section 3.2 and appendix B) as code.

Each theorem bounds ``||exact - estimate||`` for FirstOrder, Truncated(L) and Binomial(L), where
the exact meta-gradient is ``P g`` with ``P = (I - a H_0) ... (I - a H_{K-1})`` (docs/design.md).
The bounds are plain float functions of ``K, L, alpha, H`` (and ``h, M``), scaled by ``||g||``:

* :func:`theorem_3_6`: ``||H_k|| <= H``, any sign (Assumption 3.5, Lipschitz gradient).
* :func:`theorem_3_8`: ``0 <= H_k <= H`` (Assumption 3.7, convexity) and ``a < 1/H``.
* :func:`theorem_3_10`: Assumption 3.5 and ``h <= H_k <= H`` for the last ``M`` steps
  (Assumption 3.9, local strong convexity), ``M <= min(L, K - L)`` and ``a < 1/H``.

Caveat found by the property tests: the first-order and truncated bounds of Theorems 3.8 and
3.10, (12a), (12b) and (13a), are proved from the eigenvalues of ``P`` as if ``P`` were
symmetric, which holds only when the ``H_k`` commute (share eigenvectors; always for ``d = 1``).
For non-commuting convex Hessians they can fail, e.g. ``a H_0 = 0.9 e1 e1^T`` and
``a H_1 = 0.9 v v^T`` with ``v = (1, 1)/sqrt(2)`` give ``||P - I|| = 1.076 > 1 - 0.1^2``.
The other bounds only multiply operator norms and hold for any symmetric ``H_k``.

:func:`matrix_hvp_oracle`, :func:`sample_hessians` and :func:`measured_errors` evaluate the
library's estimators on explicit matrices, for the property tests and ``examples/error_bounds.py``.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Literal, Mapping, NamedTuple, Optional, Sequence

import torch

from .core.batching import Tasks, map_points
from .core.estimators import Binomial, Exact, FirstOrder, Truncated
from .core.expansion import HVPOracle, expand
from .core.oracle import hvp_function
from .core.update_rules import SGDRule, StepTranspose

__all__ = ["Bounds", "theorem_3_6", "theorem_3_8", "theorem_3_10", "decay_constant_3_8", "decay_constant_3_10", "matrix_hvp_oracle",
           "sample_hessians", "measured_errors", "hessian_norms"]

Assumption = Literal["3.6", "3.8", "3.10"]


class Bounds(NamedTuple):
    """One value per estimator: FirstOrder, Truncated(L), Binomial(L)."""

    fo: float
    truncated: float
    binomial: float


def theorem_3_6(K: int, L: int, alpha: float, H: float, *, g_norm: float = 1.0) -> Bounds:
    """Theorem 3.6 (eq. 11): error bounds when ``||H_k|| <= H`` for all ``k`` (any sign).

    * ``e_FO = [(1 + aH)^K - 1] ||g||``  (11a)
    * ``e_Tr = [(1 + aH)^K - (1 + aH)^L] ||g||``  (11b)
    * ``e_Bi = sum_{l=L+1}^{K} C(K, l) (aH)^l ||g||``  (11c)

    All three are attained by ``H_k = -H I``, and ``e_Bi <= e_Tr <= e_FO``.

    >>> theorem_3_6(K=2, L=1, alpha=0.5, H=1.0)
    Bounds(fo=1.25, truncated=0.75, binomial=0.25)
    """
    _check_common("Theorem 3.6", K, L, alpha, H, g_norm)
    x = alpha * H
    return Bounds(
        fo=((1 + x) ** K - 1) * g_norm,
        truncated=((1 + x) ** K - (1 + x) ** L) * g_norm,
        binomial=sum(math.comb(K, level) * x**level for level in range(L + 1, K + 1)) * g_norm,
    )


def theorem_3_8(K: int, L: int, alpha: float, H: float, *, g_norm: float = 1.0) -> Bounds:
    """Theorem 3.8 (eq. 12): error bounds when ``0 <= H_k <= H`` (convex) and ``0 < a < 1/H``.

    * ``e_FO = [1 - (1 - aH)^K] ||g||``  (12a; attained by ``H_k = H I``)
    * ``e_Tr = [1 - (1 - aH)^(K-L)] ||g||``  (12b)
    * ``e_Bi = C(K, L+1) (aH)^(L+1) ||g||``  (12c)

    (12a) and (12b) need commuting ``H_k`` (see the module docstring). For the decay in ``L``
    see :func:`decay_constant_3_8`.

    >>> theorem_3_8(K=2, L=1, alpha=0.5, H=1.0)
    Bounds(fo=0.75, truncated=0.5, binomial=0.25)
    """
    _check_common("Theorem 3.8", K, L, alpha, H, g_norm)
    _check_step_below_one_over_H("Theorem 3.8", alpha, H)
    x = alpha * H
    return Bounds(
        fo=(1 - (1 - x) ** K) * g_norm,
        truncated=(1 - (1 - x) ** (K - L)) * g_norm,
        binomial=math.comb(K, L + 1) * x ** (L + 1) * g_norm,
    )


def theorem_3_10(K: int, L: int, alpha: float, H: float, h: float, M: int, *, g_norm: float = 1.0) -> Bounds:
    """Theorem 3.10 (eq. 13, restated as 34 in appendix B): ``||H_k|| <= H`` for all ``k`` and
    ``h I <= H_k <= H I`` for the last ``M`` steps ``k >= K - M``, with ``1 <= M <= min(L, K - L)``
    and ``0 < a < 1/H``. With ``x = aH`` and ``s = 1 - ah``:

    * ``e_FO = max{(1 + x)^(K-M) s^M - 1, 1 - (1 - x)^K} ||g||``  (13a; commuting ``H_k``)
    * ``e_Tr = [(1 + x)^(K-M) - (1 + x)^(L-M)] s^M ||g||``  (13b)
    * ``e_Bi = [x^(L+1) sum_{l=1}^{M} C(K-l, L) s^(l-1)
      + s^M sum_{l=L+1}^{K-M} C(K-M, l) x^l] ||g||``  (13c)

    (13c) follows the proof, eq. (36)-(37): the error splits into the terms whose last Hessian
    sits at step ``K - l`` for ``l = 1..M`` (``L`` more Hessians below it, then ``l - 1``
    strongly convex factors of norm ``<= s``), plus the binomial remainder of the first
    ``K - M`` factors followed by the last ``M`` factors (norm ``<= s^M``).

    >>> theorem_3_10(K=2, L=1, alpha=0.5, H=1.0, h=0.5, M=1)
    Bounds(fo=0.75, truncated=0.375, binomial=0.25)
    """
    _check_common("Theorem 3.10", K, L, alpha, H, g_norm)
    _check_step_below_one_over_H("Theorem 3.10", alpha, H)
    if not 0 < h <= H:
        raise ValueError(f"Theorem 3.10 needs 0 < h <= H (strong convexity), got h={h!r}, H={H!r}.")
    _check_int("Theorem 3.10", "M", M)
    if not 1 <= M <= min(L, K - L):
        raise ValueError(f"Theorem 3.10 needs 1 <= M <= min(L, K - L) (Assumption 3.9), got M={M} with K={K}, L={L}.")
    x, s = alpha * H, 1 - alpha * h
    last_hessians = x ** (L + 1) * sum(math.comb(K - i, L) * s ** (i - 1) for i in range(1, M + 1))
    remainder = s**M * sum(math.comb(K - M, i) * x**i for i in range(L + 1, K - M + 1))
    return Bounds(
        fo=max((1 + x) ** (K - M) * s**M - 1, 1 - (1 - x) ** K) * g_norm,
        truncated=((1 + x) ** (K - M) - (1 + x) ** (L - M)) * s**M * g_norm,
        binomial=(last_hessians + remainder) * g_norm,
    )


def decay_constant_3_8(K: int, L: int) -> float:
    """``C_a = e K / (L + 1)`` of Theorem 3.8 (the paper only states ``C_a = O(K / (L + 1))``).

    From Lemma B.5, ``C(K, L+1) <= (e K / (L+1))^(L+1)``, so (12c) is at most
    ``(C_a a H)^(L+1)``: if ``a < 1 / (C_a H)`` the base is below 1 and shrinks as ``L`` grows,
    a super-exponential decay. ``C_a`` falls with ``L``, so ``a < 1 / (e K H)`` (``L = 0``)
    makes it hold for every ``L``.

    >>> round(decay_constant_3_8(K=5, L=1), 4)
    6.7957
    """
    _check_common("decay_constant_3_8", K, L, 1.0, 0.0, 1.0)
    return math.e * K / (L + 1)


def decay_constant_3_10(K: int, L: int) -> float:
    """``C'_a = e (K - 1) / L`` of Theorem 3.10 (the paper states ``C'_a = O((K - 1) / L)``).

    The proof after (37) bounds both parts of (13c) with Lemmas B.5 and B.7, giving

        e_Bi <= [M aH + (1 + aH)^(K-L-M) - 1] (C'_a a H)^L ||g||,

    so ``a < 1 / (C'_a H)`` makes the bound decay super-exponentially in ``L`` (``L >= 1``).

    >>> round(decay_constant_3_10(K=5, L=2), 4)
    5.4366
    """
    _check_common("decay_constant_3_10", K, L, 1.0, 0.0, 1.0)
    if L < 1:
        raise ValueError(f"decay_constant_3_10 needs L >= 1 (M >= 1 and M <= L), got L={L}.")
    return math.e * (K - 1) / L


def _check_int(theorem: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{theorem}: {name} must be an integer, got {value!r}.")


def _check_common(theorem: str, K: int, L: int, alpha: float, H: float, g_norm: float) -> None:
    _check_int(theorem, "K", K)
    _check_int(theorem, "L", L)
    if K < 1:
        raise ValueError(f"{theorem}: K (inner steps) must be >= 1, got K={K}.")
    if not 0 <= L <= K:
        raise ValueError(f"{theorem}: L must satisfy 0 <= L <= K, got L={L}, K={K}.")
    if not alpha > 0:
        raise ValueError(f"{theorem}: alpha (step size) must be > 0, got alpha={alpha!r}.")
    if not H >= 0:
        raise ValueError(f"{theorem}: H (Hessian norm bound) must be >= 0, got H={H!r}.")
    if not g_norm >= 0:
        raise ValueError(f"{theorem}: g_norm must be >= 0, got g_norm={g_norm!r}.")


def _check_step_below_one_over_H(theorem: str, alpha: float, H: float) -> None:
    if not alpha * H < 1:
        raise ValueError(f"{theorem} needs alpha < 1/H, got alpha={alpha!r}, H={H!r} (alpha*H={alpha * H!r}).")


def matrix_hvp_oracle(hessians: Sequence[torch.Tensor]) -> HVPOracle:
    """An HVP oracle for :func:`binom_opt.core.expansion.expand` over explicit ``d x d`` matrices.

    The single parameter is named ``"w"``; ``hessians[k]`` is ``H_k`` (the same for every task).
    Vectors are ``[steps, tasks, d]``.

    >>> oracle = matrix_hvp_oracle([torch.eye(2), 2 * torch.eye(2)])
    >>> oracle(range(0, 2), {"w": torch.ones(2, 1, 2)})["w"]
    tensor([[[1., 1.]],
    <BLANKLINE>
            [[2., 2.]]])
    """
    stacked = torch.stack(list(hessians))

    def oracle(steps: range, vectors):
        return {"w": torch.einsum("kij,kbj->kbi", stacked[steps.start : steps.stop], vectors["w"])}

    return oracle


def sample_hessians(assumption: Assumption, K: int, d: int, H: float, *, h: float = 0.0, M: int = 0, shared_basis: bool = True,
                    generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64) -> List[torch.Tensor]:
    """Random symmetric ``H_0 .. H_{K-1}`` satisfying the assumptions of a theorem.

    Eigenvalues lie in ``[-H, H]`` ("3.6"), ``[0, H]`` ("3.8"), or ``[-H, H]`` before step
    ``K - M`` and ``[h, H]`` from it ("3.10"); a third of them sit on an end of their interval,
    where the bounds are tight. ``shared_basis`` gives all ``H_k`` the same eigenvectors (they
    commute), which (12a), (12b) and (13a) need.

    >>> [float(m) for m in sample_hessians("3.10", K=3, d=1, H=1.0, h=1.0, M=1)][-1]
    1.0
    """
    if assumption not in ("3.6", "3.8", "3.10"):
        raise ValueError(f"assumption must be '3.6', '3.8' or '3.10', got {assumption!r}.")

    def basis() -> torch.Tensor:
        return torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=dtype))[0]

    shared = basis()
    hessians = []
    for k in range(K):
        low = h if assumption == "3.10" and k >= K - M else (0.0 if assumption == "3.8" else -H)
        u = torch.rand(d, generator=generator, dtype=dtype)
        on_end = torch.rand(d, generator=generator, dtype=dtype) < 1 / 3
        u = torch.where(on_end, (u > 0.5).to(dtype), u)
        q = shared if shared_basis else basis()
        hessians.append(q @ torch.diag(low + (H - low) * u) @ q.T)
    return hessians


def measured_errors(hessians: Sequence[torch.Tensor], g: torch.Tensor, alpha: float, L: int) -> Bounds:
    """Actual errors ``||estimate - exact||`` of FirstOrder, Truncated(L), Binomial(L).

    Computed with the library's :func:`~binom_opt.core.expansion.expand` on explicit matrices.

    >>> H = [torch.eye(1, dtype=torch.float64)] * 2
    >>> measured_errors(H, torch.ones(1, dtype=torch.float64), alpha=0.5, L=1)
    Bounds(fo=0.75, truncated=0.25, binomial=0.25)
    """
    K, oracle, grads = len(hessians), matrix_hvp_oracle(hessians), {"w": g.unsqueeze(0)}
    sgd = StepTranspose({"w": SGDRule()}, {"w": {"lr": alpha}})

    def estimate(estimator) -> torch.Tensor:
        return expand(estimator.plan(K), grads, sgd, oracle, steps=K).meta_grad["w"][0]

    exact = estimate(Exact())
    return Bounds(*(float((estimate(e) - exact).norm()) for e in (FirstOrder(), Truncated(L), Binomial(L))))


def hessian_norms(loss_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor], points: Mapping[str, torch.Tensor], *, iters: int = 100,
                  generator: Optional[torch.Generator] = None) -> List[float]:
    """Spectral norms ``||H_k||`` of ``loss_fn``'s Hessian at each stacked point, by power iteration.

    All points iterate together: one batched HVP call per iteration (the same oracle the
    estimators use). Power iteration approaches each norm from below; ``iters`` bounds the work.
    Use it to put a network's trajectory into the theorems, e.g.
    ``theorem_3_6(K, L, lr, max(hessian_norms(...)), g_norm=...)``.

    Args:
        loss_fn: a scalar function of a dict of tensors (e.g. the support loss).
        points: dict of tensors stacked along a leading step dimension (``Trajectory.points``).

    >>> f = lambda p: (torch.tensor([3.0, -5.0]) * p["w"] ** 2).sum() / 2      # H = diag(3, -5)
    >>> [round(n, 6) for n in hessian_norms(f, {"w": torch.zeros(2, 2)})]
    [5.0, 5.0]
    """
    hvp = hvp_function(lambda p, task: loss_fn(p), "rev")
    at = {n: t.unsqueeze(1) for n, t in points.items()}  # one task
    v = {n: torch.randn(t.shape, generator=generator, dtype=t.dtype) for n, t in at.items()}

    def per_point_norm(vectors):
        return torch.sqrt(sum(t.reshape(t.shape[0], -1).pow(2).sum(1) for t in vectors.values()))  # pyright: ignore[reportArgumentType]  # a sum of tensors

    norms = per_point_norm(v)
    for _ in range(iters):
        scale = norms.clamp_min(torch.finfo(norms.dtype).tiny)
        v = {n: t / scale.view(-1, *[1] * (t.dim() - 1)) for n, t in v.items()}
        with torch.no_grad():
            v = map_points(hvp, (at, v), Tasks(), "error")
        norms = per_point_norm(v)
    return [float(n) for n in norms]
