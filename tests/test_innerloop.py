"""bo.innerloop_ctx, higher style."""


import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo

from cases import small_model, tasks


def test_higher_copy_initial_weights_true_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="copy_initial_weights=True.*no meta-gradient"):
        with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=True):
            pass


def test_higher_track_higher_grads_false_is_plain_evaluation():
    (xs, ys, xq, _), = tasks(1)
    model = small_model()
    with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(lambda m: F.cross_entropy(m(xs), ys))
        out = fmodel(xq)
    assert not out.requires_grad  # every parameter adapted and detached: no meta-gradient
    with torch.no_grad():
        assert not torch.allclose(out, model(xq))  # but the step was taken
