"""The plan for a meta-batch's tasks (core/memory.py ``loops_over_tasks``): on the CPU ``memory_budget="auto"``
runs them one after another where their measured activations exceed ``AUTO_VMAP_TASKS_CAP`` and vmaps them below,
``None`` vmaps them together; both give the same meta-gradients."""

import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo
from binom_opt.core import memory
from binom_opt.core.batching import Tasks
from binom_opt.core.memory import loops_over_tasks
from binom_opt.functional import meta_gradient_batched

import references as R
from cases import conv_bn, grads, image_tasks

K, LR = 4, 0.1
ESTIMATORS = [bo.FirstOrder(), bo.Truncated(1), bo.Binomial(1), bo.Binomial(2), bo.Exact()]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def loop_plan(monkeypatch):
    """The test models are small enough for "auto" to vmap their tasks: a cap of no bytes makes it loop over them,
    the plan of large models, which most tests here check (tests of the cap itself set it back)."""
    monkeypatch.setattr(memory, "AUTO_VMAP_TASKS_CAP", -1)
    monkeypatch.setattr(memory, "_MEASURED", {})


@pytest.mark.parametrize("options, loop", [
    (bo.Options(), True),
    (bo.Options(memory_budget=None), False),
    (bo.Options(memory_budget="64MiB"), False),
    (bo.Options(memory_budget="inner_step"), False),
    (bo.Options(chunk_size=4), False),
    (bo.Options(compile_hvps=True), False),
    (bo.Options(randomness="same"), False),
    (bo.Options(randomness="different"), True),
])
def test_auto_loops_over_tasks_on_the_cpu_and_none_vmaps(options, loop):
    assert loops_over_tasks(options, CPU) is loop
    assert Tasks(torch.zeros(3, 2)).planned(options, CPU).loop is loop
    assert Tasks().planned(options, CPU).loop is False  # one task without data: nothing to loop over


def test_auto_vmaps_the_tasks_on_cuda():
    assert loops_over_tasks(bo.Options(), torch.device("cuda")) is False


def sine_engine(width, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.ReLU(), torch.nn.Linear(width, 1)).double()
    return model, bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.01), steps=3, **options)


@pytest.mark.parametrize("width, loop", [(40, False), (4000, True)])
def test_auto_on_the_cpu_vmaps_small_tasks_and_loops_over_large_ones(monkeypatch, width, loop):
    """The measured activations of one HVP of every task decide: a sine MLP's 25 tasks hold a fraction of a MiB (vmapped,
    several times faster there), a wide one's above the cap (a loop); measured once per support loss and shapes."""
    monkeypatch.setattr(memory, "AUTO_VMAP_TASKS_CAP", 2**20)
    measured = []
    activation_bytes = memory.activation_bytes
    monkeypatch.setattr(memory, "activation_bytes", lambda *a: measured.append(1) or activation_bytes(*a))
    _, engine = sine_engine(width)
    support = lambda m, t: F.mse_loss(m(t[0]), t[1])
    xs, ys = torch.randn(25, 10, 1, dtype=torch.float64), torch.randn(25, 10, 1, dtype=torch.float64)
    state = torch.get_rng_state()
    for _ in range(2):
        learners = engine.adapt_batch(support, (xs, ys))
        assert learners.loop is loop
        engine.meta_backward(F.mse_loss(learners(xs), ys))
    assert measured == [1]  # the second meta-batch reuses the measurement
    assert torch.equal(torch.get_rng_state(), state)
    engine.adapt_batch(support, (xs[:5, :4], ys[:5, :4]))  # other shapes: measured again
    assert measured == [1, 1]


def test_auto_on_the_cpu_gives_the_meta_gradient_of_either_plan(monkeypatch):
    monkeypatch.setattr(memory, "AUTO_VMAP_TASKS_CAP", 2**20)
    xs, ys = torch.randn(6, 10, 1, dtype=torch.float64), torch.randn(6, 10, 1, dtype=torch.float64)
    got = {}
    for budget in ("auto", None):
        model, engine = sine_engine(40, estimator=bo.Binomial(1), memory_budget=budget)
        learners = engine.adapt_batch(lambda m, t: F.mse_loss(m(t[0]), t[1]), (xs, ys))
        assert not learners.loop
        engine.meta_backward(F.mse_loss(learners(xs), ys))
        got[budget] = grads(model)
    for n in got[None]:
        assert torch.equal(got["auto"][n], got[None][n])  # the same plan: bitwise


def test_a_support_loss_that_draws_random_numbers_is_planned_as_a_loop(monkeypatch):
    """Measuring draws nothing from the caller's generators; a support loss that draws is planned as the loop over tasks,
    whose first inner step refuses it with the message that names the choices (as the vmapped plan would)."""
    monkeypatch.setattr(memory, "AUTO_VMAP_TASKS_CAP", 2**30)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)).double()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K)
    xs, ys = torch.randn(3, 6, 4, dtype=torch.float64), (torch.arange(6) % 3).repeat(3, 1)
    support = lambda m, t: F.cross_entropy(m(t[0]), t[1])
    assert memory.task_activations(engine._setups[True].make_loss(support), dict(model.named_parameters()), (xs, ys),
                                   "auto", "dropout") is None
    with pytest.raises(RuntimeError, match="vmapped tasks cannot draw the numbers a loop over tasks draws"):
        engine.adapt_batch(support, (xs, ys))


def adapt_batch(estimator, tasks, dtype=torch.float64, **options):
    """``(meta-gradient, learners)`` of one batched meta-step of the conv net with BatchNorm."""
    model = conv_bn().model.to(dtype)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K, estimator=estimator, **options)
    xs, ys, xq, yq = (t.to(dtype) if t.is_floating_point() else t for t in tasks)
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (xs, ys))
    engine.meta_backward(F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()))
    return grads(model), learners


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_the_cpu_plan_equals_the_vmapped_path_in_adapt_batch(estimator):
    tasks = image_tasks(B=3)
    looped, learners = adapt_batch(estimator, tasks)
    vmapped, at_once = adapt_batch(estimator, tasks, memory_budget=None)
    assert learners.loop and not at_once.loop
    assert R.relative_error(looped, vmapped) < 1e-10


def functional_case():
    case = conv_bn()
    params = {n: p.detach() for n, p in case.model.named_parameters()}
    xs, ys, xq, yq = image_tasks(B=3)

    def loss(kind):
        def one(p, task):
            x, y = (task[0], task[1]) if kind == "support" else (task[2], task[3])
            return F.cross_entropy(torch.func.functional_call(case.model, p, (x,)), y)
        return one

    return loss, params, (xs, ys, xq, yq)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_the_cpu_plan_equals_the_vmapped_path_in_meta_gradient_batched(estimator):
    loss, params, tasks = functional_case()
    looped = meta_gradient_batched(loss("support"), loss("query"), params, tasks, steps=K, lr=LR, estimator=estimator)
    vmapped = meta_gradient_batched(loss("support"), loss("query"), params, tasks, steps=K, lr=LR, estimator=estimator,
                                    memory_budget=None)
    assert R.relative_error(looped, vmapped) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("estimator", [bo.FirstOrder(), bo.Binomial(2), bo.Exact()], ids=repr)
def test_the_cpu_plan_is_bitwise_the_per_task_loop_and_any_split_of_the_batch(estimator, dtype):
    """Each task runs exactly as a task of its own: the meta-gradients of a split meta-batch, and of the
    tasks adapted one by one, are bitwise those of the whole meta-batch."""
    loss, params, tasks = functional_case()
    params = {n: t.to(dtype) for n, t in params.items()}
    tasks = tuple(t.to(dtype) if t.is_floating_point() else t for t in tasks)

    def batched(lo, hi):
        part = tuple(t[lo:hi] for t in tasks)
        return meta_gradient_batched(loss("support"), loss("query"), params, part, steps=K, lr=LR, estimator=estimator)

    whole = batched(0, 3)
    split = [batched(0, 1), batched(1, 3)]
    one_by_one = [bo.functional.meta_gradient(lambda p, b=b: loss("support")(p, tuple(t[b] for t in tasks)),
                                              lambda p, b=b: loss("query")(p, tuple(t[b] for t in tasks)), params,
                                              steps=K, lr=LR, estimator=estimator) for b in range(3)]
    for n in params:
        assert torch.equal(whole[n], torch.cat([s[n] for s in split]))
        assert torch.equal(whole[n], torch.stack([o[n] for o in one_by_one]))


def test_the_loop_refuses_random_ops_as_the_vmap_does():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)).double()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K)
    xs, ys = torch.randn(3, 6, 4, dtype=torch.float64), (torch.arange(6) % 3).repeat(3, 1)
    with pytest.raises(RuntimeError, match="vmapped tasks cannot draw the numbers a loop over tasks draws.*randomness='same'"):
        engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (xs, ys))


def test_adapt_batch_recomputes_every_query_but_the_last_and_differentiates_the_last_first():
    """The CPU plan checkpoints each task's query forward but the last one's: B forwards, then B - 1 recomputations
    in the backward, which differentiates the last task (whose graph was kept) before recomputing any other."""
    events = []

    class Mark(torch.autograd.Function):  # logs the backward of the hidden layer on a query (6 rows)
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x.view_as(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            if g.shape[0] == 6:
                events.append("backward")
            return g

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            if x.shape[0] == 6:
                events.append("forward")
            return self.b(Mark.apply(torch.tanh(self.a(x))))

    B, model = 3, Net().double()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=1)
    xs, ys = torch.randn(B, 5, 4, dtype=torch.float64), (torch.arange(5) % 3).repeat(B, 1)
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (xs, ys))
    assert learners.loop
    events.clear()
    out = learners(torch.randn(B, 6, 4, dtype=torch.float64))
    assert events == ["forward"] * B
    events.clear()
    out.sum().backward()
    assert events[:3] == ["backward", "forward", "backward"] and events.count("forward") == B - 1


def test_meta_gradient_batched_runs_each_task_whole_before_the_next(monkeypatch):
    """On the CPU plan each task's whole meta-gradient (inner loop, query loss, estimator) runs as a meta-batch of its
    own, one after another (one task's trajectory, query graph and HVP rounds at a time); the stats are those of the
    vmapped meta-batch."""
    loss, params, tasks = functional_case()
    calls = []
    one_call = bo.functional._one_call

    def spy(inner, outer, params, tasks, *args, **kwargs):
        calls.append((tasks.offset, tasks.size, tasks.loop))
        return one_call(inner, outer, params, tasks, *args, **kwargs)

    monkeypatch.setattr(bo.functional, "_one_call", spy)
    looped, stats = meta_gradient_batched(loss("support"), loss("query"), params, tasks, steps=K, lr=LR,
                                          estimator=bo.Binomial(2), return_stats=True)
    assert calls == [(0, 1, True), (1, 1, True), (2, 1, True)]
    vmapped, at_once = meta_gradient_batched(loss("support"), loss("query"), params, tasks, steps=K, lr=LR,
                                             estimator=bo.Binomial(2), return_stats=True, memory_budget=None)
    assert calls[3:] == [(0, 3, False)]
    assert R.relative_error(looped, vmapped) < 1e-10
    assert (stats.tasks, stats.hvp_count, stats.rounds, stats.diverging_tasks) == (
        at_once.tasks, at_once.hvp_count, at_once.rounds, at_once.diverging_tasks)
    for got, expected in [(stats.contributions, at_once.contributions), (stats.inner_losses, at_once.inner_losses),
                          ([stats.g_norm], [at_once.g_norm])]:
        assert got == pytest.approx(expected, rel=1e-10)


def test_the_cpu_plan_of_meta_gradient_batched_names_the_task_that_failed():
    loss, params, (xs, ys, xq, yq) = functional_case()
    xs = xs.clone()
    xs[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[2\]"):
        meta_gradient_batched(loss("support"), loss("query"), params, (xs, ys, xq, yq), steps=K, lr=LR)


def test_adapt_batch_takes_each_task_meta_gradient_whole_before_the_next(monkeypatch):
    """On the CPU plan the node's backward runs task by task, each as a meta-batch of its own (one task's adjoints
    and HVP rounds at a time), with one host read for them all; the engine's stats are those of the vmapped
    meta-batch."""
    from binom_opt.core.node import Record
    compute, calls = Record._compute, []

    def spy(self, g):
        calls.append((self.tasks.offset, self.tasks.size))
        return compute(self, g)

    monkeypatch.setattr(Record, "_compute", spy)
    tasks = image_tasks(B=3)
    model = conv_bn().model.double()
    xs, ys, xq, yq = (t.double() if t.is_floating_point() else t for t in tasks)
    stats = {}
    for budget in ("auto", None):
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K,
                                       estimator=bo.Binomial(2), memory_budget=budget)
        learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (xs, ys))
        engine.meta_backward(F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()))
        stats[budget] = engine.last_stats
    assert calls == [(0, 1), (1, 1), (2, 1), (0, 3)]
    looped, at_once = stats["auto"], stats[None]
    assert (looped.tasks, looped.hvp_count, looped.rounds) == (at_once.tasks, at_once.hvp_count, at_once.rounds)
    assert looped.contributions == pytest.approx(at_once.contributions, rel=1e-10)


@pytest.mark.parametrize("entry", ["adapt_batch", "meta_gradient_batched"])
def test_features_of_the_whole_meta_batch_are_differentiated_once(entry):
    """Features computed by a body for the whole meta-batch and passed in ``tasks``: the CPU plan cuts them at each
    task's slice and takes the body's backward once per meta-step (not once per task), with the meta-gradient
    of the vmapped meta-batch."""
    from cases import BodyHead, body_head_tasks

    def run(budget):
        torch.manual_seed(0)
        model = BodyHead().double()
        xs, ys, xq, yq = body_head_tasks(B=3)
        features = model.body(xs)
        reached = []
        features.register_hook(lambda g: reached.append(g))
        head = lambda p, f: F.linear(f, p["head.weight"], p["head.bias"])
        if entry == "adapt_batch":
            engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=0.5), steps=K,
                                           estimator=bo.Binomial(2), memory_budget=budget)
            learners = engine.adapt_batch(lambda m, t: F.cross_entropy(head(m.params, t[0]), t[1]), (features, ys))
            F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()).backward()
            return grads(model), len(reached)
        params = {n: p.detach() for n, p in model.head.named_parameters(prefix="head")}
        body = dict(model.body.named_parameters(prefix="body"))
        loss = lambda p, t: F.cross_entropy(head(p, t[0]), t[1])
        out = meta_gradient_batched(loss, lambda p, t: F.cross_entropy(head(p, t[2]), t[3]), params,
                                    (features, ys, model.body(xq), yq), steps=K, lr=0.5, estimator=bo.Binomial(2),
                                    meta_params=body, memory_budget=budget)
        return {n: g.sum(0) if n in params else g for n, g in out.items()}, len(reached)

    looped, once = run("auto")
    vmapped, _ = run(None)
    assert R.relative_error(looped, vmapped) < 1e-10
    assert once == 1
