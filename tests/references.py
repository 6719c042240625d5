"""Independent references for the estimators, written from their definitions, not from the library.

* :func:`brute_force`: enumerates every index subset of the expansion of
  ``(I - A H_0)...(I - A H_{K-1}) g`` (explicit Hessians, ``A`` the diagonal of step sizes) and
  keeps the ones an estimator keeps. With meta-parameters ``c`` other than the initial point it
  also sums the mixed terms ``-M_k A lambda_{k+1}`` (``M_k = d^2 l / dc dphi``) over the kept
  index sets ``{k} | S``.
* :func:`unrolled_autograd` and :func:`unrolled_higher`: the exact MAML meta-gradient by
  differentiating through the unrolled inner loop (``create_graph=True``, and ``higher``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn
from torch.func import functional_call

import binom_opt as bo

Tensors = Dict[str, torch.Tensor]


def keeps(estimator: bo.Estimator, indices: Sequence[int], steps: int) -> bool:
    """Whether ``estimator`` keeps the term whose second-order factors sit at ``indices``."""
    n = len(indices)
    if isinstance(estimator, bo.FirstOrder):
        return n == 0
    if isinstance(estimator, bo.Exact):
        return True
    if isinstance(estimator, bo.Truncated):
        return all(k >= steps - estimator.L for k in indices)
    if isinstance(estimator, bo.Binomial):
        return n <= estimator.L
    if isinstance(estimator, bo.Hybrid):
        return n <= estimator.L and all(k >= steps - estimator.C for k in indices)
    raise TypeError(estimator)


def hessian_scale(estimator: bo.Estimator, steps: int) -> float:
    if getattr(estimator, "hessian_scale", "exact") == "paper":
        return estimator.L / steps
    return 1.0


@dataclass
class Unrolled:
    """An inner loop in flat coordinates, with the explicit second-order matrices at each point."""

    hessians: List[torch.Tensor]  # H_k, d x d
    mixed: List[torch.Tensor]  # M_k = d^2 l / dc dphi, dc x d (dc = 0 without meta-parameters)
    g: torch.Tensor  # outer gradient at phi_K wrt phi
    g_meta: torch.Tensor  # outer gradient at phi_K wrt c (the direct path)
    step: torch.Tensor  # the diagonal of A, length d


def brute_force(u: Unrolled, estimator: bo.Estimator, steps: int):
    """(meta-gradient wrt the initial point, meta-gradient wrt c) kept by ``estimator``."""
    a = u.step * hessian_scale(estimator, steps)

    def chain(indices: Sequence[int], v: torch.Tensor) -> torch.Tensor:
        for k in reversed(indices):  # the largest index acts first
            v = -(u.hessians[k] @ (a * v))
        return v

    init = torch.zeros_like(u.g)
    for n in range(steps + 1):
        for subset in itertools.combinations(range(steps), n):
            if keeps(estimator, subset, steps):
                init = init + chain(subset, u.g)
    meta = u.g_meta.clone()
    for k in range(steps):
        for n in range(steps - k):
            for subset in itertools.combinations(range(k + 1, steps), n):
                if keeps(estimator, (k,) + subset, steps):
                    meta = meta - u.mixed[k] @ (a * chain(subset, u.g))
    return init, meta


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Tensors) -> Tensors:
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def unroll(
    model: nn.Module,
    adapted: Sequence[str],
    lrs: Dict[str, float],
    support: Callable[[Callable], torch.Tensor],
    query: Callable[[Callable], torch.Tensor],
    steps: int,
) -> Unrolled:
    """Run the inner loop with plain autograd and take explicit Hessians and mixed matrices."""
    params = dict(model.named_parameters())
    phi0 = {n: params[n].detach() for n in adapted}
    meta = {n: p.detach() for n, p in params.items() if n not in phi0 and p.requires_grad}

    def loss_at(fn, phi_flat, c_flat):
        values = {**unflatten(phi_flat, phi0), **unflatten(c_flat, meta)}
        return fn(lambda *x: functional_call(model, values, x))

    step = flatten([torch.full_like(phi0[n], lrs[n]) for n in phi0])
    phi = flatten(phi0.values())
    c = flatten(meta.values()) if meta else phi.new_zeros(0)
    hessians, mixed = [], []
    for k in range(steps):
        step_loss = support[k] if isinstance(support, (list, tuple)) else support  # one per step: its random state
        hessians.append(torch.autograd.functional.hessian(lambda p: loss_at(step_loss, p, c), phi, vectorize=True))
        if meta:
            grad_phi = lambda cc: torch.autograd.functional.jacobian(
                lambda p: loss_at(step_loss, p, cc), phi, create_graph=True
            )
            mixed.append(torch.autograd.functional.jacobian(grad_phi, c).T)
        else:
            mixed.append(phi.new_zeros(0, phi.numel()))
        grad = torch.autograd.functional.jacobian(lambda p: loss_at(step_loss, p, c), phi)
        phi = phi - step * grad
    g = torch.autograd.functional.jacobian(lambda p: loss_at(query, p, c), phi)
    g_meta = torch.autograd.functional.jacobian(lambda cc: loss_at(query, phi, cc), c) if meta else c
    return Unrolled(hessians, mixed, g, g_meta, step)


def unrolled_autograd(model, adapted, lrs, support, query, steps) -> Tensors:
    """Exact meta-gradient of every parameter that requires grad, by backpropagating through the unrolled loop.

    ``support`` and ``query`` get the model at the current point as a function of positional and
    keyword inputs (``f(x)``, ``f(input_ids=..., labels=...)``)."""
    params = dict(model.named_parameters())
    phi = {n: params[n] for n in adapted}
    for _ in range(steps):
        loss = support(lambda *x, **kw: functional_call(model, phi, x, kw))
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: phi[n] - lrs[n] * g for n, g in zip(phi, grads)}
    outer = query(lambda *x, **kw: functional_call(model, phi, x, kw))
    meta = {n: p for n, p in params.items() if p.requires_grad}  # frozen ones (an adapter's base) have none
    grads = torch.autograd.grad(outer, list(meta.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(meta.items(), grads)}


def unrolled_higher(model, inner_opt, support, query, steps) -> Tensors:
    """Exact meta-gradient of every parameter with ``higher``'s differentiable optimizer."""
    import higher

    params = dict(model.named_parameters())
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(support(fmodel))
        outer = query(fmodel)
        grads = torch.autograd.grad(outer, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def relative_error(estimate: Tensors, reference: Tensors) -> float:
    a = flatten([estimate[n] for n in reference])
    b = flatten(list(reference.values()))
    difference, scale = float((a - b).norm()), float(b.norm())
    return difference / scale if scale > 0 else difference  # an all-zero reference: the absolute error


def brute_force_with_rule(model, adapted, rules, hyper, support, query, steps, estimator):
    """The generalised expansion for inner optimizers with state, by enumerating index subsets (``support``: one
    loss, or one per step).

    Each step's transposed Jacobian is ``D_k^T + C^T H_k B_k^T`` (``D``: the update's Jacobian in
    the point and state with the gradient fixed, ``B``: in the gradient, ``C^T`` embeds a point
    vector in (point, state)); the estimator keeps the products whose ``H``-factors sit at an
    index set it keeps. Explicit matrices throughout; the update is differentiated by autograd.
    """
    params = dict(model.named_parameters())
    phi = {n: params[n].detach() for n in adapted}
    state = {n: rules[n].init_state(phi[n]) for n in adapted}
    keys = [(n, None) for n in adapted] + [(n, s) for n in adapted for s in rules[n].state_names]
    d = sum(phi[n].numel() for n in adapted)

    def loss_at(fn, flat):
        return fn(lambda *x: functional_call(model, unflatten(flat, phi), x))

    def pack(p, st):
        return flatten([p[n] if s is None else st[n][s] for n, s in keys])

    def update(k, z, grad_flat):
        p = unflatten(z[:d], phi)
        st, offset = {n: {} for n in adapted}, d
        for n, s in keys[len(adapted):]:
            st[n][s] = z[offset : offset + phi[n].numel()].view_as(phi[n])
            offset += phi[n].numel()
        g = unflatten(grad_flat, phi)
        new = {n: rules[n].update(k, p[n], st[n], g[n], hyper[n]) for n in adapted}
        return pack({n: v[0] for n, v in new.items()}, {n: v[1] for n, v in new.items()})

    factors = []
    z = pack(phi, state)
    for k in range(steps):
        step_loss = support[k] if isinstance(support, (list, tuple)) else support  # one per step: its random state
        H = torch.autograd.functional.hessian(lambda f: loss_at(step_loss, f), z[:d], vectorize=True)
        grad = torch.autograd.functional.jacobian(lambda f: loss_at(step_loss, f), z[:d])
        D, B = torch.autograd.functional.jacobian(lambda zz, gg: update(k, zz, gg), (z, grad))
        factors.append((D, B, H))
        z = update(k, z, grad)
    g = torch.autograd.functional.jacobian(lambda f: loss_at(query, f), z[:d])
    z_K = torch.cat([g, g.new_zeros(z.numel() - d)])
    scale = hessian_scale(estimator, steps)
    total = torch.zeros_like(z_K)
    for n in range(steps + 1):
        for subset in itertools.combinations(range(steps), n):
            if not keeps(estimator, subset, steps):
                continue
            v = z_K
            for k in reversed(range(steps)):
                D, B, H = factors[k]
                if k in subset:
                    v = torch.cat([H @ (scale * (B.T @ v)), v.new_zeros(v.numel() - d)])
                else:
                    v = D.T @ v
            total = total + v
    return unflatten(total[:d], phi)


def with_random_state(loss, state: torch.Tensor):
    """``loss`` run from the CPU random state ``state`` (the caller's stream untouched): its draws fixed."""
    def fixed(f):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            return loss(f)
    return fixed


def step_states(loss, model, count: int) -> List[torch.Tensor]:
    """The random state each of ``count`` forwards of ``loss`` starts from, from the current one: what each inner step
    of a loop and then its query loss draw from (the number of draws of a forward does not depend on the point)."""
    states = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(count):
            states.append(torch.get_rng_state())
            with torch.no_grad():
                loss(model)
    return states
