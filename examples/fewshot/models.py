"""Conv4, the few-shot image classifier of MAML (Finn et al., 2017; after Vinyals et al., 2016)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv4"]


class Conv4(nn.Module):
    """Four blocks of conv3x3 (padding 1) -> BatchNorm2d -> ReLU -> MaxPool2d(2), then a linear head.

    `features` (an ``nn.Sequential`` ending in ``nn.Flatten``) maps images to feature vectors and
    `head` (an ``nn.Linear``) maps those to logits, so ANIL can adapt `head` alone. Each pooling
    floors the side: 28 -> 14 -> 7 -> 3 -> 1 and 84 -> 42 -> 21 -> 10 -> 5. BatchNorm uses the
    statistics of the current batch by default (``track_running_stats=False``), as in MAML, where
    each task is normalised by its own data in training and in testing alike.

    >>> net = Conv4(out_features=5)
    >>> net(torch.zeros(10, 1, 28, 28)).shape, net.head.in_features
    (torch.Size([10, 5]), 64)
    >>> Conv4(in_channels=3, image_size=84, hidden=32).head.in_features
    800
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_features: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        *,
        track_running_stats: bool = False,
    ):
        super().__init__()
        side = image_size // 2**4
        if side < 1:
            raise ValueError(f"image_size must be at least 16 for four 2x2 poolings, got {image_size}")
        blocks = []
        for channels in (in_channels, hidden, hidden, hidden):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=track_running_stats),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(hidden * side * side, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
