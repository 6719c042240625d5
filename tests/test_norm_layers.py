"""Normalisation layers follow their policy, and modules that write their buffers in forward are refused."""

import sys

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo

import references as R
from cases import adapt_and_backward, conv_bn, grads

TOL = 1e-10


def warmed_up_batchnorm_case():
    case = conv_bn(track_running_stats=True)
    with torch.no_grad():  # running statistics away from their (0, 1) initialisation
        for _ in range(3):
            case.model(2 + 3 * torch.randn(16, 1, 6, 6, dtype=torch.float64))
    return case


def test_frozen_batchnorm_uses_running_statistics_exactly_like_higher_in_eval_mode():
    case = warmed_up_batchnorm_case()
    buffers = {n: b.clone() for n, b in case.model.named_buffers()}
    _, got = adapt_and_backward(case, bn="frozen")
    assert all(torch.equal(b, buffers[n]) for n, b in case.model.named_buffers())  # not updated
    reference = warmed_up_batchnorm_case()
    reference.model[1].eval()
    expected = R.unrolled_higher(reference.model, reference.inner_opt(), reference.support, reference.query, 3)
    assert R.relative_error(got, expected) < TOL
    _, transductive = adapt_and_backward(warmed_up_batchnorm_case())
    assert R.relative_error(transductive, expected) > 1e-3  # the policies really differ


def test_batchnorm_error_policy_refuses_tracking_layers_and_accepts_others():
    case = conv_bn(track_running_stats=True)
    with pytest.raises(ValueError, match="bn='error'.*track running statistics.*bn='transductive'"):
        bo.MetaGradientEngine(case.model, case.inner_opt(), 2, bn="error")
    adapt_and_backward(conv_bn(track_running_stats=False), bn="error")


@pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")  # lr 0.2 diverges; exactness holds
def test_batchnorm_with_running_stats_is_transductive_and_leaves_buffers_untouched():
    tracked, untracked = conv_bn(track_running_stats=True), conv_bn(track_running_stats=False)
    untracked.model.load_state_dict(tracked.model.state_dict(), strict=False)
    buffers = {n: b.clone() for n, b in tracked.model.named_buffers()}
    results = []
    for case in (tracked, untracked):
        engine = bo.MetaGradientEngine(case.model, case.inner_opt(), steps=4, estimator=bo.Binomial(2))
        engine.meta_backward(case.query(engine.adapt(case.support)))
        results.append(grads(case.model))
    assert R.relative_error(results[0], results[1]) < TOL
    for name, value in tracked.model.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_model_in_eval_mode_still_adapts_and_dropout_is_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, bo.Exact())
    engine.meta_backward(F.cross_entropy(engine.adapt(lambda m: F.cross_entropy(m(x), y))(x), y))
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), copy_initial_weights=False) as (f, opt):
        for _ in range(3):
            opt.step(F.cross_entropy(f(x), y))
        expected = torch.autograd.grad(F.cross_entropy(f(x), y), list(model.parameters()))
    got = [p.grad for p in model.parameters()]
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(got, expected))


class InPlaceScratch(nn.Module):
    """Writes batch data into a buffer in place: fine eagerly, impossible under vmap."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).double()
        self.register_buffer("scratch", torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        self.scratch.copy_(x.mean(0))
        return self.linear(x)


def test_in_place_state_changes_in_the_model_fail_with_context():
    model = InPlaceScratch()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), 3, bo.Binomial(1))
    with pytest.raises(RuntimeError, match=r"InPlaceScratch wrote its buffer\(s\) \['scratch'\].*eval mode") as error:
        engine.adapt(lambda m: F.cross_entropy(m(x), y))
    if sys.version_info >= (3, 11):
        assert "inner step 0" in "\n".join(error.value.__notes__)
    assert all(p.grad is None for p in model.parameters())


def test_global_module_hooks_are_in_place_only_inside_a_policy_and_under_the_same_keys():
    """Outside binom_opt every module call keeps torch's path without hooks (a user's other code pays nothing); inside,
    the policy's hooks come back under the same keys, which is what torch.compile reads of them."""
    from torch.nn.modules import module as modules

    from binom_opt.core.norm_layers import module_policy

    def hooks():
        return dict(modules._global_forward_pre_hooks), dict(modules._global_forward_hooks)

    outside = hooks()
    maml = bo.MAML(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 4)
    inside = []
    for _ in range(2):
        learner = maml.clone()
        learner.adapt(lambda m: F.mse_loss(m(x), y))
        F.mse_loss(learner(x), y).backward()
        assert hooks() == outside
        with module_policy("auto"):
            inside.append(hooks())
        assert hooks() == outside
    assert inside[0] == inside[1] and all(len(now) == len(before) + 1 for now, before in zip(inside[0], outside))

    def failing(m):  # a closure that raises inside the policy, after a module call, leaves no hook behind
        m(x)
        raise ZeroDivisionError("from the closure")

    with pytest.raises(ZeroDivisionError, match="from the closure"):
        maml.clone().adapt(failing)
    assert hooks() == outside


@pytest.mark.parametrize("bn", ["auto", "frozen"])
@pytest.mark.parametrize("with_batchnorm", [False, True])
def test_later_inner_steps_take_the_hooks_only_where_the_first_call_needed_them(bn, with_batchnorm):
    """A support loss whose first call (the probe, with the hooks) ran no module with buffers, normalisation layer or
    sparse embedding takes its later inner steps without the module hooks under bn="auto" (they would change nothing);
    one that did, or any other policy, keeps them at every step. A call of the adapted model takes them where the model
    has such a module, or under another policy."""
    from torch.nn.modules import module as modules

    layers = [nn.Linear(3, 4), nn.BatchNorm1d(4)] if with_batchnorm else [nn.Linear(3, 4), nn.Tanh()]
    maml = bo.MAML(nn.Sequential(*layers), lr=0.1, bn=bn)
    x, y = torch.randn(8, 3), torch.randn(8, 4)
    hooked = []

    def closure(m):
        hooked.append(bool(modules._global_forward_pre_hooks))
        return F.mse_loss(m(x), y)

    learner = maml.clone()
    for _ in range(3):
        learner.adapt(closure)
    later = not (bn == "auto" and not with_batchnorm)
    assert hooked[0] and hooked[-2:] == [later, later]  # the probe (and a measurement after it) with the hooks
    seen = []  # the adapted model's own calls (never replayed): the hooks where the model has a module they act on
    handle = maml.module[0].register_forward_pre_hook(lambda *_: seen.append(len(modules._global_forward_pre_hooks) > 0))
    learner(x)
    handle.remove()
    assert seen == [later]


@pytest.mark.parametrize("training", [True, False])
def test_under_auto_a_batchnorm_computes_the_same_with_or_without_the_hooks(training):
    """What lets a later inner step run without the hooks (needs_hooks): under bn="auto" they change no value a
    normalisation layer computes, in train mode (batch statistics) or in eval mode (running statistics); they only keep
    its running statistics as they were."""
    from binom_opt.core.norm_layers import module_policy

    torch.manual_seed(0)
    norm = nn.BatchNorm1d(4, dtype=torch.float64).train(training)
    with torch.no_grad():
        norm.running_mean.uniform_(), norm.running_var.uniform_(1, 2)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    outputs = []
    for hooks in (True, False):
        with module_policy("auto", hooks=hooks):
            out = norm(x)
        (grad,) = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
        outputs.append((out, grad, torch.autograd.grad(grad.sum(), x)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
