"""Benchmark settings (network, task shapes, inner loop, meta-batch) and the random data and model they build."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Dict, Tuple

import torch

from fewshot.models import RESNET12_WIDTHS, build_network


@dataclass(frozen=True)
class Config:
    """One benchmark setting: the network, the task shapes, the inner loop and the meta-batch."""

    name: str
    in_channels: int
    image_size: int
    hidden: int
    ways: int
    shots: int
    queries: int  # per class
    steps: int  # K
    lr: float
    meta_batch: int  # B
    levels: Tuple[int, ...]
    hybrid: Tuple[int, int]  # (L, C)
    repeats: int
    ks: Tuple[int, ...]  # K values of the memory-vs-K table
    network: str = "conv4"  # a network of fewshot.models.NETWORKS, or "mlp": input -> hidden -> hidden -> ways, ReLU

    def describe(self) -> str:
        side = f"{self.in_channels}x{self.image_size}x{self.image_size}"
        net = {"mlp": f"MLP {self.in_channels * self.image_size ** 2}-{self.hidden}-{self.hidden}-{self.ways}",
               "resnet12": "ResNet-12 " + "-".join(str(round(self.hidden * w)) for w in RESNET12_WIDTHS)}.get(
                   self.network, f"Conv4-{self.hidden}")
        return (
            f"{net} on {side}, {self.ways}-way {self.shots}-shot ({self.ways * self.shots} support), "
            f"{self.queries} queries per class ({self.ways * self.queries} query), K={self.steps} inner SGD steps "
            f"at lr {self.lr}, meta-batch B={self.meta_batch}"
        )


CONFIGS: Dict[str, Config] = {
    "omniglot": Config("omniglot", 1, 28, 64, 5, 1, 15, 5, 0.4, 32, (1, 2, 3), (1, 3), 3, (5, 10, 20)),
    "miniimagenet": Config("miniimagenet", 3, 84, 32, 5, 5, 15, 10, 0.01, 4, (1, 2, 3), (2, 5), 3, (5, 10, 20)),
    # the memory-vs-K table of a model whose parameters outweigh its activations (1.9M parameters)
    "mlp": Config("mlp", 1, 28, 1024, 5, 1, 15, 5, 0.1, 1, (1, 2), (1, 3), 3, (5, 25, 100, 1000), "mlp"),
    # the memory wall (memory_wall.py): 12.4M parameters, 5-way 5-shot with 5 queries per class, one task
    "resnet12": Config("resnet12", 3, 84, 64, 5, 5, 5, 1, 0.01, 1, (1, 2), (1, 2), 0, (1, 2, 3), "resnet12"),
    # for the smoke tests; not listed in --help
    "tiny": Config("tiny", 1, 28, 8, 5, 1, 3, 2, 0.4, 2, (1,), (1, 2), 1, ()),
    "resnet12-tiny": Config("resnet12-tiny", 3, 16, 4, 5, 5, 5, 1, 0.01, 1, (1, 2), (1, 2), 0, (1, 2), "resnet12"),
}

QUICK = {
    "omniglot": dict(meta_batch=4, hidden=32, repeats=2, levels=(1, 2), ks=(5, 10)),
    # 3x42x42 and Conv4-16: at 84x84 with Conv4-32 one Binomial meta-step alone takes about a
    # minute on a 2-core CPU, so the quick run keeps K, the task shapes and the methods, not the images
    "miniimagenet": dict(meta_batch=2, hidden=16, image_size=42, repeats=1, levels=(1, 2), ks=(5, 10)),
    "mlp": dict(repeats=1, ks=(5, 25, 100)),
    "resnet12": {},
    "tiny": {},
    "resnet12-tiny": {},
}


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = CONFIGS[args.config]
    if args.quick:
        cfg = replace(cfg, **QUICK[args.config])
    overrides = {"levels": args.levels, "repeats": args.repeats, "ks": args.ks}
    cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})
    bad = [L for L in cfg.levels if not 1 <= L <= cfg.steps]
    if bad:
        raise SystemExit(f"--levels {bad}: each L must be between 1 and K={cfg.steps}")
    return cfg



Batch = Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if cfg.network == "mlp":
        nn = torch.nn
        width = cfg.in_channels * cfg.image_size**2
        return nn.Sequential(nn.Flatten(), nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden),
                             nn.ReLU(), nn.Linear(cfg.hidden, cfg.ways)).to(device)
    model = build_network(cfg.network, in_channels=cfg.in_channels, out_features=cfg.ways, image_size=cfg.image_size,
                          hidden=cfg.hidden)
    return model.to(device)


def build_batch(cfg: Config, device: torch.device) -> Batch:
    """A meta-batch of random images: support [B, ways*shots, C, H, W], query [B, ways*queries, C, H, W]."""
    gen = torch.Generator().manual_seed(0)
    image = (cfg.in_channels, cfg.image_size, cfg.image_size)
    B, n_s, n_q = cfg.meta_batch, cfg.ways * cfg.shots, cfg.ways * cfg.queries
    xs, xq = torch.rand(B, n_s, *image, generator=gen), torch.rand(B, n_q, *image, generator=gen)
    ys, yq = torch.arange(n_s).remainder(cfg.ways).repeat(B, 1), torch.arange(n_q).remainder(cfg.ways).repeat(B, 1)
    return (xs.to(device), ys.to(device)), (xq.to(device), yq.to(device))


# Each make_*_step returns a function that runs one meta-step and returns its HVP count (None
