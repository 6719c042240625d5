"""An inner step's gradient and update (core/stepper.py), and the point a step's update leaves (trajectory.Stored)."""

import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo
from binom_opt.core.batching import Tasks
from binom_opt.core.options import Options
from binom_opt.core.stepper import Stepper
from binom_opt.core.trajectory import Stored
from binom_opt.core.update_rules import SGDRule

from cases import generator

LR = 0.05


def _mlp_loss(unused: bool = False):
    gen = generator(3)
    x, y = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 1, generator=gen, dtype=torch.float64)
    point = {"w1": torch.randn(1, 3, 5, generator=gen, dtype=torch.float64),
             "w2": torch.randn(1, 5, 1, generator=gen, dtype=torch.float64),
             "spare": torch.randn(1, 2, generator=gen, dtype=torch.float64)}
    if not unused:
        del point["spare"]

    def loss(phi, task):
        return F.mse_loss(torch.tanh(x @ phi["w1"]) @ phi["w2"], y)

    return loss, point


def _stepper(point, allow_unused: bool = False) -> Stepper:
    stepper = Stepper({n: SGDRule() for n in point}, Tasks(), Options(), allow_unused)
    stepper.rates.append(LR)
    return stepper


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("link", [False, True])
def test_an_update_taken_with_the_gradient_is_the_update_rule_s_bit_for_bit(kept, link):
    loss, point = _mlp_loss()
    stepper = _stepper(point)
    plain = stepper.gradient(loss, point, 0)
    expected, _ = stepper.update(0, point, {}, plain.grads)
    keep = [] if kept else None
    taken = stepper.gradient(loss, {n: t.squeeze(0) for n, t in point.items()}, 0, keep=keep, one=True, rate=LR, link=link)
    assert taken.grads == {} and taken.update is not None
    for (n, want), got in zip(expected.items(), taken.update):
        assert torch.equal(got.unsqueeze(0), want), n
        assert got.requires_grad == (kept and link)  # with its graph only where the next step may chain to it
    assert torch.equal(taken.losses, plain.losses)
    if kept:
        (graph,) = keep
        assert (graph.out is taken.update) == link


def test_a_parameter_without_gradient_takes_the_update_rule_instead():
    loss, point = _mlp_loss(unused=True)
    stepper = _stepper(point, allow_unused=True)
    taken = stepper.gradient(loss, {n: t.squeeze(0) for n, t in point.items()}, 0, one=True, rate=LR)
    assert taken.update is None
    assert set(taken.grads) == set(point) and torch.count_nonzero(taken.grads["spare"]) == 0
    assert taken.grads["w1"].shape == point["w1"].shape  # with the task axis, for Stepper.update


def test_a_point_left_by_an_update_is_detached_and_given_its_task_axis_only_when_read():
    update = [torch.randn(3, 2, requires_grad=True) * 2, torch.randn(4)]
    stored = Stored(update=(["a", "b"], update))
    one = stored.one()
    assert one["a"] is update[0] and one["b"] is update[1]  # the next step's leaves, nothing made
    phi = stored.phi
    assert [tuple(t.shape) for t in phi.values()] == [(1, 3, 2), (1, 4)]
    assert not any(t.requires_grad for t in phi.values())
    assert all(t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() for t, u in zip(phi.values(), update))
    assert stored.phi is phi  # made once
    assert stored.one()["a"] is update[0]  # the node's outputs alias the update itself, without the task axis
    made = Stored({"a": torch.zeros(1, 3)})
    assert made.one()["a"].shape == (3,) and made.one()["a"]._base is made.phi["a"]  # a view, for a point stored whole


@pytest.mark.parametrize("estimator", [bo.FirstOrder(), bo.Binomial(1), bo.Exact()], ids=str)
def test_points_recorded_from_updates_hold_no_graph_and_no_grad(estimator):
    gen = generator(5)
    model = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    x, y = torch.randn(7, 2, generator=gen, dtype=torch.float64), torch.randn(7, 1, generator=gen, dtype=torch.float64)
    learner = bo.MAML(model, lr=LR, estimator=estimator).clone()
    for _ in range(4):
        learner.adapt(lambda m: F.mse_loss(m(x), y))
    loop = learner._loop
    points = [s.phi for s in loop._stored if s is not None and s.phi]  # FirstOrder reads none: all dropped
    assert len(points) == (0 if isinstance(estimator, bo.FirstOrder) else 4)
    for phi in [*points, loop._phi]:
        assert all(t.grad_fn is None and not t.requires_grad and t.shape[0] == 1 for t in phi.values())
    assert all(p.grad_fn is None for p in model.parameters())  # the model's own parameters untouched
