"""Lifting over steps and tasks: random ops under each randomness setting."""


import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo
from binom_opt.core.batching import Tasks, map_points, over_tasks

import references as R
from cases import body_head_tasks, dropout_model, generator, grads, tasks

TOL = 1e-10
STEPS, B, K, LR = 3, 3, 4, 0.1


def test_dropout_in_the_support_loss_is_a_clear_error_under_randomness_error():
    (xs, ys, xq, yq), = tasks(1)
    model = dropout_model()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, bo.Binomial(1), randomness="error")
    learner = engine.adapt(lambda m: F.cross_entropy(m(xs), ys))
    with pytest.raises(RuntimeError, match="randomness='error' (refuses|does not replay)"):
        F.cross_entropy(learner(xq), yq).backward()


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_randomness_is_forwarded_to_vmap(randomness):
    (xs, ys, xq, yq), = tasks(1)
    model = dropout_model()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, bo.Binomial(1), randomness=randomness)
    F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))(xq), yq).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="randomness must be one of"):
        bo.MAML(model, lr=0.1, randomness="fresh")


def test_randomness_same_replays_the_dropout_masks_exactly_like_higher_with_fixed_masks():
    """randomness='same': one random stream per task, so at L=K the meta-gradient is exact."""
    (xs, ys, xq, yq), = tasks(1)
    results = []
    for use_higher in (True, False):
        model = dropout_model()
        torch.manual_seed(5)
        if use_higher:
            state = torch.get_rng_state()

            def masked(f, x):
                with torch.random.fork_rng():
                    torch.set_rng_state(state)
                    return f(x)

            with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (f, opt):
                for _ in range(STEPS):
                    opt.step(F.cross_entropy(masked(f, xs), ys))
                F.cross_entropy(f(xq), yq).backward()
        else:
            engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), STEPS, bo.Binomial(STEPS), randomness="same")
            F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))(xq), yq).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert R.relative_error(results[1], results[0]) < TOL


@pytest.mark.parametrize("estimator", [bo.Binomial(1), bo.Binomial(2), bo.Hybrid(1, 2), bo.Exact()])
def test_randomness_same_is_the_brute_force_expansion_of_the_masked_loss(estimator):
    """Dropout active; randomness='same' replays each task's masks, batched HVP rounds included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    gen = generator(1)
    xs, xq = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(9, 4, generator=gen, dtype=torch.float64)
    ys, yq = torch.arange(6) % 3, torch.arange(9) % 3
    torch.manual_seed(5)
    support_state = torch.get_rng_state()
    torch.manual_seed(7)
    query_state = torch.get_rng_state()

    def with_state(state, fn):
        with torch.random.fork_rng():
            torch.set_rng_state(state)
            return fn()

    query = lambda m: with_state(query_state, lambda: F.cross_entropy(m(xq), yq))
    support = lambda m: with_state(support_state, lambda: F.cross_entropy(m(xs), ys))
    names = [n for n, _ in model.named_parameters()]
    unrolled = R.unroll(model, names, dict.fromkeys(names, 0.1), support, query, 3)
    torch.set_rng_state(support_state)  # the engine records the state at its first step
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, estimator, randomness="same")
    query(engine.adapt(lambda m: F.cross_entropy(m(xs), ys))).backward()
    expected = R.unflatten(R.brute_force(unrolled, estimator, 3)[0], dict(model.named_parameters()))
    assert R.relative_error({n: p.grad for n, p in model.named_parameters()}, expected) < TOL


def test_dropout_needs_a_randomness_choice_and_runs_with_different():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    xs, ys, xq, yq = body_head_tasks()
    closure = lambda m, t: F.cross_entropy(m(t[0]), t[1])
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K)
    with pytest.raises(RuntimeError, match="randomness='same'.*or 'different'"):
        engine.adapt_batch(closure, (xs, ys))
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), steps=K, randomness="different")
    learners = engine.adapt_batch(closure, (xs, ys))
    F.cross_entropy(learners(xq).flatten(0, 1), yq.flatten()).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


class RecurrentNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.filterwarnings("ignore:binom_opt. Batching rule not implemented:RuntimeWarning")
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_modules_without_a_batching_rule_run_in_a_loop_and_stay_exact(kind):
    """torch.func.vmap has no batching rule for LSTM and GRU: the tasks (and a round's points) then run one
    by one through the same functions, and the meta-gradient is still the unrolled one."""
    torch.manual_seed(0)
    model = RecurrentNet(kind).double()
    gen = generator(1)
    xs, xq = (torch.randn(3, n, 4, 3, generator=gen, dtype=torch.float64) for n in (6, 8))
    ys, yq = (torch.arange(6) % 2).repeat(3, 1), (torch.arange(8) % 2).repeat(3, 1)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), K, bo.Binomial(K))
    out = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (xs, ys))(xq)
    sum(F.cross_entropy(out[b], yq[b]) for b in range(3)).backward()
    got = grads(model)
    names = [n for n, _ in model.named_parameters()]
    expected = {n: 0 for n in names}
    for b in range(3):
        one = R.unrolled_autograd(model, names, dict.fromkeys(names, 0.1), lambda m, b=b: F.cross_entropy(m(xs[b]), ys[b]),
                                  lambda m, b=b: F.cross_entropy(m(xq[b]), yq[b]), K)
        expected = {n: expected[n] + one[n] for n in names}
    assert R.relative_error(got, expected) < TOL


def test_a_loop_cannot_replay_randomness_same():
    model = RecurrentNet(nn.LSTM).double()
    x, y = torch.randn(2, 6, 4, 3, dtype=torch.float64), (torch.arange(6) % 2).repeat(2, 1)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, randomness="same")
    learners = engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), (x, y))  # the inner steps batch fine
    with pytest.raises(RuntimeError, match="randomness='same' cannot be replayed in a loop.*engine.adapt"):
        engine.meta_backward(learners(x).sum())  # the replays (forward only) have no batching rule
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("B", [1, 3])
def test_over_tasks_lifts_a_one_task_function(B):
    data = torch.randn(B, 4, dtype=torch.float64)
    tasks = Tasks(data) if B > 1 else Tasks()
    fn = (lambda w, task: (w * task).sum()) if B > 1 else (lambda w, task: w.sum())
    out = over_tasks(fn, tasks, "error")(torch.ones(B, 4, dtype=torch.float64))
    expected = data.sum(1) if B > 1 else torch.tensor([4.0], dtype=torch.float64)
    assert torch.equal(out, expected)
    points = torch.ones(5, B, 4, dtype=torch.float64)
    for limit in (None, 1, 2, 7):
        assert torch.equal(map_points(fn, (points,), tasks, "error", limit), expected.expand(5, B))
