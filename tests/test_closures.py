"""A closure's captured tensors with a graph (ANIL's features) are cut where the closure reads them: the inner steps
and the HVPs stop there, and the meta-gradient still reaches what computed them, as the unrolled loop's does."""

import functools

import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo
from binom_opt.core.closures import closure_key, cut_captured

from cases import BodyHead


def body_head(seed=0):
    torch.manual_seed(seed)
    return BodyHead().double()


def test_cut_replaces_captured_tensors_with_a_graph_by_leaves_sharing_their_storage():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    features, plain, parameter = 2 * w, torch.ones(3), torch.nn.Parameter(torch.ones(3))
    scale = {"value": 1.0}

    def make():
        def closure(m, f=features, *, k=features):
            return (m * f * k * plain * parameter).sum() * scale["value"]
        return closure

    closure = make()
    cut, origins = cut_captured(closure)
    f, k = cut.__defaults__[0], cut.__kwdefaults__["k"]
    assert f.is_leaf and f.requires_grad and f.data_ptr() == features.data_ptr()
    assert origins == {id(f): features, id(k): features}
    assert [c.cell_contents for c in cut.__closure__] == [c.cell_contents for c in closure.__closure__]  # no tensor cut
    assert all(a is b for a, b in zip(cut.__closure__, closure.__closure__))  # the other cells stay shared
    assert cut(torch.ones(3)).grad_fn is not None


def test_cells_holding_a_tensor_with_a_graph_are_cut_and_the_others_stay_shared():
    w = torch.ones(2, requires_grad=True)
    features, factor = w * 3, [1.0]
    closure = lambda m: (m * features).sum() * factor[0]
    cut, origins = cut_captured(closure)
    cells = {type(c.cell_contents).__name__: c for c in cut.__closure__}
    assert cells["Tensor"].cell_contents.is_leaf and list(origins.values()) == [features]
    assert cells["list"] is next(c for c in closure.__closure__ if isinstance(c.cell_contents, list))


@pytest.mark.parametrize("closure", [
    lambda m: m.sum(),  # nothing captured
    functools.partial(lambda m, f: (m * f).sum(), f=torch.ones(2, requires_grad=True) * 2),  # not a function
], ids=["nothing", "partial"])
def test_closures_without_a_cut_come_back_as_they_are(closure):
    assert cut_captured(closure) == (closure, {})


def test_closure_key_is_unchanged_by_the_cut_of_another_closure():
    features = torch.ones(2, requires_grad=True) * 2
    closure = lambda m, f=features: (m * f).sum()
    key = closure_key(closure)
    cut_captured(closure)
    assert closure_key(closure) == key and closure.__defaults__[0] is features


def unrolled(model, xs, ys, xq, yq, steps=3, lr=0.5):
    """ANIL's exact meta-gradient with create_graph autograd: the head adapts on the body's features."""
    head = {n: p for n, p in model.named_parameters() if n.startswith("head.")}
    features = model.body(xs)
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(F.linear(features, head["head.weight"], head["head.bias"]), ys),
                                    list(head.values()), create_graph=True)
        head = {n: p - lr * g for (n, p), g in zip(head.items(), grads)}
    loss = F.cross_entropy(F.linear(model.body(xq), head["head.weight"], head["head.bias"]), yq)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


@pytest.mark.parametrize("budget", ["auto", None], ids=["kept-graphs", "replayed"])
@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Binomial(1)], ids=repr)
def test_a_body_gets_its_meta_gradient_through_cut_features(estimator, budget):
    """Features captured by a default argument and by a cell, each later rebound (a loop's late binding): the
    meta-gradient is the unrolled one of the loop as it ran, the body's weights included."""
    gen = torch.Generator().manual_seed(0)
    xs, xq = (torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in (6, 9))
    ys, yq = torch.arange(6) % 3, torch.arange(9) % 3
    model = body_head()
    expected = unrolled(model, xs, ys, xq, yq, steps=3)
    for capture in ("default", "cell"):
        model.zero_grad(set_to_none=True)
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=0.5), 3, estimator,
                                       memory_budget=budget)
        features = model.body(xs)
        if capture == "default":
            learner = engine.adapt(lambda m, f=features: F.cross_entropy(F.linear(f, m.params["head.weight"], m.params["head.bias"]), ys))
        else:
            learner = engine.adapt(lambda m: F.cross_entropy(F.linear(features, m.params["head.weight"], m.params["head.bias"]), ys))
        features = torch.zeros_like(features)  # rebound after the inner loop: the meta-gradient is the loop's as it ran
        loss = F.cross_entropy(F.linear(model.body(xq), learner.params["head.weight"], learner.params["head.bias"]), yq)
        loss.backward()
        if isinstance(estimator, bo.Exact):
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-12)
        else:
            assert model.body[0].weight.grad.abs().sum() > 0


def test_steps_stop_at_the_cut_features():
    """The support loss's graph ends at the cut leaf: an inner step's gradient never reaches the body's nodes."""
    from binom_opt.core.adaptation import _nodes
    from binom_opt.core.batching import Tasks

    model = body_head()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=0.5), 2, bo.Exact())
    features = model.body(torch.randn(6, 4, dtype=torch.float64))
    loop = engine._loop(Tasks())
    for _ in range(2):
        loop.step(lambda m, f=features: F.cross_entropy(F.linear(f, m.params["head.weight"], m.params["head.bias"]), torch.arange(6) % 3))
    (meta_input,) = loop._meta_inputs.values()
    assert meta_input.is_leaf and meta_input.shape == features.shape
    body_nodes = set(_nodes(features))
    assert loop._graphs and all(not body_nodes & set(_nodes(g)) for graph in loop._graphs.values() for g in graph.grads)
