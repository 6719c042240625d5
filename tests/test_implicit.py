"""Implicit (iMAML) and Reptile, float64, against their references.

Implicit: on quadratic support losses the proximal inner loop converges to ``phi* = (A + reg I)^-1
(b + reg theta)`` and the meta-gradient is the closed form ``(I + A/reg)^-1 grad l_q(phi*)``, which
is also what exact MAML unrolled through the converged proximal loop gives; an ANIL body's
meta-gradient is checked against that unrolled loop. Reptile: the outer SGD step is Reptile's
update. Every entry point agrees with these in tests/test_entry_points.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo
from binom_opt.core.implicit import conjugate_gradient, proximal

from cases import BodyHead, generator

D, REG, LR = 5, 2.0, 0.1


class Point(nn.Module):
    """A model that is just a vector, for quadratic losses of it."""

    def __init__(self, d=D):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, generator=generator(3), dtype=torch.float64))

    def forward(self):
        return self.w


def quadratic(seed=0, d=D, shift=0.5):
    gen = generator(seed)
    M = torch.randn(d, d, generator=gen, dtype=torch.float64)
    A = M @ M.T / d + shift * torch.eye(d, dtype=torch.float64)
    return A, torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)


def closed_form(theta, A, b, c, reg=REG):
    eye = torch.eye(len(theta), dtype=torch.float64)
    phi_star = torch.linalg.solve(A + reg * eye, b + reg * theta)
    return torch.linalg.solve(eye + A / reg, phi_star - c)  # the query loss is 1/2 ||phi - c||^2


def unrolled_proximal(model, support, query, steps, lr=LR, reg=REG, adapt=None):
    """Exact MAML through the proximal inner loop, by autograd with create_graph (theta in the proximal term too)."""
    named = dict(model.named_parameters())
    adapted = {n: p for n, p in named.items() if adapt is None or n.startswith(adapt)}
    phi = dict(adapted)
    for _ in range(steps):
        loss = support({**named, **phi}) + reg / 2 * sum(((phi[n] - adapted[n]) ** 2).sum() for n in phi)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - lr * g for (n, p), g in zip(phi.items(), grads)}
    return dict(zip(named, torch.autograd.grad(query({**named, **phi}), list(named.values()), allow_unused=True)))


def test_implicit_equals_the_closed_form_and_the_unrolled_proximal_loop():
    A, b, c = quadratic()
    model = Point()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=300, estimator=bo.Implicit(D, REG))
    learner = engine.adapt(lambda m: 0.5 * m.params["w"] @ A @ m.params["w"] - b @ m.params["w"])
    (0.5 * ((learner.params["w"] - c) ** 2).sum()).backward()
    expected = closed_form(model.w.detach(), A, b, c)
    torch.testing.assert_close(model.w.grad, expected, rtol=1e-8, atol=0)
    support = lambda p: 0.5 * p["w"] @ A @ p["w"] - b @ p["w"]
    unrolled = unrolled_proximal(model, support, lambda p: 0.5 * ((p["w"] - c) ** 2).sum(), steps=300)["w"]
    torch.testing.assert_close(unrolled, expected, rtol=1e-8, atol=0)
    stats = engine.last_stats
    assert stats.cg_residual < 1e-10 and stats.hvp_count == D and stats.levels == D and stats.schedule == "implicit"
    assert not stats.unreliable_solve and stats.unsolved_tasks == ()
    assert len(stats.contributions) == D and stats.contributions[0] > stats.contributions[-1]


def test_the_inner_loop_minimises_the_proximal_support_loss():
    A, b, _ = quadratic()
    model = Point()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=300, estimator=bo.Implicit(1, REG))
    phi = engine.adapt(lambda m: 0.5 * m.params["w"] @ A @ m.params["w"] - b @ m.params["w"]).params["w"]
    expected = torch.linalg.solve(A + REG * torch.eye(D, dtype=torch.float64), b + REG * model.w.detach())
    torch.testing.assert_close(phi.detach(), expected, rtol=1e-10, atol=0)


def test_fewer_cg_steps_approximate_the_same_solution():
    A, b, c = quadratic()
    errors = []
    for steps in (1, 2, 3, D):
        model = Point()
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=300,
                                       estimator=bo.Implicit(steps, REG))
        learner = engine.adapt(lambda m: 0.5 * m.params["w"] @ A @ m.params["w"] - b @ m.params["w"])
        (0.5 * ((learner.params["w"] - c) ** 2).sum()).backward()
        expected = closed_form(model.w.detach(), A, b, c)
        errors.append(float((model.w.grad - expected).norm() / expected.norm()))
    assert errors[0] > errors[1] > errors[2] > 1e-6 > 1e-12 > errors[3]


def test_implicit_gives_an_anil_body_its_meta_gradient():
    """A frozen body reaches the head's support loss: its meta-gradient is that of the converged proximal loop."""
    torch.manual_seed(0)
    model = BodyHead().double()
    gen = generator(2)
    xs, xq = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(8, 4, generator=gen, dtype=torch.float64)
    ys, yq = torch.arange(6) % 2, torch.arange(8) % 2
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=0.2), steps=200,
                                   estimator=bo.Implicit(12, 1.0))
    learner = engine.adapt(lambda m: F.cross_entropy(m(xs), ys))
    F.cross_entropy(learner(xq), yq).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = unrolled_proximal(model, lambda p: F.cross_entropy(torch.func.functional_call(model, p, (xs,)), ys),
                                 lambda p: F.cross_entropy(torch.func.functional_call(model, p, (xq,)), yq),
                                 steps=200, lr=0.2, reg=1.0, adapt="head")
    assert engine.last_stats.cg_residual < 1e-9
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-8, atol=1e-12, msg=n)
    assert got["body.0.weight"].abs().sum() > 0


def concave_engine(**options):
    model = Point()
    return model, bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=3,
                                        estimator=bo.Implicit(3, 0.1), **options)


def test_negative_curvature_is_an_error_under_raise_and_a_warning_otherwise():
    model, engine = concave_engine()
    learner = engine.adapt(lambda m: -(m.params["w"] ** 2).sum())  # H = -2 I, H + reg I not positive definite
    with pytest.raises(FloatingPointError, match=r"negative curvature.*relative residual"):
        (learner.params["w"].sum()).backward()
    assert model.w.grad is None
    model, engine = concave_engine(nan_policy="skip_task")
    learner = engine.adapt(lambda m: -(m.params["w"] ** 2).sum())
    with pytest.warns(bo.ImplicitSolveWarning, match="negative curvature"):
        (learner.params["w"].sum()).backward()
    assert engine.last_stats.cg_residual is not None
    assert engine.last_stats.unsolved_tasks == (0,) and engine.last_stats.unreliable_solve


def test_task_batched_stats_name_the_tasks_whose_solve_broke_down():
    _, engine = concave_engine(nan_policy="skip_task")
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # task 1's support loss is concave
    learners = engine.adapt_batch(lambda m, sign: sign * (m.params["w"] ** 2).sum(), signs)
    with pytest.warns(bo.ImplicitSolveWarning, match="negative curvature"):
        learners.params["w"].sum().backward()
    assert engine.last_stats.unsolved_tasks == (1,) and engine.last_stats.unreliable_solve


def test_implicit_errors_name_the_problem():
    with pytest.raises(ValueError, match="cg_steps >= 1"):
        bo.Implicit(0, 1.0)
    with pytest.raises(ValueError, match="reg > 0"):
        bo.Implicit(1, -1.0)
    A, b, _ = quadratic()
    support = lambda p: 0.5 * p["w"] @ A @ p["w"] - b @ p["w"]
    w = {"w": torch.ones(D, dtype=torch.float64)}
    with pytest.raises(ValueError, match="own proximal inner loop"):
        bo.functional.meta_gradients(support, support, w, steps=2, lr=0.1, estimators=[bo.Implicit(1, 1.0), bo.Exact()])
    model = Point()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, estimator=bo.Implicit(1, 1.0),
                                   override={"lr": [lr]})
    learner = engine.adapt(lambda m: support(m.params))
    with pytest.raises(ValueError, match="no meta-gradient for learned learning rates"):
        learner.params["w"].sum().backward()


def test_conjugate_gradient_solves_each_task_on_its_own():
    A1, _, _ = quadratic(seed=1)
    A2, _, _ = quadratic(seed=2, shift=3.0)
    A = torch.stack([A1, A2])
    b = torch.randn(2, D, generator=generator(4), dtype=torch.float64)
    out = conjugate_gradient(lambda v: {"w": torch.einsum("bij,bj->bi", A, v["w"])}, {"w": b}, D)
    torch.testing.assert_close(out.x["w"], torch.linalg.solve(A, b), rtol=1e-10, atol=0)
    assert out.residual.max() < 1e-10 and not out.negative_curvature.any()
    assert [r.shape for r in out.residuals] == [(2,)] * D


def test_conjugate_gradient_flags_negative_curvature_and_stops_that_task():
    A = torch.stack([torch.eye(2, dtype=torch.float64), -torch.eye(2, dtype=torch.float64)])
    out = conjugate_gradient(lambda v: {"w": torch.einsum("bij,bj->bi", A, v["w"])}, {"w": torch.ones(2, 2, dtype=torch.float64)}, 2)
    assert out.negative_curvature.tolist() == [False, True]
    assert torch.equal(out.x["w"][1], torch.zeros(2, dtype=torch.float64)) and float(out.residual[1]) == 1.0
    torch.testing.assert_close(out.x["w"][0], torch.ones(2, dtype=torch.float64))


def test_proximal_term_holds_theta_constant():
    theta = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    loss = proximal(lambda p, task: p["w"].sum(), theta, 4.0)
    phi = {"w": torch.tensor([2.0, 2.0], requires_grad=True)}
    value = loss(phi, None)
    assert float(value.detach()) == 4.0 + 2.0  # sum 4, plus 4/2 * ||(1, 0)||^2
    grad_phi, grad_theta = torch.autograd.grad(value, [phi["w"], theta["w"]], allow_unused=True)
    assert grad_phi.tolist() == [1.0 + 4.0, 1.0] and grad_theta is None


# -------------------------------------------------------------------------------------------------- Reptile


def test_reptile_step_is_reptiles_update():
    """SGD(lr=eps) on Reptile's meta-gradient: theta <- theta + eps (phi_K - theta), phi_K from plain SGD steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    gen = generator(1)
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.arange(6) % 2
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi = dict(theta)
    for _ in range(4):
        grads = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, {n: p.requires_grad_(True) for n, p in
                                                                                      phi.items()}, (x,)), y), list(phi.values()))
        phi = {n: (p - 0.3 * g).detach() for (n, p), g in zip(phi.items(), grads)}
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.3), steps=4, estimator=bo.Reptile())
    meta_opt = torch.optim.SGD(model.parameters(), lr=0.25)
    learner = engine.adapt(lambda m: F.cross_entropy(m(x), y))
    F.cross_entropy(learner(x), y).backward()  # any loss of the learner carries the direction
    meta_opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n] + 0.25 * (phi[n] - theta[n]), rtol=1e-12, atol=1e-14)
    assert engine.last_stats.hvp_count == 0 and engine.last_stats.schedule == "reptile"


def test_reptile_ignores_the_query_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.arange(5) % 2
    grads = []
    for query in (lambda out: F.cross_entropy(out, y), lambda out: 7 * out.pow(2).sum()):
        model.zero_grad()
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.3), steps=2, estimator=bo.Reptile())
        query(engine.adapt(lambda m: F.cross_entropy(m(x), y))(x)).backward()
        grads.append(model.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_reptile_refuses_other_meta_parameters():
    torch.manual_seed(0)
    model = BodyHead().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 2
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=0.3), steps=2, estimator=bo.Reptile())
    learner = engine.adapt(lambda m: F.cross_entropy(m(x), y))
    with pytest.raises(ValueError, match="Reptile.*adapted parameters only"):
        F.cross_entropy(learner(x), y).backward()
    assert all(p.grad is None for p in model.parameters())


def test_estimator_of_another_inner_loop_is_refused():
    """A loop adapted without the proximal term cannot give Implicit's meta-gradient, nor the reverse."""
    A, b, _ = quadratic()
    support = lambda p: 0.5 * p["w"] @ A @ p["w"] - b @ p["w"]
    w = {"w": torch.ones(D, dtype=torch.float64)}
    from binom_opt.core.batching import Tasks
    from binom_opt.core.options import Options
    from binom_opt.core.recorder import InnerLoop, Setup
    from binom_opt.core.update_rules import sgd_rules

    rules, hyper = sgd_rules(0.1, list(w))
    for recorded, asked in ((bo.Exact(), bo.Implicit(1, 1.0)), (bo.Implicit(1, 1.0), bo.Exact())):
        leaves = {n: t.clone().requires_grad_(True) for n, t in w.items()}
        loop = InnerLoop(Setup(recorded, Options(), lambda fn: lambda phi, task: fn(phi)), leaves, rules, hyper, Tasks())
        loop.step(support)
        with pytest.raises(ValueError, match="proximal term"):
            loop.outputs(asked)["w"].sum().backward()
