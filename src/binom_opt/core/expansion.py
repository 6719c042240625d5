"""The estimators' arithmetic: the binomial recursion (paper Algorithm 2), generalised to any inner optimizer.

With ``D_j + B_j H_j`` the Jacobian of inner step ``j`` and ``s`` the plan's Hessian scale,
``u_j^(l)`` (the kept terms with at most ``l`` Hessian factors, all at steps ``>= j``) satisfies

    u_K^(l) = g,    u_j^(0) = D_j^T u_{j+1}^(0),    u_j^(l) = D_j^T u_{j+1}^(l) + H_j (s B_j^T u_{j+1}^(l-1)).

Round ``l`` needs the HVPs at ``j = L-l .. K-l`` only, asked of the oracle in ONE call; the answer
is ``u_0^(L)`` (docs/design.md). Nothing here knows about models: ``hvp(steps, vectors)`` returns
``H_j v_j`` for each ``j`` of the ``range``, stacked, and every entry of ``g`` has the task dimension
first (``[B, ...]``), which the contribution norms keep apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .batching import stack
from .estimators import ExpansionPlan
from .reductions import RoundNorms, change_norms
from .update_rules import StepTranspose

Tensors = Dict[str, torch.Tensor]
HVPOracle = Callable[[range, Tensors], Tensors]

__all__ = ["ExpansionResult", "expand"]


@dataclass
class ExpansionResult:
    """What :func:`expand` returns.

    Attributes:
        meta_grad: the estimate of the meta-gradient with respect to the initial point, ``[B, ...]``.
        full_adjoints: ``{k: lambda_{k+1}}`` for every step at the full order (for hyperparameters such
            as learned learning rates, whose terms have no Hessian factor); filled only when asked for.
        contributions: each round's norms, ``[rounds, B]`` (``None``: no round). For the binomial schedule, round ``l``'s
            entry is the norm of the sum of the terms with exactly ``l`` Hessian factors, all at steps
            ``>= max(L - l + 1, K - C)`` (the widest window the recursion knows at no extra HVP); for the
            sequential schedule the norm of the change one factor makes. Entries that grow from round
            to round mean the expansion diverges.
        hvp_count: Hessian-vector products computed per task.
        oracle_calls: calls made to the HVP oracle (one per round).
        others: the gradients of :func:`expand`'s ``others`` that a chain's backward took with the adjoints (the sums of
            their mixed terms), ``None`` where no chain ran (the adjoints were handed to ``on_adjoint`` instead).
    """

    meta_grad: Tensors
    full_adjoints: Dict[int, Tensors] = field(default_factory=dict)
    contributions: Optional[torch.Tensor] = None
    hvp_count: int = 0
    oracle_calls: int = 0
    others: Optional[Tuple[Optional[torch.Tensor], ...]] = None


def expand(
    plan: ExpansionPlan,
    g: Tensors,
    transpose: StepTranspose,
    hvp: HVPOracle,
    *,
    steps: int,
    on_adjoint: Optional[Callable[[int, Tensors], None]] = None,
    with_full_adjoints: bool = False,
    others: Sequence[torch.Tensor] = (),
) -> ExpansionResult:
    """Evaluate the kept terms of the product of the transposed step Jacobians applied to ``g``.

    ``on_adjoint(k, lambda_{k+1})`` is called for each step ``k`` whose Hessian is kept, in decreasing ``k``,
    as soon as the adjoint exists: the gradient of the outer loss with respect to ``(phi_{k+1}, state_{k+1})``
    at one Hessian factor less, what the mixed terms of other meta-parameters need. Handing them over
    instead of returning them keeps the memory of those terms from growing with K. Where an exact plan's adjoints come
    from one backward through chained kept graphs, that backward also takes the gradients of ``others`` (the
    meta-parameters ``on_adjoint`` serves: their mixed terms, summed as unrolled autograd sums them), returned as
    :attr:`ExpansionResult.others`, and ``on_adjoint`` is not called.

    Example (explicit 1x1 Hessians ``H_k = k + 1``, one task; exact MAML is ``(1-a)(1-2a)(1-3a) g``):
        >>> import torch, binom_opt as bo
        >>> from binom_opt.core.update_rules import SGDRule, StepTranspose
        >>> H = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> oracle = lambda js, v: {"w": H[js.start:js.stop, None, None] * v["w"]}
        >>> sgd, g = StepTranspose({"w": SGDRule()}, {"w": {"lr": 0.1}}), {"w": torch.ones(1, 1, dtype=torch.float64)}
        >>> expand(bo.Exact().plan(3), g, sgd, oracle, steps=3).meta_grad["w"]
        tensor([[0.5040]], dtype=torch.float64)
        >>> expand(bo.Binomial(1).plan(3), g, sgd, oracle, steps=3).meta_grad["w"]
        tensor([[0.4000]], dtype=torch.float64)
    """
    L, f, K, scale = plan.levels, plan.first_active, steps, plan.hessian_scale
    names = list(g)
    result = ExpansionResult(meta_grad=g)
    if f == K and not with_full_adjoints and transpose.identity_through(K):
        result.meta_grad = dict(g)  # no Hessian kept, every D_j^T the identity (FirstOrder's SGD steps): g, as below
        return result

    def scaled(w: Tensors) -> Tensors:  # s B_j^T z, the vector H_j multiplies
        return {n: t * scale for n, t in w.items()} if scale != 1.0 else w

    # Where B_j^T is a float c times the identity (plain SGD) and the estimator drops terms (L < K), H_j takes z itself
    # and its product is multiplied by s c when it is added (``factors``): no scaled copy of z, a reassociation far
    # below the approximation's own error; every path (kept graphs, replays, chunks) multiplies so. An exact plan keeps
    # unrolled autograd's order, H_j (s c z), and so the loop it replaces to the last bits even where the Hessian is
    # ill-conditioned (on GPT-2's masked attention in float64 the two orders differ by 6e-10, relative).
    plain = [transpose.through_rate(j) for j in range(K)]
    rates = plain if L < K else [None] * K
    factors = [1.0 if rate is None else scale * rate for rate in rates]

    def hessian_vector(j: int, z: Tensors) -> Tensors:
        return z if rates[j] is not None else scaled(transpose.vjp(j, z)[1])

    def step(direct: Tensors, hv: Tensors, c: float = 1.0) -> Tensors:  # D_j^T z + c H_j (...), one call for every entry
        added = dict(zip(names, torch._foreach_add([direct[n] for n in names], [hv[n] for n in names], alpha=c)))  # pyright: ignore[reportPrivateImportUsage]
        return added if len(direct) == len(names) else {**direct, **added}  # with the optimizer state's entries

    kept = getattr(hvp, "kept", None)  # HVPOracle: kept graphs take a list of vectors, unstacked
    listed = getattr(hvp, "listed", None)  # HVPOracle: products one at a time (kept graphs, or points one by one)
    adds = getattr(hvp, "adds", None)  # HVPOracle: whether it adds a vector to a product in the product's backward

    def hvps(steps: range, vectors: Callable[[], List[Tensors]], first: Optional[List[Tensors]] = None, bare: bool = False
             ) -> List[Tensors]:
        """The products at ``steps`` of the ``[B, ...]`` vectors ``vectors()`` makes (added to ``first``), as a list
        (``bare``: from kept graphs, one task's without the task axis, for :func:`step` to broadcast). Made here, not by
        the caller: stacked for the oracle, the list is a temporary, so a round never holds its vectors twice."""
        if listed is not None and listed(steps):
            return hvp.each(steps, vectors(), first, bare)  # pyright: ignore[reportFunctionMemberAccess]  # an HVPOracle
        made = vectors()
        stacked = {n: stack([v[n] for v in made]) for n in names}
        del made  # the stacked copies only, while the products run
        out = hvp(steps, stacked) if first is None else hvp(steps, stacked, {n: stack([v[n] for v in first]) for n in names})  # pyright: ignore[reportCallIssue]  # an HVPOracle
        return [{n: t[i] for n, t in out.items()} for i in range(len(steps))]

    alone = getattr(hvp, "replays_alone", None)  # HVPOracle: whether it replays one task's points one at a time

    def products(steps: range, vector: Callable[[int], Tensors]) -> Callable[[int], Tensors]:
        """``product(j)``: ``H_j`` applied to ``vector(j)`` for each ``j`` of ``steps``, asked for once each in decreasing
        ``j`` (one task's without the task axis). Where the oracle replays points one at a time each product is taken
        when asked, so a round holds one product and the caller may replace each vector once its product is taken;
        else the round's products at once (:func:`hvps`), each dropped as it is handed over."""
        if alone is not None and alone(steps):
            def taken_now(j: int) -> Tensors:
                result.oracle_calls += 1
                return hvp.each(range(j, j + 1), [vector(j)], bare=True)[0]  # pyright: ignore[reportFunctionMemberAccess]  # an HVPOracle
            return taken_now
        made = hvps(steps, lambda: [vector(i) for i in steps], bare=True)
        result.oracle_calls += 1

        def handed_over(j: int) -> Tensors:
            out, made[j - steps.start] = made[j - steps.start], {}
            return out
        return handed_over

    # kept graphs hold every step's gradient until the end: the rounds' vectors, as small, are held too and reduced at once
    rounds = RoundNorms(hold=kept is not None and kept(range(f, K)))
    keep_all = with_full_adjoints or plan.schedule == "binomial"
    u: Dict[int, Tensors] = {K: transpose.extend(g)}
    # Plain-SGD steps whose kept graphs the inner loop chained by their updates: an exact plan takes every adjoint
    # from one backward through the chain, as unrolled autograd takes them (the same products, H_j (-lr z), and the
    # same sums as step by step below, no Python between two HVPs).
    chain = getattr(hvp, "chain", None) if plan.schedule == "sequential" and L == K and scale == 1.0 else None
    top = {n: t.squeeze(0) for n, t in u[K].items()} if chain is not None else {}  # one task's, as the chain's graphs
    chained = chain(range(f, K), top, others) if chain is not None and all(r is not None for r in plain[f:K]) else None
    if chained is not None:
        adjoints, taken = chained
        result.others = taken if others else None
        handed = on_adjoint if not others else None  # the mixed terms of the others: taken by the chain's backward
        # the change each factor made, round by round as below (step K-1's first)
        result.contributions = change_norms([list(a.values()) for a in (top, *reversed(adjoints))], one_task=True)
        for j in reversed(range(f, K)):  # given the task axis where read: the meta-gradient's, the mixed terms' all
            if handed is not None:
                handed(j, u[j + 1])
            if j == f or handed is not None or keep_all:
                u[j] = {n: t.unsqueeze(0) for n, t in adjoints[j - f].items()}
        result.hvp_count += K - f
        result.oracle_calls += 1
    elif plan.schedule == "sequential":
        v = u[K]
        for j in reversed(range(f, K)):
            if on_adjoint is not None:
                on_adjoint(j, v)
            folded = rates[j] is not None
            if folded:
                direct, through = transpose.direct(j, v), v
            else:
                direct, through, _ = transpose.vjp(j, v)  # both parts of one step's transpose, from one call
            if not folded and plain[j] is not None and adds is not None and adds(range(j, j + 1)):
                # plain SGD, exact, with plain autograd: v + H_j (-lr v) summed in the product's backward, the direct
                # path first, as the chain's backward and unrolled autograd sum them (so the same bits as the chain)
                (after,) = hvps(range(j, j + 1), lambda: [scaled(through)], [direct])
                rounds.add(dict(zip(names, torch._foreach_sub([after[n] for n in names], [direct[n] for n in names]))))  # pyright: ignore[reportPrivateImportUsage]
                v = after
            else:
                (hv,) = hvps(range(j, j + 1), lambda: [through if folded else scaled(through)])
                v = step(direct, hv, factors[j])
                rounds.add(hv, factors[j])
            result.hvp_count += 1
            result.oracle_calls += 1
            if keep_all:
                u[j] = v
        u[f] = v
    else:
        for j in reversed(range(max(L - 1, f), K)):  # level 0 where round 1 reads it
            u[j] = transpose.direct(j, u[j + 1])
        for level in range(1, L + 1):
            if on_adjoint is not None and level == L:
                for k in reversed(range(f, K)):
                    on_adjoint(k, u[k + 1])
            lo, hi = max(L - level, f), K - level  # this round's HVP indices j = lo..hi
            window = max(L - level + 1, f)  # raised from level l-1 to l here: the difference is order l
            before = u[window]
            # the next round reads this round's sums (and a learned rate every step's); the last one's only its own
            # first and the window's: the others are dropped as they go, and one-by-one products then hold no copy per step
            keep = level < L or with_full_adjoints
            product = products(range(lo, hi + 1), lambda i: hessian_vector(i, u[i + 1]))
            summed = u[hi + 1]  # the exact tail, shared by both levels
            for j in reversed(range(lo, hi + 1)):
                # H_j applied to u[j + 1] at level l - 1, which the sum at level l replaces once the product is taken
                after = step(transpose.direct(j, summed), product(j), factors[j])
                if j < hi and (keep or j + 1 == window):
                    u[j + 1] = summed
                elif j < hi:
                    del u[j + 1]
                summed = after
            u[lo] = summed
            rounds.add(dict(zip(names, torch._foreach_sub([u[window][n] for n in names], [before[n] for n in names]))))  # pyright: ignore[reportPrivateImportUsage]
            result.hvp_count += hi - lo + 1
    for j in reversed(range(f)):  # below the first kept Hessian only D_j^T acts
        u[j] = transpose.direct(j, u[j + 1])
        if not keep_all:
            del u[j + 1]
    if chained is None:
        result.contributions = rounds.rounds()
    if with_full_adjoints:
        result.full_adjoints = {k: u[k + 1] for k in range(K)}
    result.meta_grad = {n: u[0][n] for n in names}
    return result
