"""bo.innerloop_ctx, higher style: its names mean what they mean in higher."""

import warnings

import higher
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo

import references as R
from cases import small_model, tasks

TOL = 1e-10


def test_higher_track_higher_grads_false_is_plain_evaluation():
    (xs, ys, xq, _), = tasks(1)
    model = small_model()
    with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1), track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(lambda m: F.cross_entropy(m(xs), ys))
        out = fmodel(xq)
    assert not out.requires_grad  # every parameter adapted and detached: no meta-gradient
    with torch.no_grad():
        assert not torch.allclose(out, model(xq))  # but the step was taken


# --- higher's names mean what they mean in higher ------------------------------------------------


def bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        model(2 + torch.randn(16, 4, dtype=torch.float64))  # running statistics away from (0, 1)
    return model


def both(script):
    """Run ``script(library, fmodel, diffopt, step)`` in higher and in bo.innerloop_ctx; their meta-gradients."""
    (xs, ys, xq, yq), = tasks(1)
    results = []
    for library in (higher, bo):
        model = bn_model()
        opt = torch.optim.SGD([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}], lr=0.1)
        lrs = [torch.tensor(0.1, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        with library.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):

            def step(**kwargs):
                if library is higher:
                    diffopt.step(F.cross_entropy(fmodel(xs), ys), **kwargs)
                else:
                    diffopt.step(lambda m: F.cross_entropy(m(xs), ys), **kwargs)

            out = script(library, fmodel, lrs, step)
            F.cross_entropy(fmodel(xq), yq).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads.update({f"lr{i}": lr.grad.clone() for i, lr in enumerate(lrs) if lr.grad is not None})
        results.append((grads, out, model))
    return results


def test_override_per_step_is_kept_for_the_later_steps_and_meta_learned_like_higher():
    def script(library, fmodel, lrs, step):
        step()
        step(override={"lr": lrs})  # one tensor per parameter group, from this step on
        step()

    (higher_grads, _, _), (ours, _, _) = both(script)
    assert {"lr0", "lr1"} <= ours.keys()
    assert R.relative_error(ours, higher_grads) < TOL


def test_eval_inside_the_block_uses_running_statistics_like_higher_and_ends_with_it():
    def script(library, fmodel, lrs, step):
        fmodel.eval()
        for _ in range(2):
            step()
        return fmodel.training

    (higher_grads, _, _), (ours, training, model) = both(script)
    assert R.relative_error(ours, higher_grads) < TOL and training is False
    assert model.training  # the model's own mode is back when the block ends


def test_parameters_fast_params_and_state_dict_are_the_adapted_ones():
    def script(library, fmodel, lrs, step):
        step()
        step()
        return [p.detach().clone() for p in fmodel.parameters()], [p.detach().clone() for p in fmodel.fast_params], fmodel.state_dict()

    (_, (theirs, their_fast, their_state), _), (_, (ours, our_fast, our_state), _) = both(script)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(ours, theirs))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(our_fast, their_fast))
    assert our_state.keys() == their_state.keys()
    assert torch.allclose(our_state["0.weight"].detach(), their_state["0.weight"].detach(), rtol=1e-12, atol=0)


def test_the_divergence_warning_comes_once_per_model_and_points_at_the_users_line():
    model = nn.Linear(3, 1, bias=False).double()
    x, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # one block per task, as in higher's examples
            with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.6), estimator=bo.Binomial(3), copy_initial_weights=False) as (f, d):
                for _ in range(5):
                    d.step(lambda m: ((m(x) - y) ** 2).mean())
                ((f(x) - 2 * y) ** 2).mean().backward()
    diverging = [w for w in caught if issubclass(w.category, bo.ExpansionDivergenceWarning)]
    assert len(diverging) == 1 and diverging[0].filename == __file__
    assert "Consider hessian_scale='paper'" in str(diverging[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other = nn.Linear(3, 1, bias=False).double()
        with bo.innerloop_ctx(other, torch.optim.SGD(other.parameters(), lr=0.6), copy_initial_weights=False,
                              estimator=bo.Binomial(3, hessian_scale="paper")) as (f, d):
            for _ in range(5):
                d.step(lambda m: ((m(x) - y) ** 2).mean())
            ((f(x) - 2 * y) ** 2).mean().backward()
    assert all("Consider hessian_scale='paper'" not in str(w.message) for w in caught)  # the advice fits the settings
