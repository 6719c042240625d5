"""Memory control: budgets parse, one HVP's activations are measured, budgets pick the chunking."""

import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo
from binom_opt.core.memory import ActivationBytes, Chunking, activation_bytes, parse_memory_budget

import references as R
from cases import conv_bn, mlp_sine


@pytest.mark.parametrize(
    "budget, expected", [(None, None), (1, 1), ("3kB", 3000), ("2 MiB", 2 * 2**20), ("0.5GiB", 2**29), ("12b", 12)]
)
def test_budgets_parse(budget, expected):
    assert parse_memory_budget(budget) == expected


@pytest.mark.parametrize("budget", [0, -5, True, 1.5, "lots", "1 TB", "", "GiB"])
def test_bad_budgets_are_refused_with_the_fix(budget):
    with pytest.raises(ValueError, match="memory_budget"):
        parse_memory_budget(budget)
    model = conv_bn().model
    with pytest.raises(ValueError, match="memory_budget"):
        bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, memory_budget=budget)


def test_activation_bytes_grow_with_the_batch_and_leave_out_the_point():
    model = conv_bn().model
    point = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(40, 1, 6, 6, dtype=torch.float64)
    y = torch.arange(40) % 3

    def loss(n):
        return lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x[:n],)), y[:n])

    small, large = activation_bytes(loss(10), point), activation_bytes(loss(40), point)
    # activations of 10 images: conv output + BatchNorm + ReLU + pool, each 10 x 3 x 6 x 6 doubles at least
    assert small.gradient >= 10 * 3 * 36 * 8
    assert 3 < large.gradient / small.gradient < 5 and 3 < large.hvp / small.hvp < 5
    assert 1.3 < small.hvp / small.gradient < 4  # the double backward saves about as much again
    quadratic = activation_bytes(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(10**6)})
    assert quadratic.gradient == 1  # w ** 2 saves only w, the point itself, which is not counted


def test_chunking_combines_cap_budget_and_fallbacks():
    sizes = ActivationBytes(gradient=100, hvp=300)
    chunking = Chunking(chunk_size=8, memory_budget=1000)
    assert chunking.limit(lambda: sizes) == 3 and chunking.per_hvp_bytes == 300
    assert Chunking(chunk_size=2, memory_budget=10**9).limit(lambda: sizes) == 2
    assert Chunking(memory_budget=10).limit(lambda: sizes) == 1  # never below one HVP at once
    assert Chunking(memory_budget="inner_step", inner_batch=32).limit(lambda: sizes) == 10  # 32 x 100 // 300
    calls = []

    def call(limit):
        calls.append(limit)
        if limit is None or limit > 2:
            raise torch.OutOfMemoryError("injected")
        return limit

    chunking = Chunking()
    assert chunking.run(10, lambda: sizes, call) == 2
    assert calls == [None, 5, 2] and chunking.fallbacks == [5, 2] and chunking.used == 2


@pytest.mark.parametrize("budget", [1, "20kB", "1GiB", "inner_step"])
def test_per_task_budget_equals_unbudgeted(budget):
    def run(**options):
        case = mlp_sine()
        engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=6, estimator=bo.Binomial(2), **options)
        case.query(engine.adapt(case.support)).backward()
        return {n: p.grad for n, p in case.model.named_parameters()}, engine.last_stats

    expected, whole = run(memory_budget=None)  # a round at once ("auto" takes one task's points one by one)
    got, stats = run(memory_budget=budget)
    assert R.relative_error(got, expected) < 1e-13
    assert whole.hvps_at_once == 5 and stats.per_hvp_bytes > 0
    if budget == "inner_step":  # one task's gradient activations hold less than one HVP's
        assert stats.hvps_at_once == 1
    else:
        assert stats.hvps_at_once == min(5, max(1, parse_memory_budget(budget) // stats.per_hvp_bytes))


def test_sequential_estimators_take_one_hvp_at_once_whatever_k():
    case = mlp_sine()
    for steps in (2, 8):
        engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=steps, estimator=bo.Exact(), memory_budget=1)
        case.query(engine.adapt(case.support)).backward()
        assert engine.last_stats.hvp_count == steps and engine.last_stats.hvps_at_once == 1


def test_auto_budget_is_a_quarter_of_free_cuda_memory_capped(monkeypatch):
    from binom_opt.core import memory

    free = {"bytes": 8 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    cuda = torch.device("cuda", 0)
    assert memory.auto_budget(cuda) == memory.AUTO_CUDA_CAP == 512 * 2**20  # 2 GiB free / 4 would be more: capped
    free["bytes"] = 1 * 2**30
    assert memory.auto_budget(cuda) == 256 * 2**20  # a quarter of what is free
    assert memory.auto_budget(torch.device("cpu")) == memory.AUTO_CPU_CAP == 64 * 2**20  # off CUDA: a fixed cap
    sizes = ActivationBytes(gradient=10 * 2**20, hvp=30 * 2**20)
    assert Chunking(memory_budget="auto", device=cuda).limit(lambda: sizes) == 256 // 30  # HVPs that fit in the budget
    assert Chunking(memory_budget="auto", device=torch.device("cpu")).limit(lambda: sizes) == 64 // 30
    assert bo.Options().memory_budget == "auto"


def test_auto_on_the_cpu_caps_a_round_by_its_measured_activations():
    """Off CUDA, "auto" runs as many HVPs of a round (and mixed terms of other meta-parameters) at once as fit in
    AUTO_CPU_CAP of measured activations: a large model's (a ResNet-12, a LoRA base) one at a time, a small one's
    (an MLP, an ANIL head) a whole round."""
    from binom_opt.core.memory import AUTO_CPU_CAP

    measured = []

    def measure(hvp_bytes):
        return lambda: measured.append(hvp_bytes) or ActivationBytes(gradient=hvp_bytes // 2, hvp=hvp_bytes)

    cpu = Chunking(memory_budget="auto", device=torch.device("cpu"))
    assert cpu.limit(measure(250 * 2**20)) == 1
    assert Chunking(memory_budget="auto").limit(measure(4096)) == AUTO_CPU_CAP // 4096
    assert Chunking(memory_budget=None).limit(measure(1)) is None and len(measured) == 2  # everything at once when asked
    assert Chunking(memory_budget="1MiB").limit(measure(2**19)) == 2  # an explicit budget is the budget
    assert measured == [250 * 2**20, 4096, 2**19]


def test_a_task_takes_its_round_one_hvp_at_a_time_and_a_vmapped_meta_batch_as_many_as_fit(monkeypatch):
    """Under the default options one task's round runs its points one by one (one HVP's activations at a time, the
    computation a kept graph's product is), and a vmapped meta-batch's round as many HVPs as fit in AUTO_CPU_CAP (a
    cap of 1 byte stands for a meta-batch larger than it): the meta-gradient of the whole round at once, to rounding."""
    from binom_opt.core import memory

    def run(batched, **options):
        case = mlp_sine()
        engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=6, estimator=bo.Binomial(2), **options)
        if batched:
            x = torch.randn(3, 5, 1, dtype=torch.float64)
            learners = engine.adapt_batch(lambda m, t: F.mse_loss(m(t), t.sin()), x)
            assert not learners.loop
            F.mse_loss(learners(x), x.sin()).backward()
        else:
            case.query(engine.adapt(case.support)).backward()
        return {n: p.grad for n, p in case.model.named_parameters()}, engine.last_stats

    for batched, at_once in ((False, 5), (True, 15)):
        expected, whole = run(batched, memory_budget=None)
        got, stats = run(batched)
        assert whole.hvps_at_once == at_once and stats.hvps_at_once == (1 if not batched else at_once)
        assert R.relative_error(got, expected) < 1e-13
    monkeypatch.setattr(memory, "AUTO_CPU_CAP", 1)
    monkeypatch.setattr(memory, "_MEASURED", {})
    got, stats = run(True)
    assert stats.hvps_at_once == 1 and R.relative_error(got, expected) < 1e-13


def test_the_activations_of_a_support_loss_are_measured_once_per_shapes(monkeypatch):
    """The probe behind a round's cap (a forward and two backwards) runs once per closure and data shapes, not once per
    meta-gradient: the next task's loop reuses it, other shapes measure again."""
    from binom_opt.core import memory, oracle

    monkeypatch.setattr(memory, "_MEASURED", {})
    probes = []
    measure = oracle.activation_bytes  # every measurement of a support loss goes through oracle.support_activations
    monkeypatch.setattr(oracle, "activation_bytes", lambda *a: probes.append(1) or measure(*a))
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    maml = bo.MAML(model, lr=0.01, estimator=bo.Binomial(1))
    for points in (10, 10, 10, 7):
        x = torch.randn(points, 1, dtype=torch.float64)
        learner = maml.clone()
        for _ in range(3):
            learner.adapt(lambda m: F.mse_loss(m(x), x.sin()))
        F.mse_loss(learner(x), x.sin()).backward()
    assert len(probes) == 2  # the first task, then the first of other shapes
