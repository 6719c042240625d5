"""Small float64 meta-learning problems shared by the tests: model, adapted parameters, losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn


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
    gen = torch.Generator().manual_seed(seed)
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
    gen = torch.Generator().manual_seed(seed)
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
    gen = torch.Generator().manual_seed(seed)
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
