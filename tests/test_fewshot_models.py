"""examples/fewshot/models.py: ResNet-12's shapes, size and BatchNorm, the network registry, and ResNet-12 under
binom_opt's exact meta-gradient against autograd's unrolled one (float64)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewshot.models import DEFAULT_HIDDEN, NETWORKS, Conv4, ResNet12, build_network
from references import relative_error, unrolled_autograd

TINY = (2, 3, 4, 5)  # ResNet-12 channels small enough for float64 meta-gradients in a second


def test_resnet12_has_12_4m_parameters_with_a_5_way_head():
    net = ResNet12(in_channels=3, out_features=5)
    assert sum(p.numel() for p in net.parameters()) == 12_427_525
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is None for c in convs)  # 4 blocks x (3 conv3x3 + 1 conv1x1)
    assert [c.out_channels for c in convs[3::4]] == [64, 160, 320, 640] and net.head.in_features == 640


@pytest.mark.parametrize(("image_size", "side"), [(84, 5), (32, 2)])
def test_resnet12_shapes(image_size, side):
    net = ResNet12(in_channels=3, out_features=7, channels=(4, 10, 20, 40))
    x = torch.randn(6, 3, image_size, image_size)
    assert net.features[:4](x).shape == (6, 40, side, side)  # each block halves the side
    assert net.features(x).shape == (6, 40) and net(x).shape == (6, 7)
    assert isinstance(net.head, torch.nn.Linear)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet12_batch_norm_writes_no_buffer_and_normalises_each_batch(mode):
    net = getattr(ResNet12(channels=TINY), mode)()
    assert list(net.buffers()) == []
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    out = net(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # batch statistics in both modes: a sample's output depends on the rest of its batch
    assert not torch.allclose(net(torch.cat([x[:2], 5 * x[2:]]))[:2], out[:2])


def test_resnet12_rejects_a_wrong_number_of_blocks():
    with pytest.raises(ValueError, match="channels must give the filters of the 4 blocks"):
        ResNet12(channels=(64, 160, 320))


def test_build_network_knows_every_network_and_its_usual_width():
    assert set(NETWORKS) == set(DEFAULT_HIDDEN) == {"conv4", "resnet12"}
    resnet = build_network("resnet12", in_channels=3, out_features=5, image_size=84)
    assert isinstance(resnet, ResNet12) and resnet.head.in_features == 640
    assert build_network("resnet12", in_channels=3, out_features=5, image_size=84, hidden=4).head.in_features == 40
    conv = build_network("conv4", in_channels=3, out_features=5, image_size=84)
    assert isinstance(conv, Conv4) and conv.head.in_features == 32 * 5 * 5
    with pytest.raises(ValueError, match="unknown network 'resnet18': choose one of conv4, resnet12"):
        build_network("resnet18", in_channels=3, out_features=5, image_size=84)


@pytest.mark.parametrize("entry", ["engine", "maml"])
def test_resnet12_exact_meta_gradient_matches_unrolled_autograd(entry):
    """K = 2 inner SGD steps through every ResNet-12 parameter (convolutions, BatchNorm, shortcut, head), float64."""
    torch.manual_seed(0)
    model = ResNet12(in_channels=3, out_features=3, channels=TINY).double()
    x_s, y_s = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.arange(6) % 3
    x_q, y_q = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.arange(6) % 3
    steps, lr = 2, 0.5
    model.zero_grad()
    if entry == "engine":
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=lr), steps=steps, estimator=bo.Exact())
        learner = engine.adapt(lambda m: F.cross_entropy(m(x_s), y_s))
    else:
        learner = bo.MAML(model, lr=lr).clone()
        for _ in range(steps):
            learner.adapt(lambda m: F.cross_entropy(m(x_s), y_s))
    F.cross_entropy(learner(x_q), y_q).backward()
    ours = {n: p.grad for n, p in model.named_parameters()}
    reference = unrolled_autograd(model, [n for n, _ in model.named_parameters()], {n: lr for n, _ in model.named_parameters()},
                                  lambda m: F.cross_entropy(m(x_s), y_s), lambda m: F.cross_entropy(m(x_q), y_q), steps)
    assert relative_error(ours, reference) < 1e-10
    assert all(float(g.abs().sum()) > 0 for g in reference.values())  # every parameter is in the meta-gradient
