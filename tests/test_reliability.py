"""The failure-mode table of README.md, one test per row: the right result, or a clear error before any change."""

import sys

import higher
import pytest
import references as R
import torch
import torch.nn.functional as F
from cases import conv_bn, frozen_body, mlp_sine
from torch import nn

import binom_opt as bo
import binom_opt.core.batching as hvp_module

TOL = 1e-10


def adapt_and_backward(case, estimator=bo.Exact(), steps=3, **options):
    case.model.zero_grad(set_to_none=True)
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps, estimator, **options)
    engine.meta_backward(case.query(engine.adapt(case.support)))
    return engine, {n: p.grad.clone() for n, p in case.model.named_parameters()}


def warmed_up_batchnorm_case():
    case = conv_bn(track_running_stats=True)
    with torch.no_grad():  # running statistics away from their (0, 1) initialisation
        for _ in range(3):
            case.model(2 + 3 * torch.randn(16, 1, 6, 6, dtype=torch.float64))
    return case


def test_frozen_batchnorm_uses_running_statistics_exactly_like_higher_in_eval_mode():
    case = warmed_up_batchnorm_case()
    buffers = {n: b.clone() for n, b in case.model.named_buffers()}
    _, got = adapt_and_backward(case, bn="frozen")
    assert all(torch.equal(b, buffers[n]) for n, b in case.model.named_buffers())  # not updated
    reference = warmed_up_batchnorm_case()
    reference.model[1].eval()
    expected = R.unrolled_higher(reference.model, reference.inner_opt(), reference.support, reference.query, 3)
    assert R.relative_error(got, expected) < TOL
    _, transductive = adapt_and_backward(warmed_up_batchnorm_case())
    assert R.relative_error(transductive, expected) > 1e-3  # the policies really differ


def test_batchnorm_error_policy_refuses_tracking_layers_and_accepts_others():
    case = conv_bn(track_running_stats=True)
    with pytest.raises(ValueError, match="bn='error'.*track running statistics.*bn='transductive'"):
        bo.MetaGradientEngine(case.model, case.inner_opt(), 2, bn="error")
    adapt_and_backward(conv_bn(track_running_stats=False), bn="error")


def test_outer_loss_that_ignores_the_learner_is_refused():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2)
    engine.adapt(case.support)
    with pytest.raises(ValueError, match="does not depend on an adapted learner"):
        engine.meta_backward(case.query(case.model))
    assert all(p.grad is None for p in case.model.parameters())


def test_complex_or_integer_parameters_cannot_adapt():
    model = nn.Linear(2, 2)
    model.z = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="dtype torch.complex64.*real floating-point"):
        bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    with pytest.raises(RuntimeError):  # torch itself refuses integer tensors that require grad
        nn.Parameter(torch.zeros(2, dtype=torch.int64))


def test_data_of_another_dtype_fails_at_the_first_step_with_context():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2)
    x = torch.randn(5, 1)  # float32 data for a float64 model
    with pytest.raises(RuntimeError) as error:
        engine.adapt(lambda m: (m(x) ** 2).mean())
    if sys.version_info >= (3, 11):
        assert "share one dtype and one device" in "\n".join(error.value.__notes__)
    assert all(p.grad is None for p in case.model.parameters())


def test_empty_support_set_is_a_clear_error():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2)
    x = torch.zeros(0, 1, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="inner loss is nan at inner step 0"):
        engine.adapt(lambda m: ((m(x) - 1) ** 2).mean())


def test_backward_twice_through_one_adaptation_is_refused_by_autograd():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 2)
    loss = case.query(engine.adapt(case.support))
    engine.meta_backward(loss)
    with pytest.raises(RuntimeError, match="second time"):
        engine.meta_backward(loss)


def test_model_in_eval_mode_still_adapts_and_dropout_is_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, bo.Exact())
    engine.meta_backward(F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(x), y))(x), y))
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (f, opt):
        for _ in range(3):
            opt.step(F.cross_entropy(f(x), y))
        expected = torch.autograd.grad(F.cross_entropy(f(x), y), list(model.parameters()))
    got = [p.grad for p in model.parameters()]
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(got, expected))


class InPlaceScratch(nn.Module):
    """Writes batch data into a buffer in place: fine eagerly, impossible under vmap."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).double()
        self.register_buffer("scratch", torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        self.scratch.copy_(x.mean(0))
        return self.linear(x)


def test_in_place_state_changes_in_the_model_fail_with_context():
    model = InPlaceScratch()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, bo.Binomial(1))
    with pytest.raises(RuntimeError, match=r"InPlaceScratch wrote its buffer\(s\) \['scratch'\].*eval mode") as error:
        engine.adapt(lambda m: F.cross_entropy(m(x), y))
    if sys.version_info >= (3, 11):
        assert "inner step 0" in "\n".join(error.value.__notes__)
    assert all(p.grad is None for p in model.parameters())


def test_out_of_memory_in_a_batched_round_retries_with_smaller_chunks(monkeypatch):
    real_vmap = hvp_module.vmap

    def vmap_that_fits_one_at_a_time(fn, chunk_size=None, **kwargs):
        batched = real_vmap(fn, chunk_size=chunk_size, **kwargs)

        def call(points, vectors):
            if chunk_size is None or chunk_size > 1:
                raise torch.OutOfMemoryError("injected: out of memory")
            return batched(points, vectors)

        return call

    expected = adapt_and_backward(mlp_sine(), bo.Binomial(2), steps=5)[1]
    monkeypatch.setattr(hvp_module, "vmap", vmap_that_fits_one_at_a_time)
    engine, got = adapt_and_backward(mlp_sine(), bo.Binomial(2), steps=5)
    assert R.relative_error(got, expected) < 1e-14
    assert engine.last_stats.chunk_fallbacks == [2, 1]


def nan_gradient_query(case):
    """A finite query loss whose gradient is NaN (sqrt at 0)."""
    return lambda m: case.query(m) + torch.sqrt((0 * case.query(m)).clamp_min(0))


def test_non_finite_meta_gradient_raises_by_default_naming_where():
    case = frozen_body()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 3, bo.Binomial(2))
    loss = nan_gradient_query(case)(engine.adapt(case.support))
    assert torch.isfinite(loss)
    with pytest.raises(FloatingPointError, match="not finite"):
        engine.meta_backward(loss)


def test_skip_task_zeroes_the_task_and_records_it():
    case = frozen_body()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 3, bo.Binomial(2), nan_policy="skip_task")
    good = case.query(engine.adapt(case.support))
    bad = nan_gradient_query(case)(engine.adapt(case.support))
    engine.meta_backward(bad)
    assert engine.last_stats.skipped and engine.skipped_losses == 1
    assert all(p.grad is None for p in case.model.parameters())  # nothing reached .grad, not even the body
    engine.meta_backward(good)
    assert not engine.last_stats.skipped
    expected = {n: p.grad.clone() for n, p in case.model.named_parameters()}
    engine.meta_backward(case.query(engine.adapt(case.support)) * float("nan"))
    assert engine.skipped_losses == 2
    assert R.relative_error({n: p.grad for n, p in case.model.named_parameters()}, expected) == 0
    reference = frozen_body()
    plain = bo.MetaGradientEngine(reference.model, reference.inner_opt(), 3, bo.Binomial(2))
    plain.meta_backward(reference.query(plain.adapt(reference.support)))
    assert R.relative_error(expected, {n: p.grad for n, p in reference.model.named_parameters()}) < 1e-14
    with pytest.raises(ValueError, match="nan_policy"):
        bo.MetaGradientEngine(case.model, case.inner_opt(), 3, nan_policy="ignore")


@pytest.mark.parametrize("estimator", [bo.Binomial(2), bo.Exact()])
def test_meta_gradients_are_bitwise_reproducible_on_cpu(estimator):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
        x, y = torch.randn(5, 1, 6, 6), torch.arange(5)
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 4, estimator)
        engine.meta_backward(F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(x), y))(x), y))
        runs.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("estimator", [bo.Binomial(1), bo.Binomial(2), bo.Hybrid(1, 2), bo.Exact()])
def test_randomness_same_is_the_brute_force_expansion_of_the_masked_loss(estimator):
    """Dropout active; randomness='same' replays each task's masks, batched HVP rounds included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(1)
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


def test_non_finite_inner_gradient_is_named_at_its_step():
    case = mlp_sine()
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), 3)
    x = torch.zeros(4, 1, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"inner gradient of .* not finite at inner step 0"):
        engine.adapt(lambda m: torch.sqrt(((m(x) - m(x).detach()) ** 2).sum()))
