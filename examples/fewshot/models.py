"""The few-shot image classifiers: Conv4 (Finn et al., 2017; after Vinyals et al., 2016) and ResNet-12
(Oreshkin et al., 2018; Lee et al., 2019), and :func:`build_network`, the one place that knows them by name."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

__all__ = ["Conv4", "ResNet12", "NETWORKS", "build_network"]


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


class ResidualBlock(nn.Module):
    """Three conv3x3 (no bias) + BatchNorm, LeakyReLU(0.1) between them and after the sum with a conv1x1 + BatchNorm
    shortcut, then MaxPool2d(2): one stage of ResNet-12."""

    def __init__(self, in_channels: int, out_channels: int, track_running_stats: bool):
        super().__init__()

        def conv_bn(channels: int, kernel_size: int) -> list:
            return [nn.Conv2d(channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                    nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)]

        act = nn.LeakyReLU(0.1)
        self.body = nn.Sequential(*conv_bn(in_channels, 3), act, *conv_bn(out_channels, 3), act, *conv_bn(out_channels, 3))
        self.shortcut = nn.Sequential(*conv_bn(in_channels, 1))
        self.out = nn.Sequential(act, nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12, the few-shot backbone of TADAM (Oreshkin et al., 2018) and MetaOptNet (Lee et al., 2019).

    Four :class:`ResidualBlock` stages of ``channels`` filters (64-160-320-640 by default), each halving
    the side (84 -> 42 -> 21 -> 10 -> 5), then a global average pool and a linear head: about 12.4M
    parameters with a 5-way head, nearly all of them in the convolutions. As in :class:`Conv4`,
    `features` ends in ``nn.Flatten`` and `head` is the ``nn.Linear``; BatchNorm normalises with the
    statistics of the current batch (``track_running_stats=False``), so a forward pass writes no
    buffer and each task is normalised by its own data, the MAML way. No DropBlock: its random masks
    would make the support loss a different function at each call, and the engine replays it.

    >>> net = ResNet12(in_channels=3, out_features=5)
    >>> round(sum(p.numel() for p in net.parameters()) / 1e6, 1), net.head.in_features
    (12.4, 640)
    >>> ResNet12(in_channels=3, channels=(4, 10, 20, 40))(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 5])
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_features: int = 5,
        channels: tuple = (64, 160, 320, 640),
        *,
        track_running_stats: bool = False,
    ):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must give the filters of the 4 blocks, got {tuple(channels)}")
        widths = (in_channels, *channels)
        blocks = [ResidualBlock(a, b, track_running_stats) for a, b in zip(widths[:-1], widths[1:])]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels[-1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ResNet-12's widths relative to its first block: 64-160-320-640 for hidden=64
RESNET12_WIDTHS = (1.0, 2.5, 5.0, 10.0)

NETWORKS: Dict[str, Callable[..., nn.Module]] = {
    "conv4": lambda in_channels, out_features, hidden, image_size: Conv4(in_channels, out_features, hidden, image_size),
    "resnet12": lambda in_channels, out_features, hidden, image_size: ResNet12(
        in_channels, out_features, tuple(max(1, round(hidden * w)) for w in RESNET12_WIDTHS)),
}
# the width each network is known by: Conv4-32 on miniImageNet (Finn et al., 2017), ResNet-12's 64-160-320-640
DEFAULT_HIDDEN = {"conv4": 32, "resnet12": 64}


def build_network(name: str, *, in_channels: int, out_features: int, image_size: int, hidden: int | None = None) -> nn.Module:
    """The network ``name`` (a key of ``NETWORKS``); ``hidden``: the filters of its first layer (Conv4: of every
    layer; ResNet-12: of the first block, the others 2.5x, 5x and 10x as many), by default ``DEFAULT_HIDDEN[name]``.

    >>> build_network("resnet12", in_channels=3, out_features=5, image_size=84).head.in_features
    640
    >>> build_network("conv4", in_channels=3, out_features=5, image_size=84).head.in_features
    800
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}: choose one of {', '.join(sorted(NETWORKS))}")
    width = DEFAULT_HIDDEN[name] if hidden is None else hidden
    return NETWORKS[name](in_channels, out_features, width, image_size)
