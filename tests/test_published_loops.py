"""Published meta-learning loops switched unchanged: what they meta-learn need not be the initial weights.

Each loop runs with ``higher`` (or learn2learn's idiom, autograd with ``create_graph``) and switched to
binom_opt with its arguments unchanged; compared in float64: every gradient, ``None`` where the original
leaves ``None``, the user's model's mode and its weights after the loop.
"""

import warnings

import higher
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo

import references as R
from cases import generator

TOL = 1e-10


def data(seed=0, n=12, features=5, classes=3):
    gen = generator(seed)
    return torch.randn(n, features, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def classifier(seed=0, dropout=0.0, norm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 16), *([nn.BatchNorm1d(16)] if norm else []), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)]
    model = nn.Sequential(*layers).double()
    if norm:
        with torch.no_grad():
            model(2 + torch.randn(32, 5, dtype=torch.float64))  # running statistics away from (0, 1)
    return model


def close(a, b):
    assert (a is None) == (b is None), (a, b)
    if a is not None:
        assert float((a - b).norm()) <= TOL * max(float(b.norm()), 1e-300), float((a - b).norm() / b.norm())


# --- Learning to Reweight Examples (Ren et al., 2018): eps made inside the block, higher's defaults --------------


@pytest.mark.parametrize("explicit", [False, True], ids=["defaults", "copy_initial_weights=True"])
def test_learning_to_reweight_gives_higher_example_weights(explicit):
    (x, y), (xv, yv) = data(0), data(1)
    extra = {"copy_initial_weights": True} if explicit else {}
    out = []
    for library in (higher, bo):
        model = classifier()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with library.innerloop_ctx(model, opt, **extra) as (fmodel, diffopt):
            eps = torch.full((len(y),), 0.1, dtype=torch.float64, requires_grad=True)
            if library is higher:
                diffopt.step((F.cross_entropy(fmodel(x), y, reduction="none") * eps).sum())
            else:
                diffopt.step(lambda m: (F.cross_entropy(m(x), y, reduction="none") * eps).sum())
            grad_eps, = torch.autograd.grad(F.cross_entropy(fmodel(xv), yv), eps)
        out.append((grad_eps, [p.grad for p in model.parameters()]))
    close(out[1][0], out[0][0])
    assert all(g is None for g in out[1][1]) and all(g is None for g in out[0][1])


# --- Meta-Weight-Net (Shu et al., 2019): a weighting network, then the model's own step ------------------------


def test_meta_weight_net_over_iterations_equals_higher():
    results = []
    for library in (higher, bo):
        torch.manual_seed(1)
        vnet = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid()).double()
        model = classifier()
        opt_model = torch.optim.SGD(model.parameters(), lr=0.3)
        opt_vnet = torch.optim.Adam(vnet.parameters(), lr=1e-2)
        vnet_grads, model_grads_after_meta = [], []
        for it in range(3):
            (x, y), (xm, ym) = data(10 + it), data(20 + it)

            def weighted(logits):
                cost = F.cross_entropy(logits, y, reduction="none").reshape(-1, 1)
                return (cost * vnet(cost.detach())).mean()

            with library.innerloop_ctx(model, opt_model) as (fmodel, diffopt):
                diffopt.step(weighted(fmodel(x)) if library is higher else (lambda m: weighted(m(x))))
                opt_vnet.zero_grad()
                F.cross_entropy(fmodel(xm), ym).backward()
            vnet_grads.append([p.grad.clone() for p in vnet.parameters()])
            model_grads_after_meta.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
            opt_vnet.step()
            cost = F.cross_entropy(model(x), y, reduction="none").reshape(-1, 1)  # the model's own training step
            with torch.no_grad():
                w = vnet(cost)
            opt_model.zero_grad()
            (cost * w).mean().backward()
            opt_model.step()
        results.append((vnet_grads, model_grads_after_meta, [p.detach().clone() for p in model.parameters()]))
    (hv, hm, hw), (bv, bm, bw) = results
    for a, b in zip(bv, hv):
        for ga, gb in zip(a, b):
            close(ga, gb)
    assert all(g is None for g in bm[0])  # the meta-step leaves no .grad on the model (higher's copies take them)
    for a, b in zip(bm, hm):  # later: the model's own step's, untouched by the meta-step
        for ga, gb in zip(a, b):
            close(ga, gb)
    for a, b in zip(bw, hw):
        close(a, b)


# --- the initial weights change in place before the backward; modes; frozen layers -----------------------------


def test_copied_weights_may_change_in_place_and_the_adapted_mode_is_its_own():
    (x, y), (xv, yv) = data(0), data(1)
    out = []
    for library in (higher, bo):
        model = classifier(dropout=0.3)  # inner steps in train mode draw dropout masks, the outer loss in eval mode none
        weights = torch.ones(len(y), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        torch.manual_seed(7)
        with library.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(2):
                if library is higher:
                    diffopt.step((F.cross_entropy(fmodel(x), y, reduction="none") * weights).mean())
                else:
                    diffopt.step(lambda m: (F.cross_entropy(m(x), y, reduction="none") * weights).mean())
            model.load_state_dict(fmodel.state_dict())  # the base carried over before the backward
            fmodel.eval()
            F.cross_entropy(fmodel(xv), yv).backward()
            inside = model.training
        out.append((weights.grad, inside, model.training, [p.detach().clone() for p in model.parameters()], torch.rand(2)))
    close(out[1][0], out[0][0])
    assert out[1][1:3] == out[0][1:3] == (True, True)  # the user's model stays in train mode
    for a, b in zip(out[1][3], out[0][3]):
        close(a, b)
    assert torch.equal(out[1][4], out[0][4])  # the caller's generator stands where the loop's would


def test_copy_initial_weights_with_nothing_to_meta_learn_warns_once_and_names_the_fix():
    (x, y), = [data(0)]
    model = classifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
            diffopt.step(lambda m: F.cross_entropy(m(x), y))
            F.cross_entropy(fmodel(x), y).backward()
    assert [str(w.message).count("copy_initial_weights=False") for w in caught] == [1]
    assert all(p.grad is None for p in model.parameters())
    with warnings.catch_warnings():  # an evaluation loop, with nothing to meta-learn and no backward: no warning
        warnings.simplefilter("error")
        with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
            diffopt.step(lambda m: F.cross_entropy(m(x), y))
            with torch.no_grad():
                fmodel(x)


def test_fmodel_eval_inside_the_block_leaves_the_model_alone_and_equals_higher():
    (x, y), (xv, yv) = data(0), data(1)
    out = []
    for library in (higher, bo):
        model = classifier(dropout=0.3)  # eval mode for the inner steps, train mode (dropout) for the outer loss
        torch.manual_seed(3)
        with library.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.3), copy_initial_weights=False) as (fmodel, diffopt):
            fmodel.eval()
            during = model.training
            for _ in range(2):
                diffopt.step(F.cross_entropy(fmodel(x), y) if library is higher else (lambda m: F.cross_entropy(m(x), y)))
            fmodel.train()
            F.cross_entropy(fmodel(xv), yv).backward()
        out.append(([p.grad for p in model.parameters()], during, fmodel.training))
    for a, b in zip(out[1][0], out[0][0]):
        close(a, b)
    assert out[1][1:] == out[0][1:] == (True, True)


def test_frozen_parameters_in_the_inner_optimizer_are_skipped_as_higher_skips_them():
    (x, y), (xv, yv) = data(0), data(1)
    out = []
    for library in (higher, bo):
        model = classifier()
        model[0].weight.requires_grad_(False)
        model[0].bias.requires_grad_(False)
        with library.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.3), copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(F.cross_entropy(fmodel(x), y) if library is higher else (lambda m: F.cross_entropy(m(x), y)))
            F.cross_entropy(fmodel(xv), yv).backward()
        out.append([p.grad for p in model.parameters()])
    for a, b in zip(out[1], out[0]):
        close(a, b)
    assert out[1][0] is None and out[1][2] is not None


# --- diffopt.param_groups: learned per-step learning rates, as higher's diffopt has them ------------------------


def unrolled_adamw(model, rates, support, query, steps, betas=(0.9, 0.999), eps=1e-8, decay=0.01):
    """torch.optim.AdamW's update written out with create_graph (higher 0.2.1 has no AdamW, and its Adam places eps
    as an older torch did), one learning rate per step and tensor."""
    params = dict(model.named_parameters())
    phi, m, v = dict(params), {n: 0 for n in params}, {n: 0 for n in params}
    for k in range(steps):
        g = torch.autograd.grad(support(lambda *a: torch.func.functional_call(model, phi, a)), list(phi.values()), create_graph=True)
        bc1, bc2 = 1 - betas[0] ** (k + 1), 1 - betas[1] ** (k + 1)
        new = {}
        for i, ((n, p), gi) in enumerate(zip(phi.items(), g)):
            m[n], v[n] = betas[0] * m[n] + (1 - betas[0]) * gi, betas[1] * v[n] + (1 - betas[1]) * gi * gi
            p = p * (1 - rates[k, i] * decay)
            new[n] = p - rates[k, i] / bc1 * m[n] / ((v[n] / bc2).sqrt() + eps)
        phi = new
    return torch.autograd.grad(query(lambda *a: torch.func.functional_call(model, phi, a)), [*params.values(), rates])


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_learned_per_step_rates_written_into_param_groups_are_meta_learned(kind):
    (x, y), (xv, yv) = data(0), data(1)
    out = []
    for library in (higher, bo):
        model = classifier()
        groups = [{"params": [p]} for p in model.parameters()]  # one group per tensor
        opt = torch.optim.SGD(groups, lr=0.1) if kind == "sgd" else torch.optim.AdamW(groups, lr=0.01)
        rates = torch.full((3, len(groups)), 0.1 if kind == "sgd" else 0.01, dtype=torch.float64, requires_grad=True)
        if library is higher and kind == "adamw":
            *grads, rates_grad = unrolled_adamw(model, rates, lambda f: F.cross_entropy(f(x), y), lambda f: F.cross_entropy(f(xv), yv), 3)
            out.append((rates_grad, grads))
            continue
        with library.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for k in range(3):
                for i, group in enumerate(diffopt.param_groups):
                    group["lr"] = rates[k, i]
                diffopt.step(F.cross_entropy(fmodel(x), y) if library is higher else (lambda m: F.cross_entropy(m(x), y)))
            F.cross_entropy(fmodel(xv), yv).backward()
        out.append((rates.grad, [p.grad for p in model.parameters()]))
    close(out[1][0], out[0][0])
    for a, b in zip(out[1][1], out[0][1]):
        close(a, b)


def test_param_groups_refuse_other_hyperparameters_changed_during_the_loop():
    (x, y), = [data(0)]
    model = classifier()
    with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) as (fmodel, diffopt):
        diffopt.param_groups[0]["momentum"] = float("0.9")  # the same value written again: no change
        diffopt.step(lambda m: F.cross_entropy(m(x), y))
        diffopt.param_groups[0]["momentum"] = 0.5
        with pytest.raises(ValueError, match=r"\['momentum'\] changed between inner steps; only 'lr'"):
            diffopt.step(lambda m: F.cross_entropy(m(x), y))
        assert fmodel._loop.steps_taken == 1


# --- fmodel answers what higher's fmodel answers ------------------------------------------------------------


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.scale = 2.0

    def forward(self, x):
        return self.head(self.body(x)) * self.scale

    def features(self, x):
        return self.body(x)


def test_fmodel_submodules_attributes_and_methods_run_with_the_adapted_weights():
    (x, y), = [data(0)]
    torch.manual_seed(0)
    model = WithHead().double()
    with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.5), copy_initial_weights=False) as (fmodel, diffopt):
        diffopt.step(lambda m: F.cross_entropy(m(x), y))
        params = dict(fmodel.named_parameters())
        assert list(params) == [n for n, _ in model.named_parameters()]
        assert not torch.equal(params["head.weight"], model.head.weight)
        assert fmodel.scale == 2.0
        torch.testing.assert_close(fmodel.features(x), torch.tanh(x @ params["body.0.weight"].T + params["body.0.bias"]))
        torch.testing.assert_close(fmodel.head(fmodel.body(x)) * 2, fmodel(x))
        assert isinstance(fmodel, nn.Module) and fmodel.training


# --- learn2learn's idioms: the learner is a module; MetaSGD ----------------------------------------------------


def test_maml_learner_is_a_module_whose_mode_is_its_own():
    (x, y), (xv, yv) = data(0), data(1)
    model = classifier(norm=True)
    maml = bo.MAML(model, lr=0.3)
    learner = maml.clone()
    assert isinstance(learner, nn.Module)
    learner.eval()
    assert model.training and not learner.training and not learner.module[1].training
    learner.adapt(lambda m: F.cross_entropy(m(x), y))
    F.cross_entropy(learner(xv), yv).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.eval()  # the reference: the same loop with the model itself in eval mode
    ref = R.unrolled_autograd(model, [n for n, _ in model.named_parameters()], dict.fromkeys(got, 0.3),
                              lambda f: F.cross_entropy(f(x), y), lambda f: F.cross_entropy(f(xv), yv), 1)
    assert R.relative_error(got, ref) < TOL
    assert set(learner.state_dict()) == set(model.state_dict())
    assert torch.equal(learner.state_dict()["0.weight"], dict(learner.named_parameters())["0.weight"].detach())


def test_nested_clone_differentiates_through_both_adaptations():
    (x, y), (xv, yv) = data(0), data(1)
    model = classifier()
    maml = bo.MAML(model, lr=0.3)
    outer = maml.clone()
    outer.adapt(lambda m: F.cross_entropy(m(x), y))
    inner = outer.clone()
    inner.adapt(lambda m: F.cross_entropy(m(xv), yv))
    F.cross_entropy(inner(x), y).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    supports = iter([lambda f: F.cross_entropy(f(x), y), lambda f: F.cross_entropy(f(xv), yv)])
    ref = R.unrolled_autograd(model, list(got), dict.fromkeys(got, 0.3), lambda f: next(supports)(f),
                              lambda f: F.cross_entropy(f(x), y), 2)
    assert R.relative_error(got, ref) < TOL


def test_meta_sgd_equals_a_hand_written_per_parameter_rate_loop():
    (x, y), (xv, yv) = data(0), data(1)
    model = classifier()
    meta = bo.MetaSGD(model, lr=0.2)
    assert len(list(meta.parameters())) == 2 * len(list(model.parameters()))  # the model's and the rates
    with torch.no_grad():
        for r in meta.lrs:
            r.mul_(torch.rand_like(r) + 0.5)  # rates of their own
    learner = meta.clone()
    for _ in range(2):
        learner.adapt(lambda m: F.cross_entropy(m(x), y))
    F.cross_entropy(learner(xv), yv).backward()
    params = dict(model.named_parameters())
    rates = [r.detach().clone().requires_grad_(True) for r in meta.lrs]
    phi = dict(params)
    for _ in range(2):
        g = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, phi, (x,)), y), list(phi.values()), create_graph=True)
        phi = {n: p - r * gi for (n, p), r, gi in zip(phi.items(), rates, g)}
    ref = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, phi, (xv,)), yv), [*params.values(), *rates])
    got = [p.grad for p in params.values()] + [r.grad for r in meta.lrs]
    for a, b in zip(got, ref):
        close(a, b)


# --- a causal LM adapted on a token-weighted loss, the weights from a meta-learned model ----------------------


def test_token_weighted_language_model_with_the_base_carried_over_equals_higher():
    transformers = pytest.importorskip("transformers")
    gen = generator(9)
    batches = [(torch.randint(0, 40, (2, 8), generator=gen), torch.randint(0, 40, (2, 8), generator=gen)) for _ in range(2)]
    out = []
    for library in (higher, bo):
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.1,
                                         embd_pdrop=0.1, attn_pdrop=0.1, attn_implementation="eager")
        base = transformers.GPT2LMHeadModel(config).double().train()  # tied head; dropout on, as in train mode
        weighter = nn.Embedding(40, 1).double()
        opt_weighter = torch.optim.SGD(weighter.parameters(), lr=1.0)

        def token_weighted(logits, ids):
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            return (losses * torch.sigmoid(weighter(ids[:, 1:]).flatten())).mean()

        grads = []
        torch.manual_seed(11)
        for ids, eval_ids in batches:
            opt = torch.optim.SGD(base.parameters(), lr=0.5)
            with library.innerloop_ctx(base, opt, copy_initial_weights=True) as (adapted, diffopt):
                if library is higher:
                    diffopt.step(token_weighted(adapted(ids).logits, ids))
                else:
                    diffopt.step(lambda m, ids=ids: token_weighted(m(ids).logits, ids))
                base.load_state_dict(adapted.state_dict())
                adapted.eval()
                opt_weighter.zero_grad()
                adapted(input_ids=eval_ids, labels=eval_ids).loss.backward()
            grads.append(weighter.weight.grad.clone())
            opt_weighter.step()
        out.append((grads, base.training, [p.detach().clone() for p in base.parameters()], [p.grad for p in base.parameters()]))
    for a, b in zip(out[1][0], out[0][0]):
        close(a, b)
    assert out[1][1] and out[0][1]
    for a, b in zip(out[1][2], out[0][2]):
        close(a, b)
    assert all(g is None for g in out[1][3] + out[0][3])


def test_fmodel_generate_runs_the_hugging_face_method_with_the_adapted_weights():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, attn_implementation="eager")
    base = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 40, (1, 5), generator=generator(2))
    with bo.innerloop_ctx(base, torch.optim.SGD(base.parameters(), lr=5.0)) as (adapted, diffopt):
        diffopt.step(lambda m: m(input_ids=ids, labels=ids).loss)
        generated = adapted.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        reference = transformers.GPT2LMHeadModel(config).double().eval()
        reference.load_state_dict(adapted.state_dict())
    assert torch.equal(generated, reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert not torch.equal(generated, base.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
