"""A zoo of modules users bring, through every entry point: exact MAML (float64, 1e-9) or a clear error first.

Each model adapts all its parameters (the frozen body: its head only) with SGD over a meta-batch of
3 tasks; the reference is exact MAML by autograd through the unrolled inner loop
(``create_graph=True``) on a copy of the model, in the same train/eval mode.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

import binom_opt as bo

import references as R
from cases import BodyHead, generator
from test_entry_points import ENTRIES, LR, K, meta_grads

pytestmark = [pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning"),
              pytest.mark.filterwarnings("ignore:binom_opt. Batching rule not implemented:RuntimeWarning")]


class Head(nn.Module):
    """``body`` then a linear head to 2 classes over the mean of the sequence/spatial positions."""

    def __init__(self, body, width, pool=None):
        super().__init__()
        self.body, self.head, self.pool = body, nn.Linear(width, 2), pool

    def forward(self, x):
        h = self.body(x)
        return self.head(self.pool(h) if self.pool else h)


class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn, self.head = kind(3, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.attention(x, x, x)[0].mean(1))


class Tied(nn.Module):
    """An autoencoder-style tie: the decoder uses the encoder's weight, transposed."""

    def __init__(self):
        super().__init__()
        self.encoder, self.bias, self.head = nn.Linear(3, 5), nn.Parameter(torch.zeros(3)), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(F.linear(torch.tanh(self.encoder(x)), self.encoder.weight.t(), self.bias))


class NoGradInside(nn.Module):
    """Scales its input by a constant computed without gradient inside forward."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))

    def forward(self, x):
        with torch.no_grad():
            scale = 1.0 / (1.0 + self.net[0].weight.norm())
        return self.net(x * scale)


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.inner, self.head, self.reentrant = nn.Linear(3, 5), nn.Linear(5, 2), reentrant

    def forward(self, x):
        return self.head(checkpoint(lambda z: torch.tanh(self.inner(z)), x, use_reentrant=self.reentrant))


class Embedder(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.embedding, self.head = nn.Embedding(10, 4, **options), nn.Linear(4, 2)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))


def mlp(*middle):
    return nn.Sequential(nn.Linear(3, 5), *middle, nn.Linear(5, 2))


class ChannelsLast(nn.Module):
    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


def conv(norm, memory_format=torch.contiguous_format):
    layers = [ChannelsLast()] if memory_format == torch.channels_last else []
    model = nn.Sequential(*layers, nn.Conv2d(1, 4, 3, padding=1), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    return model.to(memory_format=memory_format)


def warm(model, inputs):
    """Running statistics away from their initialisation (for eval mode)."""
    with torch.no_grad():
        model(inputs)
    return model


VECTORS, IMAGES, SEQUENCES, TOKENS = "vectors", "images", "sequences", "tokens"
CHECKPOINT = r"torch.utils.checkpoint.*Remove activation checkpointing"
ZOO = {
    "inplace_relu": (lambda: mlp(nn.ReLU(inplace=True)), VECTORS, None),
    "tied_weights": (Tied, VECTORS, None),
    "lstm": (lambda: Recurrent(nn.LSTM), SEQUENCES, None),
    "gru": (lambda: Recurrent(nn.GRU), SEQUENCES, None),
    "attention_train": (Attention, "sequences4", None),
    "attention_eval": (lambda: Attention().eval(), "sequences4", None),
    "transformer_layer": (lambda: Head(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True), 4,
                                       pool=lambda h: h.mean(1)), "sequences4", None),
    "transformer_layer_eval": (lambda: Head(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True), 4,
                                            pool=lambda h: h.mean(1)).eval(), "sequences4", None),
    "layer_norm": (lambda: mlp(nn.LayerNorm(5), nn.Tanh()), VECTORS, None),
    "group_norm": (lambda: conv(nn.GroupNorm(2, 4)), IMAGES, None),
    "instance_norm": (lambda: conv(nn.InstanceNorm2d(4, affine=True)), IMAGES, None),
    "instance_norm_tracking_train": (lambda: conv(nn.InstanceNorm2d(4, track_running_stats=True)), IMAGES, None),
    "instance_norm_tracking_eval": (lambda: warm(conv(nn.InstanceNorm2d(4, track_running_stats=True)),
                                                 2 + torch.randn(8, 1, 6, 6)).eval(), IMAGES, None),
    "batch_norm_train": (lambda: conv(nn.BatchNorm2d(4)), IMAGES, None),
    "batch_norm_eval": (lambda: warm(conv(nn.BatchNorm2d(4)), 2 + torch.randn(8, 1, 6, 6)).eval(),
                        IMAGES, None),
    "weight_norm": (lambda: nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 5)), nn.Tanh(), nn.Linear(5, 2)),
                    VECTORS, None),
    "spectral_norm_eval": (lambda: nn.Sequential(parametrizations.spectral_norm(nn.Linear(3, 5)), nn.Tanh(),
                                                 nn.Linear(5, 2)).eval(), VECTORS, None),
    "spectral_norm_train": (lambda: nn.Sequential(parametrizations.spectral_norm(nn.Linear(3, 5)), nn.Tanh(), nn.Linear(5, 2)),
                            VECTORS, r"wrote its buffer.*eval mode"),
    "embedding_padding_idx": (lambda: Embedder(padding_idx=0), TOKENS, None),
    "embedding_sparse": (lambda: Embedder(sparse=True), TOKENS, None),
    "channels_last": (lambda: conv(nn.BatchNorm2d(4), torch.channels_last), IMAGES, None),
    "no_grad_inside_forward": (NoGradInside, VECTORS, None),
    "checkpoint_reentrant": (lambda: Checkpointed(True), VECTORS, CHECKPOINT),
    "checkpoint_non_reentrant": (lambda: Checkpointed(False), VECTORS, CHECKPOINT),
}


def data(kind, B=3):
    gen = generator(1)
    shapes = {VECTORS: (3,), "vectors4": (4,), IMAGES: (1, 6, 6), SEQUENCES: (4, 3), "sequences4": (4, 4)}

    def inputs(n):
        if kind == TOKENS:
            tokens = torch.randint(0, 10, (B, n, 5), generator=gen)
            tokens[..., 0] = 0  # the padding index in every example
            return tokens
        return torch.randn(B, n, *shapes[kind], generator=gen, dtype=torch.float64)

    xs, xq = inputs(6), inputs(8)
    return xs, (torch.arange(6) % 2).repeat(B, 1), xq, (torch.arange(8) % 2).repeat(B, 1)


def seeded(make):
    def build():
        torch.manual_seed(0)
        return make().double()

    return build


def unrolled(model_fn, tasks, adapt="all", lrs=None):
    """Exact MAML of the meta-batch by autograd through the unrolled loop, on a fresh copy per task (with dense
    embedding gradients, which are the same numbers, and attention's math kernel, which has a double backward)."""
    model = model_fn()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.sparse = False
    names = [n for n, _ in model.named_parameters() if adapt == "all" or n.startswith(adapt)]
    total = {}
    xs, ys, xq, yq = tasks
    for b in range(len(xs)):
        with sdpa_kernel(SDPBackend.MATH):
                one = R.unrolled_autograd(copy.deepcopy(model), names, lrs or dict.fromkeys(names, LR),
                                      lambda m, b=b: F.cross_entropy(m(xs[b]), ys[b]),
                                      lambda m, b=b: F.cross_entropy(m(xq[b]), yq[b]), K)
        total = {n: total.get(n, 0) + g for n, g in one.items()}
    return total


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_is_exact_or_refused_clearly(name, entry):
    make, kind, error = ZOO[name]
    model_fn, tasks = seeded(make), data(kind)
    if error:
        with pytest.raises((RuntimeError, ValueError), match=error):
            meta_grads(entry, "sgd", bo.Exact(), model_fn=model_fn, tasks=tasks)
        return
    for estimator in (bo.Exact(), bo.Binomial(K)):
        got = meta_grads(entry, "sgd", estimator, model_fn=model_fn, tasks=tasks)
        expected = unrolled(model_fn, tasks)
        assert R.relative_error(got, {n: expected[n] for n in got}) < 1e-9, (name, entry, estimator)


@pytest.mark.parametrize("entry", ENTRIES)
def test_frozen_body_and_two_learning_rate_groups(entry):
    model_fn, tasks = seeded(BodyHead), data("vectors4")
    got = meta_grads(entry, "sgd", bo.Exact(), model_fn=model_fn, adapt="head", tasks=tasks)
    expected = unrolled(model_fn, tasks, adapt="head")
    assert R.relative_error(got, expected) < 1e-9
    got = meta_grads(entry, "two-groups", bo.Exact(), model_fn=seeded(lambda: mlp(nn.Tanh())), tasks=data(VECTORS))
    expected = unrolled(seeded(lambda: mlp(nn.Tanh())), data(VECTORS), lrs={"0.weight": 0.3, "0.bias": 0.3, "2.weight": 0.1,
                                                                           "2.bias": 0.1})
    assert R.relative_error(got, expected) < 1e-9


def test_refusals_happen_before_anything_is_written():
    model = seeded(ZOO["checkpoint_reentrant"][0])()
    xs, ys, _, _ = data(VECTORS)
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K)
    with pytest.raises(RuntimeError, match=CHECKPOINT):
        engine.adapt(lambda m: F.cross_entropy(m(xs[0]), ys[0]))
    assert all(p.grad is None for p in model.parameters())
