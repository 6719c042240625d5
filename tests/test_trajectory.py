"""The recorded trajectory: one stored point per step, only the points an estimator reads, checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo
from binom_opt.core.batching import Tasks
from binom_opt.core.learner import module_loss
from binom_opt.core.options import Options
from binom_opt.core.recorder import InnerLoop, Setup
from binom_opt.core.trajectory import DROPPED
from binom_opt.core.update_rules import read_optimizer

from cases import dropout_model, mlp_sine, small_model, tasks
from references import unrolled_autograd

K = 7


def recorded(estimator, optimizer=torch.optim.SGD, steps=K, **options):
    """The trajectory of a finished inner loop of the sine case."""
    case = mlp_sine()
    named = dict(case.model.named_parameters())
    adapted, rules, hyper, _ = read_optimizer(named, optimizer(case.model.parameters(), lr=0.01))
    opts = Options(**options)
    loop = InnerLoop(Setup(estimator, opts, module_loss(case.model, opts.bn, False)), {n: named[n] for n in adapted}, rules,
                     hyper, Tasks())
    for _ in range(steps):
        loop.step(case.support)
    loop.outputs()
    return loop, case


def stored(loop):
    return [k for k, s in enumerate(loop._stored) if s is not None and s is not DROPPED]


@pytest.mark.parametrize("estimator, kept", [(bo.Exact(), range(K)), (bo.Binomial(2), range(K)), (bo.FirstOrder(), []),
                                              (bo.Truncated(2), [5, 6]), (bo.Hybrid(1, 3), [4, 5, 6])])
def test_only_the_points_the_estimator_reads_are_kept(estimator, kept):
    loop, _ = recorded(estimator)
    assert stored(loop) == list(kept)


def test_adam_keeps_every_point_and_its_state():
    loop, _ = recorded(bo.Truncated(1), torch.optim.Adam)
    assert stored(loop) == list(range(K))  # the transposes of Adam's steps read every step's values
    assert all(set(s.state[n]) == {"exp_avg", "exp_avg_sq"} for s in loop._stored for n in s.phi)


@pytest.mark.parametrize("every", [2, 3])
def test_checkpointing_stores_every_mth_point(every):
    loop, _ = recorded(bo.Exact(), checkpoint_every=every)
    assert stored(loop) == list(range(0, K, every))


@pytest.mark.cpu_only  # bitwise equality and the example code hold on the CPU
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Binomial(2), bo.Truncated(3), bo.Hybrid(2, 4)], ids=repr)
def test_recomputed_segments_give_bitwise_the_same_meta_gradient(estimator, optimizer):
    results = []
    for every in (None, 2, 3, K):
        case = mlp_sine()
        engine = bo.MetaGradientEngine(case.model, optimizer(case.model.parameters(), lr=0.01), K, estimator,
                                       checkpoint_every=every)
        case.query(engine.adapt(case.support)).backward()
        results.append([p.grad for p in case.model.parameters()])
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


def test_a_support_loss_that_changes_between_runs_is_caught_when_a_segment_is_recomputed():
    """A support loss that changes between calls away from the initial point (where the replay check looks) cannot
    be recomputed: that is an error, not another trajectory (random draws are replayed; a counter is not)."""
    (xs, ys, xq, yq), = tasks(1)
    model = small_model()
    start = model[0].weight.detach().clone()
    calls = [0]

    def support(m):
        calls[0] += 1
        moved = not torch.equal(m.params["0.weight"], start)
        return F.cross_entropy(m(xs), ys) + (1e-3 * calls[0] if moved else 0)

    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, bo.Truncated(1), checkpoint_every=2)
    learner = engine.adapt(support)
    with pytest.raises(RuntimeError, match="checkpoint_every.*not deterministic"):
        F.cross_entropy(learner(xq), yq).backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.cpu_only  # bitwise equality and the example code hold on the CPU
def test_checkpointing_with_randomness_same_replays_the_masks():
    (xs, ys, xq, yq), = tasks(1)
    results = []
    for every in (None, 2):
        model = dropout_model()
        torch.manual_seed(3)
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, bo.Exact(), randomness="same",
                                       checkpoint_every=every)
        learner = engine.adapt(lambda m: F.cross_entropy(m(xs), ys))
        F.cross_entropy(learner(xq), yq).backward()  # the query's masks come from the global stream, as in both runs
        results.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_checkpointing_refuses_resampled_randomness():
    with pytest.raises(ValueError, match="checkpoint_every.*randomness='different'"):
        bo.Options(checkpoint_every=3, randomness="different")


def test_stored_points_grow_like_the_square_root_of_k():
    for steps in (16, 100):
        every = math.isqrt(steps)
        loop, _ = recorded(bo.Exact(), steps=steps, checkpoint_every=every)
        assert len(stored(loop)) == math.ceil(steps / every)


def test_learners_between_steps_keep_their_own_prefix():
    """A learner evaluated after some steps keeps the points it needs even when later steps drop them."""
    (xs, ys, xq, yq), = tasks(1)
    model = small_model()
    maml = bo.MAML(model, lr=0.1, estimator=bo.Truncated(1))
    learner = maml.clone()
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    after_one = F.cross_entropy(learner(xq), yq)
    learner.adapt(lambda m: F.cross_entropy(m(xs), ys))
    after_one.backward()  # Truncated(1) over the first step only: exact for one step
    reference = small_model()
    engine = bo.MetaGradientEngine(reference, torch.optim.SGD(reference.parameters(), lr=0.1), 1, bo.Exact())
    F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))(xq), yq).backward()
    assert all(torch.allclose(a.grad, b.grad, rtol=1e-12, atol=0) for a, b in zip(model.parameters(), reference.parameters()))


class GraphSpy:
    """Counts the products taken from kept graphs, and holds weak references to every graph kept."""

    def __init__(self, monkeypatch):
        import weakref

        from binom_opt.core import oracle, stepper, trajectory

        self.products, self.kept = 0, []
        spy = self
        products = trajectory.products

        class Graph(trajectory.Graph):
            def __init__(self, *args, **keywords):
                super().__init__(*args, **keywords)
                spy.kept.append(weakref.ref(self.grads[0]))

        def counted(graphs, vectors, **keywords):
            spy.products += sum(isinstance(graph, Graph) for graph in graphs)  # kept ones (a replay builds its own)
            return products(graphs, vectors, **keywords)

        monkeypatch.setattr(stepper, "Graph", Graph)
        for module in (trajectory, oracle):
            monkeypatch.setattr(module, "products", counted)


def meta_step(estimator, model, support, query, steps=4, **options):
    """One bo.MAML meta-step's meta-gradient (a fresh model each call: the same seed, the same weights)."""
    model.zero_grad(set_to_none=True)
    learner = bo.MAML(model, lr=0.1, estimator=estimator, **options).clone()
    for _ in range(steps):
        learner.adapt(support)
    query(learner).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


CASES = {
    "dropout": lambda: (dropout_model(), *(lambda x, y: (lambda m: F.cross_entropy(m(x), y), lambda m: F.cross_entropy(m(x), y)))(
        torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)),
    "sine": lambda: (lambda case: (case.model, case.support, case.query))(mlp_sine()),
}


@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Binomial(1), bo.Binomial(2), bo.Truncated(2)], ids=repr)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kept_graphs_give_the_meta_gradient_of_the_replayed_steps(monkeypatch, case, estimator):
    """A small model keeps each step's graph under the default options and takes its HVPs from it: the meta-gradient
    of the replays (memory_budget=None keeps none), to rounding in float64, dropout's masks included."""
    spy = GraphSpy(monkeypatch)
    torch.manual_seed(3)
    model, support, query = CASES[case]()
    state = torch.get_rng_state()
    replayed = meta_step(estimator, model, support, query, memory_budget=None)
    assert spy.products == 0 and not spy.kept
    torch.set_rng_state(state)
    kept = meta_step(estimator, model, support, query)
    assert spy.products > 0
    for n in replayed:
        torch.testing.assert_close(kept[n], replayed[n], rtol=1e-12, atol=1e-14)


def test_graphs_are_kept_within_the_cap_and_released_after_the_backward(monkeypatch):
    """Steps keep their graphs while the adaptation's stay within AUTO_KEEP_GRAPH_CAP (measured per step): here two of
    five, whose HVPs come from their graphs, the others replayed; the backward frees every graph."""
    from binom_opt.core import memory, recorder

    case = mlp_sine()
    point = {n: p.detach() for n, p in case.model.named_parameters()}
    support = module_loss(case.model, "auto", False)(case.support)
    per_step = memory.activation_bytes(lambda p: support(p, None), point).hvp
    monkeypatch.setattr(recorder, "AUTO_KEEP_GRAPH_CAP", 2 * per_step)
    spy = GraphSpy(monkeypatch)
    expected = meta_step(bo.Exact(), case.model, case.support, case.query, steps=5, memory_budget=None)
    got = meta_step(bo.Exact(), case.model, case.support, case.query, steps=5)
    assert spy.products == 2 and len(spy.kept) == 2
    assert all(ref() is None for ref in spy.kept)  # released by the backward, without the cycle collector
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Binomial(2)], ids=repr)
def test_kept_graphs_give_the_mixed_terms_of_a_body(monkeypatch, estimator):
    """ANIL's form: the head adapts on features of a meta-learned body; the body's mixed terms come from the kept
    graphs (their gradients reach the body through the features), as from the replays."""
    from cases import BodyHead

    spy = GraphSpy(monkeypatch)
    xs, ys = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3
    got = {}
    for budget in (None, "auto"):
        torch.manual_seed(0)
        model = BodyHead().double()
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=0.5), 4, estimator, memory_budget=budget)
        features = model.body(xs)
        learner = engine.adapt(lambda m: F.cross_entropy(F.linear(features, m.params["head.weight"], m.params["head.bias"]), ys))
        F.cross_entropy(learner(xs), ys).backward()
        got[budget] = {n: p.grad for n, p in model.named_parameters()}
    assert spy.kept and got[None]["body.0.weight"].abs().sum() > 0
    for n in got[None]:
        torch.testing.assert_close(got["auto"][n], got[None][n], rtol=1e-12, atol=1e-14)


def test_kept_graphs_differentiate_the_loop_as_it_ran_with_no_replay_check(monkeypatch):
    """A closure that reads data changed after the inner loop: when every step kept its graph nothing is replayed,
    so the meta-gradient is the unrolled one of the loop as it ran (no replay check, no forward for it); replayed
    steps (memory_budget=None) refuse it as before."""
    from binom_opt.core import checks

    case = mlp_sine()
    data = {"scale": 1.0}
    support = lambda m: data["scale"] * case.support(m)
    meta_step(bo.Exact(), case.model, support, case.query)  # the support loss measured: every later step keeps its graph
    replays = []
    monkeypatch.setattr(checks, "over_tasks", lambda *a: replays.append(a) or (lambda point: torch.zeros(1, 1)))

    def changed_after(options):
        data["scale"] = 1.0
        case.model.zero_grad(set_to_none=True)
        learner = bo.MAML(case.model, lr=0.1, **options).clone()
        for _ in range(4):
            learner.adapt(support)
        data["scale"] = 2.0
        case.query(learner).backward()
        return {n: p.grad.clone() for n, p in case.model.named_parameters()}

    got = changed_after({})
    assert not replays
    data["scale"] = 1.0
    expected = unrolled_autograd(case.model, case.adapted, {n: 0.1 for n in case.adapted}, case.support, case.query, 4)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-13)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="not a pure function"):
        changed_after({"memory_budget": None})


def test_a_large_model_keeps_no_graph(monkeypatch):
    """Above the cap (a cap of 1 byte stands for a large model) no step keeps its graph (the first step of a support
    loss not measured yet keeps none either: it is measured once the step has run), and every HVP replays its step."""
    from binom_opt.core import recorder

    monkeypatch.setattr(recorder, "AUTO_KEEP_GRAPH_CAP", 1)
    spy = GraphSpy(monkeypatch)
    case = mlp_sine()
    meta_step(bo.Exact(), case.model, case.support, case.query)
    assert spy.products == 0 and not spy.kept


@pytest.mark.parametrize("options, keeps", [
    ({}, True), ({"memory_budget": None}, False), ({"memory_budget": "inner_step"}, False), ({"checkpoint_every": 2}, False),
    ({"randomness": "different"}, False), ({"randomness": "same"}, False), ({"hvp": "fwd"}, False), ({"compile_hvps": True}, False),
])
def test_which_options_keep_graphs(options, keeps):
    from binom_opt.core.memory import keeps_graphs

    assert keeps_graphs(Options(**options), batched=False) is keeps
    assert keeps_graphs(Options(**options), batched=True) is False  # a meta-batch's steps run vmapped: no graph


@pytest.mark.filterwarnings("ignore")  # Implicit's CG warns on this untrained model: only what is kept matters here
@pytest.mark.parametrize("estimator", [bo.FirstOrder(), bo.Implicit(2, reg=1.0)], ids=repr)
def test_estimators_without_hvps_at_the_points_keep_no_graph(monkeypatch, estimator):
    spy = GraphSpy(monkeypatch)
    case = mlp_sine()
    meta_step(estimator, case.model, case.support, case.query, nan_policy="skip_task")
    assert spy.products == 0 and not spy.kept


def test_an_adaptation_without_grad_keeps_no_graph(monkeypatch):
    """Adapted under torch.no_grad() (evaluation), no meta-gradient can follow: no step keeps its graph, so learners
    kept for many tasks hold their points only."""
    spy = GraphSpy(monkeypatch)
    case = mlp_sine()
    meta_step(bo.Exact(), case.model, case.support, case.query)  # measured and kept with grad
    kept = len(spy.kept)
    learner = bo.MAML(case.model, lr=0.1).clone()
    with torch.no_grad():
        for _ in range(4):
            learner.adapt(case.support)
    assert kept > 0 and len(spy.kept) == kept


def _chain_spy(monkeypatch) -> list:
    """The number of graphs each backward through a chain of kept graphs went through."""
    from binom_opt.core import oracle

    chains, original = [], oracle.chain_adjoints
    monkeypatch.setattr(oracle, "chain_adjoints", lambda graphs, g, others=(): chains.append(len(graphs)) or original(graphs, g, others))
    return chains


@pytest.mark.cpu_only  # bitwise equality holds on the CPU
def test_exact_takes_every_adjoint_in_one_backward_through_its_chained_graphs(monkeypatch):
    """Exact chains its kept plain-SGD steps by their updates, as unrolled autograd does: one backward through the
    chain takes every adjoint, with no product per step. It computes the products and sums of the step-by-step
    expansion with plain autograd (each product's backward adds the direct path first, as the chain's does): the
    meta-gradient of the replayed steps bit for bit, and the same change per Hessian factor."""
    chains = _chain_spy(monkeypatch)
    case = mlp_sine()

    def run(**options):
        wrapper = bo.MAML(case.model, lr=0.1, **options)
        case.model.zero_grad(set_to_none=True)
        learner = wrapper.clone()
        for _ in range(5):
            learner.adapt(case.support)
        case.query(learner).backward()
        return [p.grad.clone() for p in case.model.parameters()], wrapper.last_stats

    run()  # a support loss's first adaptation measures it at step 0, which keeps no graph
    chains.clear()
    kept, kept_stats = run()
    assert chains == [5]
    replayed, replayed_stats = run(checkpoint_every=2)  # the points recomputed and every product replayed
    assert chains == [5]
    assert all(torch.equal(a, b) for a, b in zip(kept, replayed))
    assert kept_stats.contributions == pytest.approx(replayed_stats.contributions, rel=1e-12, abs=0)
    assert kept_stats.hvp_count == replayed_stats.hvp_count == 5 and kept_stats.rounds == replayed_stats.rounds == 5


@pytest.mark.parametrize("kept_steps", [None, 2], ids=["all kept", "two kept"])
def test_a_chain_takes_the_mixed_terms_of_a_body_in_its_backward(monkeypatch, kept_steps):
    """ANIL's form with Exact: the head's kept steps are chained although the body's features take mixed terms, and
    one backward through the chain takes every adjoint and the body's mixed terms, as unrolled autograd does. Where
    only some steps keep their graphs no chain runs, and the chained graphs' mixed terms are replayed (a backward
    from a chained graph would reach the steps before it and count their terms again). Both equal unrolled autograd."""
    from binom_opt.core import recorder

    from cases import BodyHead

    if kept_steps is not None:
        monkeypatch.setattr(recorder.InnerLoop, "_fits", lambda self, sizes: len(self._graphs) < kept_steps)
    chains = _chain_spy(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(9, 4, generator=gen, dtype=torch.float64)
    ys, yq = torch.arange(6) % 3, torch.arange(9) % 3
    torch.manual_seed(0)
    model = BodyHead().double()
    linear = lambda p, f: F.linear(f, p["head.weight"], p["head.bias"])

    def engine_step():
        model.zero_grad(set_to_none=True)
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=0.5), 4, bo.Exact())
        features = model.body(xs)
        learner = engine.adapt(lambda m: F.cross_entropy(linear(m.params, features), ys))
        F.cross_entropy(linear(learner.params, model.body(xq)), yq).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    engine_step()  # the support loss measured at step 0, which keeps no graph
    chains.clear()
    got = engine_step()
    assert chains == ([4] if kept_steps is None else [])
    model.zero_grad(set_to_none=True)
    features, phi = model.body(xs), {n: p for n, p in model.named_parameters() if n.startswith("head.")}
    for _ in range(4):
        grads = torch.autograd.grad(F.cross_entropy(linear(phi, features), ys), list(phi.values()), create_graph=True)
        phi = {n: p - 0.5 * g for (n, p), g in zip(phi.items(), grads)}
    F.cross_entropy(linear(phi, model.body(xq)), yq).backward()
    assert model.body[0].weight.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-12, atol=1e-14)


def test_other_estimators_read_a_chained_loop_graph_by_graph(monkeypatch):
    """Several estimators on one recorded loop (meta_gradients) keep Exact's chained graphs; a binomial round then
    takes one backward per graph (in one backward a chained graph's product would also reach the graphs before it),
    and every estimator gets the meta-gradient of the replayed steps."""
    from binom_opt.functional import meta_gradients

    chains = _chain_spy(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)
    loss = lambda p: (torch.tanh(x @ p["w"] + p["b"]) - y).pow(2).mean()
    params = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    estimators = [bo.Binomial(2), bo.Truncated(2), bo.Exact()]
    meta_gradients(loss, loss, params, steps=4, lr=0.3, estimators=estimators)  # measures the support loss at step 0
    chains.clear()
    kept = meta_gradients(loss, loss, params, steps=4, lr=0.3, estimators=estimators)
    assert chains == [4]  # Exact's, the last estimator's
    replayed = meta_gradients(loss, loss, params, steps=4, lr=0.3, estimators=estimators, memory_budget=None)
    for estimator in estimators:
        for n in params:
            torch.testing.assert_close(kept[estimator][0][n], replayed[estimator][0][n], rtol=1e-12, atol=1e-15)


def test_a_meta_parameter_found_after_a_chain_ends_it_and_gets_its_meta_gradient(monkeypatch):
    """A closure met at a later step may reach another meta-parameter (a loss weight here): the steps from there on
    are not chained, their mixed terms come from their graphs, and the meta-gradients are those of the replayed steps."""
    chains = _chain_spy(monkeypatch)
    case = mlp_sine()
    weight = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    weighted = lambda m: weight * case.support(m)

    def run(**options):
        case.model.zero_grad(set_to_none=True)
        weight.grad = None
        learner = bo.MAML(case.model, lr=0.1, **options).clone()
        for k in range(5):
            learner.adapt(case.support if k < 2 else weighted)
        assert [t is weight for t in learner._loop._meta_inputs.values()] == [True]  # the chain's leaves are none
        case.query(learner).backward()
        return [p.grad.clone() for p in case.model.parameters()] + [weight.grad.clone()]

    run()
    kept, replayed = run(), run(memory_budget=None)
    assert not chains  # steps 2.. are not chained: the adjoints come step by step
    assert kept[-1].abs() > 0
    for a, b in zip(kept, replayed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("task_dim", [False, True])
def test_products_add_a_first_vector_in_their_backward(task_dim):
    """``products(..., first=w)`` is ``w + H v`` for each graph (the sum the step-by-step exact expansion and the chain
    take), with the graphs' products otherwise as without it."""
    from binom_opt.core.trajectory import Graph, products

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    loss = lambda p, task: torch.tanh(x @ p["w"] + p["b"]).pow(3).sum()
    points = [{"w": torch.randn(3, 2, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen, dtype=torch.float64)}
              for _ in range(2)]
    graphs = [Graph.at(loss, point, None) for point in points]
    shaped = (lambda t: t.unsqueeze(0)) if task_dim else (lambda t: t)
    vectors = [{n: shaped(torch.randn(t.shape, generator=gen, dtype=torch.float64)) for n, t in point.items()} for point in points]
    first = [{n: shaped(torch.randn(t.shape, generator=gen, dtype=torch.float64)) for n, t in point.items()} for point in points]
    plain = products(graphs, vectors, task_dim)
    added = products(graphs, vectors, task_dim, first)
    for p, a, w in zip(plain, added, first):
        for n in p:
            assert a[n].shape == p[n].shape == w[n].shape
            torch.testing.assert_close(a[n], w[n] + p[n], rtol=1e-14, atol=1e-15)


def test_kept_steps_are_together_whatever_random_state_they_recorded():
    """A kept step records the random state it started from whether or not it drew, so two kept steps' contexts differ;
    no call replays them, and they stay one group (one backward of the mixed terms). Steps replayed from distinct
    random states are not."""
    from types import SimpleNamespace

    from binom_opt.core.context import RandomState, StepContext
    from binom_opt.core.trajectory import Stored, Trajectory

    contexts = [StepContext.now(["cpu"], RandomState.capture([])) for _ in range(3)]
    loss = lambda phi, task: phi["w"].sum()
    point = Stored({"w": torch.zeros(1, 2)})
    trajectory = Trajectory([point] * 3, [loss] * 3, torch.zeros(3, 1), point, SimpleNamespace(contexts=contexts),
                            graphs={1: object(), 2: object()})  # pyright: ignore[reportArgumentType]  # only their keys are read
    assert trajectory.together(1, 2) and not trajectory.together(0, 1)
    assert trajectory.runs(0, 3) == [(0, 1, loss), (1, 3, loss)]
