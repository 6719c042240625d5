"""The estimators' arithmetic: a pure function of ``g``, the step sizes and an HVP oracle.

Notation (DESIGN.md section 2): ``u_j^(l)`` is the sum of the kept terms with at most ``l``
Hessian factors whose indices are all ``>= j``; ``u_j^(0) = u_K^(l) = g`` and

    u_j^(l) = u_{j+1}^(l) - H_j (a * u_{j+1}^(l-1))            (a: the step size, elementwise)

For ``j >= K - l`` nothing is dropped, so those entries are the exact tail products and are
reused. Round ``l`` therefore needs the HVPs ``H_j (a * u_{j+1}^(l-1))`` only for
``j = L-l .. K-l``: independent products at different points, requested from the oracle in
ONE call, after which ``u_j^(l)`` for those ``j`` is a reverse cumulative sum (the product with
the paper's lower-triangular ones matrix) started from the exact tail. The answer is ``u_f^(L)``
with ``f`` the first step whose Hessian is kept (0 except for Hybrid).

Nothing here knows about models or autograd: an oracle ``hvp(steps, vectors)`` returns
``H_j v_j`` for each ``j`` in the ``range`` ``steps``, with ``vectors`` and the result stacked
along a leading dimension. That is what lets the same code run on a network (batched
``torch.func`` HVPs) and on explicit matrices (the property tests of the error bounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

from .estimators import ExpansionPlan

Tensors = Dict[str, torch.Tensor]
StepSize = Mapping[str, Union[float, torch.Tensor]]
HVPOracle = Callable[[range, Tensors], Tensors]

__all__ = ["ExpansionResult", "expand"]


@dataclass
class ExpansionResult:
    """What :func:`expand` returns.

    Attributes:
        meta_grad: the estimate of the meta-gradient with respect to the initial point.
        adjoints: ``{k: lambda_{k+1}}`` for each step ``k`` whose second-order terms are kept,
            the (approximate) gradient of the outer loss with respect to ``phi_{k+1}`` at the
            same expansion order minus one; filled only when asked for. Meta-parameters other
            than the initial point need them.
        full_adjoints: ``{k: lambda_{k+1}}`` for every step at the full order ``L`` (for
            hyperparameters such as learned learning rates, whose terms have no Hessian
            factor); filled only when asked for.
        contributions: one norm per round. For the batched binomial schedule, round ``l``'s
            entry is the norm of the sum of the terms with exactly ``l`` Hessian factors, all
            at steps ``>= max(L - l + 1, K - C)`` (the widest window the recursion knows at no
            extra HVP: steps 1..K-1 in the last round); for the sequential schedule
            (FirstOrder, Truncated, Exact) it is the norm of the change one factor makes.
            Entries that grow from round to round mean the expansion diverges.
        hvp_count: Hessian-vector products computed.
        oracle_calls: calls made to the HVP oracle (one per round).
    """

    meta_grad: Tensors
    adjoints: Dict[int, Tensors] = field(default_factory=dict)
    full_adjoints: Dict[int, Tensors] = field(default_factory=dict)
    contributions: List[float] = field(default_factory=list)
    hvp_count: int = 0
    oracle_calls: int = 0


def expand(
    plan: ExpansionPlan,
    g: Mapping[str, torch.Tensor],
    step_size: Optional[StepSize],
    hvp: HVPOracle,
    *,
    steps: int,
    with_adjoints: bool = False,
    with_full_adjoints: bool = False,
    rule=None,
) -> ExpansionResult:
    """Evaluate the kept terms of ``(I - a H_0)...(I - a H_{K-1}) g`` for an :class:`ExpansionPlan`.

    Args:
        plan: from ``estimator.plan(steps)``.
        g: the outer-loss gradient at the adapted point, a dict of tensors.
        step_size: per-entry inner step size ``a`` of plain SGD (a float or a tensor
            broadcastable to the entry), before the plan's ``hessian_scale``.
        hvp: the oracle ``hvp(range_of_steps, stacked_vectors) -> stacked H_j v_j``.
        steps: ``K``, the number of inner steps.
        with_adjoints: also return ``lambda_{k+1}`` (one order less) for every step with kept Hessian.
        with_full_adjoints: also return ``lambda_{k+1}`` at the full order for every step.
        rule: instead of ``step_size``, a :class:`~binom_opt.update_rules.RuleAdjoint` for inner
            optimizers with state (momentum, Adam): each step's Jacobian is ``D_k + B_k H_k``
            and the same level recursion runs with ``D_k^T`` applied exactly.

    Example (explicit 1x1 Hessians ``H_k = k + 1``, exact MAML ``(1-a)(1-2a)(1-3a) g``):
        >>> import torch, binom_opt as bo
        >>> from binom_opt.expansion import expand
        >>> H = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> oracle = lambda js, v: {"w": H[js.start:js.stop, None] * v["w"]}
        >>> g = {"w": torch.ones(1, dtype=torch.float64)}
        >>> expand(bo.Exact().plan(3), g, {"w": 0.1}, oracle, steps=3).meta_grad["w"]
        tensor([0.5040], dtype=torch.float64)
        >>> expand(bo.Binomial(1).plan(3), g, {"w": 0.1}, oracle, steps=3).meta_grad["w"]
        tensor([0.4000], dtype=torch.float64)
    """
    if rule is not None and not rule.identity_direct:
        return _with_rule(plan, dict(g), rule, hvp, steps, with_adjoints, with_full_adjoints)
    scaled = {name: _scaled(step_size[name], plan.hessian_scale) for name in g}
    if plan.schedule == "sequential":
        result = _sequential(plan, dict(g), scaled, hvp, steps, with_adjoints)
    else:
        result = _binomial(plan, dict(g), scaled, hvp, steps, with_adjoints)
    if with_full_adjoints:  # D_k = I: below the first kept Hessian the adjoint stays u_f
        final = result.full_adjoints
        result.full_adjoints = {k: final.get(k, result.meta_grad) for k in range(steps)}
    return result


def _scaled(a: Union[float, torch.Tensor], factor: float) -> Union[float, torch.Tensor]:
    return a * factor if factor != 1.0 else a


def _sequential(plan, g, step_size, hvp, steps, with_adjoints) -> ExpansionResult:
    """Apply the factors ``I - a H_j`` for ``j = K-1`` down to ``plan.first_active``, one HVP each."""
    result = ExpansionResult(meta_grad=g)
    v = g
    for j in reversed(range(plan.first_active, steps)):
        if with_adjoints:
            result.adjoints[j] = v
        result.full_adjoints[j] = v
        hv = _single_hvp(hvp, j, {n: step_size[n] * t for n, t in v.items()})
        v = {n: v[n] - hv[n] for n in v}
        result.contributions.append(_norm(hv))
        result.hvp_count += 1
        result.oracle_calls += 1
    result.meta_grad = v
    return result


def _single_hvp(hvp: HVPOracle, j: int, v: Tensors) -> Tensors:
    out = hvp(range(j, j + 1), {n: t.unsqueeze(0) for n, t in v.items()})
    return {n: t.squeeze(0) for n, t in out.items()}


def _binomial(plan, g, step_size, hvp, steps, with_adjoints) -> ExpansionResult:
    """The batched level recursion (paper Algorithm 2 in matrix form)."""
    L, f, K = plan.levels, plan.first_active, steps
    # u[name][j] holds the current level's u_j for j = 0..K (entries below the round's first
    # index are never read). Level 0 is g everywhere.
    u = {n: t.unsqueeze(0).expand(K + 1, *t.shape).clone() for n, t in g.items()}
    result = ExpansionResult(meta_grad=g)
    for level in range(1, L + 1):
        if with_adjoints and level == L:
            # lambda_{k+1} ~ u_{k+1}^(L-1): snapshot before the last round overwrites them.
            result.adjoints = {k: {n: t[k + 1].clone() for n, t in u.items()} for k in range(f, K)}
        lo, hi = max(L - level, f), K - level  # this round's HVP indices j = lo..hi
        # The lowest index holding a level-(l-1) value that this round raises to level l:
        # the difference there is exactly the order-l terms over steps >= window.
        window = max(L - level + 1, f)
        before = {n: t[window].clone() for n, t in u.items()}
        vectors = {n: step_size[n] * t[lo + 1 : hi + 2] for n, t in u.items()}
        hv = hvp(range(lo, hi + 1), vectors)
        for n, t in u.items():
            # u_j = u_{hi+1} - sum_{i=j..hi} H_i v_i: reverse cumulative sum from the exact tail.
            t[lo : hi + 1] = t[hi + 1] - hv[n].flip(0).cumsum(0).flip(0)
        result.contributions.append(_norm({n: u[n][window] - before[n] for n in u}))
        result.hvp_count += hi - lo + 1
        result.oracle_calls += 1
    result.meta_grad = {n: t[f].clone() for n, t in u.items()}
    result.full_adjoints = {k: {n: t[k + 1] for n, t in u.items()} for k in range(f, K)}
    return result


def _with_rule(plan, g, rule, hvp, steps, with_adjoints, with_full) -> ExpansionResult:
    """The level recursion with a non-trivial direct part: ``u_j = D_j^T u_{j+1} + [H_j s B_j^T u'_{j+1}]``.

    ``u'`` is the previous level, ``s`` the plan's Hessian scale; adjoint vectors carry the
    optimizer state's cotangents too (see :class:`~binom_opt.update_rules.RuleAdjoint`).
    """
    L, f, K, scale = plan.levels, plan.first_active, steps, plan.hessian_scale
    names = list(g)
    result = ExpansionResult(meta_grad=g)

    def with_hessian(j: int, direct: Tensors, h: Tensors) -> Tensors:
        return {**direct, **{n: direct[n] + h[n] for n in names}}

    def through_grad(j: int, z: Tensors) -> Tensors:
        w = rule.vjp(j, z)[1]
        return {n: t * scale for n, t in w.items()} if scale != 1.0 else w

    u: Dict[int, Tensors] = {K: rule.extend(g)}
    if plan.schedule == "sequential":
        for j in reversed(range(K)):
            if with_adjoints and j >= f:
                result.adjoints[j] = u[j + 1]
            direct = rule.vjp(j, u[j + 1])[0]
            if j >= f:
                h = _single_hvp(hvp, j, through_grad(j, u[j + 1]))
                direct = with_hessian(j, direct, h)
                result.contributions.append(_norm(h))
                result.hvp_count += 1
                result.oracle_calls += 1
            u[j] = direct
    else:
        for j in reversed(range(max(L - 1, f), K)):  # level 0 where round 1 reads it
            u[j] = rule.vjp(j, u[j + 1])[0]
        for level in range(1, L + 1):
            if with_adjoints and level == L:
                result.adjoints = {k: u[k + 1] for k in range(f, K)}
            lo, hi = max(L - level, f), K - level
            window = max(L - level + 1, f)
            before = u[window]
            ws = [through_grad(i, u[i + 1]) for i in range(lo, hi + 1)]
            hv = hvp(range(lo, hi + 1), {n: torch.stack([w[n] for w in ws]) for n in names})
            for j in reversed(range(lo, hi + 1)):  # u[hi + 1] is the exact tail, shared by both levels
                u[j] = with_hessian(j, rule.vjp(j, u[j + 1])[0], {n: hv[n][j - lo] for n in names})
            result.contributions.append(_norm({n: u[window][n] - before[n] for n in names}))
            result.hvp_count += hi - lo + 1
            result.oracle_calls += 1
        for j in reversed(range(f)):  # below the first kept Hessian only D_j^T acts
            u[j] = rule.vjp(j, u[j + 1])[0]
    if with_full:
        result.full_adjoints = {k: u[k + 1] for k in range(K)}
    result.meta_grad = {n: u[0][n] for n in names}
    return result


def _norm(tensors: Tensors) -> float:
    return float(torch.sqrt(sum(t.detach().double().pow(2).sum() for t in tensors.values())))
