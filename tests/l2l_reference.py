"""A minimal stand-in for learn2learn's ``MAML`` (learn2learn does not build on Python 3.11).

Written here from learn2learn's documented semantics: ``clone()`` gives a learner whose
parameters are differentiable copies of the model's, ``adapt(loss)`` takes one SGD step keeping
the graph (``create_graph=True``), so the query loss's backward is exact MAML.
"""

from types import SimpleNamespace

import torch
from torch import nn
from torch.func import functional_call


class MAML(nn.Module):
    def __init__(self, model, lr, first_order=False):
        super().__init__()
        self.module, self.lr, self.first_order = model, lr, first_order

    def forward(self, *args):
        return self.module(*args)

    def clone(self, first_order=None):
        first_order = self.first_order if first_order is None else first_order
        return _Learner(self.module, dict(self.module.named_parameters()), self.lr, first_order)


class _Learner:
    def __init__(self, module, params, lr, first_order):
        self.module, self.params, self.lr, self.first_order = module, params, lr, first_order

    def __call__(self, *args):
        return functional_call(self.module, self.params, args)

    def adapt(self, loss, first_order=None):
        first_order = self.first_order if first_order is None else first_order
        grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=not first_order)
        self.params = {n: p - self.lr * g for (n, p), g in zip(self.params.items(), grads)}

    def parameters(self):
        return iter(self.params.values())


l2l = SimpleNamespace(algorithms=SimpleNamespace(MAML=MAML))
