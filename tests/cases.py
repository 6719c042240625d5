"""Small float64 meta-learning problems shared by the tests: model, adapted parameters, losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the device the tests run on (``pytest --device``)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


@dataclass
class Case:
    name: str
    model: nn.Module
    lrs: Dict[str, float]  # adapted parameter name -> inner learning rate
    support: Callable  # learner -> support loss
    query: Callable  # learner -> query loss

    @property
    def adapted(self) -> List[str]:
        return list(self.lrs)

    def inner_opt(self) -> torch.optim.SGD:
        params = dict(self.model.named_parameters())
        groups: Dict[float, list] = {}
        for name, lr in self.lrs.items():
            groups.setdefault(lr, []).append(params[name])
        return torch.optim.SGD([{"params": ps, "lr": lr} for lr, ps in groups.items()], lr=0.0)


def mlp_sine(seed: int = 0, hidden: int = 10) -> Case:
    """Sine regression with a tanh MLP; two parameter groups with different step sizes."""
    gen = generator(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    amp, phase = 0.1 + 4.9 * torch.rand(1, generator=gen, dtype=torch.float64), torch.pi * torch.rand(1, generator=gen, dtype=torch.float64)
    xs = 10 * torch.rand(10, 1, generator=gen, dtype=torch.float64) - 5
    xq = 10 * torch.rand(10, 1, generator=gen, dtype=torch.float64) - 5
    f = lambda x: amp * torch.sin(x + phase)
    lrs = {n: (0.02 if n.startswith("4.") else 0.01) for n, _ in model.named_parameters()}
    return Case(
        "mlp_sine",
        model,
        lrs,
        support=lambda m: ((m(xs) - f(xs)) ** 2).mean(),
        query=lambda m: F.mse_loss(m(xq), f(xq)),
    )


def conv_bn(seed: int = 0, track_running_stats: bool = False) -> Case:
    """A tiny conv net with BatchNorm on 3-way classification of 6x6 images."""
    gen = generator(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(27, 3),
    ).double()
    xs, xq = (torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64) for n in (6, 9))
    ys, yq = torch.arange(6) % 3, torch.arange(9) % 3
    return Case(
        "conv_bn",
        model,
        {n: 0.2 for n, _ in model.named_parameters()},
        support=lambda m: F.cross_entropy(m(xs), ys),
        query=lambda m: F.cross_entropy(m(xq), yq),
    )


class BodyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


def frozen_body(seed: int = 0) -> Case:
    """ANIL-style: the head adapts, the body is meta-learned through the support features."""
    gen = generator(seed)
    torch.manual_seed(seed)
    model = BodyHead().double()
    xs, xq = (torch.randn(n, 4, generator=gen, dtype=torch.float64) for n in (6, 9))
    ys, yq = torch.arange(6) % 3, torch.arange(9) % 3
    return Case(
        "frozen_body",
        model,
        {"head.weight": 0.5, "head.bias": 0.5},
        support=lambda m: F.cross_entropy(m(xs), ys),
        query=lambda m: F.cross_entropy(m(xq), yq),
    )


CASES = {"mlp_sine": mlp_sine, "conv_bn": conv_bn, "frozen_body": frozen_body}


# --- small models and meta-batches shared by the tests ----------------------------------------


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def tasks(count=2, seed=1):
    gen = generator(seed)
    out = []
    for _ in range(count):
        xs, xq = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(9, 4, generator=gen, dtype=torch.float64)
        out.append((xs, torch.arange(6) % 3, xq, torch.arange(9) % 3))
    return out


def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def image_tasks(seed=0, B=3):
    gen = generator(seed)
    xs, xq = (torch.randn(B, n, 1, 6, 6, generator=gen, dtype=torch.float64) for n in (6, 9))
    return xs, (torch.arange(6) % 3).repeat(B, 1), xq, (torch.arange(9) % 3).repeat(B, 1)


def body_head_tasks(seed=1, B=3):
    gen = generator(seed)
    xs, xq = (torch.randn(B, n, 4, generator=gen, dtype=torch.float64) for n in (6, 9))
    return xs, (torch.arange(6) % 3).repeat(B, 1), xq, (torch.arange(9) % 3).repeat(B, 1)


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def adapt_and_backward(case, estimator=bo.Exact(), steps=3, **options):
    case.model.zero_grad(set_to_none=True)
    engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps, estimator, **options)
    engine.meta_backward(case.query(engine.adapt(case.support)))
    return engine, {n: p.grad.clone() for n, p in case.model.named_parameters()}


def sine_engine(estimator=None, steps=3):
    """An engine on the sine case (Binomial(1) unless told), and the case."""
    case = mlp_sine()
    return bo.MetaGradientEngine(case.model, case.inner_opt(), steps=steps, estimator=estimator or bo.Binomial(1)), case
