"""The shortcuts of the per-call path give what the calls they replace give, bit for bit."""

import pytest
import torch

from binom_opt.core import backprop
from binom_opt.core.reductions import RoundNorms, norms, scaled_all


def hvp_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, generator=gen, dtype=dtype, requires_grad=True), torch.randn(4, generator=gen, dtype=dtype, requires_grad=True)
    x = torch.randn(6, 3, generator=gen, dtype=dtype)
    loss = torch.tanh(x @ w.T + b).pow(2).sum()
    return loss, [w, b], [torch.randn(4, 3, generator=gen, dtype=dtype), torch.randn(4, generator=gen, dtype=dtype)]


def test_engine_call_gives_torch_autograd_grad_bit_for_bit():
    loss, leaves, vectors = hvp_inputs(torch.float32)
    grads = backprop.grad([loss], leaves, create_graph=True)
    expected = torch.autograd.grad(loss, leaves, create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))
    got = backprop.grad(grads, leaves, vectors, retain_graph=True)
    want = torch.autograd.grad(expected, leaves, vectors, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_an_input_no_output_reaches_gives_none():
    loss, (w, b), _ = hvp_inputs()
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    grads = backprop.grad([loss], [w, unused, b])
    assert grads[1] is None and grads[0] is not None and grads[2] is not None


class Tagged(torch.Tensor):
    """A tensor subclass: ``__torch_function__`` must see the call, as ``torch.autograd.grad`` lets it."""


def test_tensor_subclasses_take_torch_autograd_grad(monkeypatch):
    w = torch.ones(3, dtype=torch.float64).as_subclass(Tagged).requires_grad_(True)
    loss = (w ** 3).sum()
    called = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: called.append(1) or real(*a, **k))
    (g,) = backprop.grad([loss], [w])
    assert called and torch.allclose(g, torch.full((3,), 3.0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaling_by_a_cached_tensor_is_the_python_scalar_product(dtype):
    tensors = [torch.randn(5, 7, dtype=dtype), torch.randn(3, dtype=dtype)]
    for factor in (-0.01, -0.4, 1 / 3):
        assert all(torch.equal(a, t * factor) for a, t in zip(scaled_all(tensors, factor), tensors))


def test_narrow_dtypes_scale_by_the_python_scalar():
    tensors = [torch.randn(4, dtype=torch.bfloat16)]
    assert torch.equal(scaled_all(tensors, -0.01)[0], tensors[0] * -0.01)


def test_round_norms_are_the_task_norms_of_each_round():
    gen = torch.Generator().manual_seed(1)
    rounds, vectors = RoundNorms(), []
    for _ in range(3):
        vector = {"a": torch.randn(2, 4, generator=gen), "b": torch.randn(2, 3, 3, generator=gen)}
        rounds.add(vector)
        vectors.append(vector)
    for got, vector in zip(rounds.rounds(), vectors):
        assert got.dtype == torch.float64
        each_task = torch.cat([t.flatten(1) for t in vector.values()], 1).double().norm(dim=1)  # over all entries
        torch.testing.assert_close(got, each_task, rtol=1e-6, atol=0)


def test_norms_of_half_precision_tensors_do_not_overflow():
    big = torch.full((1, 4), 60000.0, dtype=torch.float16)  # the squares overflow float16
    assert torch.isfinite(norms([big])).all() and norms([big]).dtype == torch.float64
