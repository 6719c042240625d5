"""Host overhead, counted: Python and C function calls per inner step and per HVP on a small adapted part.

Where the adapted part is small (the MAML paper's sine MLP, a linear head, LoRA adapters) the host's work per call
is most of a step's time, on a GPU too (launch-bound). Calls counted with ``sys.setprofile`` are the same on every
run of one Python and torch version, so they are pinned (within 10 %) beside the hand-written loop's, counted in
the same test: a change that adds per-call machinery fails here, whatever the machine's load.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

import binom_opt as bo

from cases import generator

# per (Python major.minor, torch major.minor): calls per inner step of bo.MAML and per HVP of its Exact backward
PINS = {("3.11", "2.13"): {"inner step": 244, "hvp": 22}}
TOLERANCE = 0.10
# against the hand-written loop (an inner step with create_graph autograd; an HVP as autograd's double backward)
RATIOS = {"inner step": 1.0, "hvp": 0.3}


def calls(fn) -> int:
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


@pytest.fixture(scope="module")
def counts():
    key = (".".join(map(str, sys.version_info[:2])), ".".join(torch.__version__.split(".")[:2]))
    if key not in PINS:
        pytest.skip(f"overhead pins are for {sorted(PINS)}, not {key}: add the counts this test prints")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 1))
    gen = generator(0)
    xs, ys = torch.randn(10, 1, generator=gen), torch.randn(10, 1, generator=gen)
    support = lambda m: F.mse_loss(m(xs), ys)

    def backward(steps):
        learner = bo.MAML(model, lr=0.01).clone()
        for _ in range(steps):
            learner.adapt(support)
        loss = support(learner)
        return calls(loss.backward)

    def inner_steps():
        learner = bo.MAML(model, lr=0.01).clone()
        learner.adapt(support)  # the first step probes the closure
        return calls(lambda: [learner.adapt(support) for _ in range(5)]) / 5

    params = dict(model.named_parameters())
    vector = [torch.randn_like(p) for p in params.values()]

    def hand_step():
        torch.autograd.grad(support(lambda x: torch.func.functional_call(model, params, (x,))), list(params.values()),
                            create_graph=True)

    def hand_hvp():
        leaves = [p.detach().requires_grad_() for p in params.values()]
        grads = torch.autograd.grad(support(lambda x: torch.func.functional_call(model, dict(zip(params, leaves)), (x,))), leaves,
                                    create_graph=True)
        torch.autograd.grad(grads, leaves, vector)

    for warm in (backward, hand_step, hand_hvp):  # first calls initialise torch's caches
        warm(5) if warm is backward else warm()
    got = {"inner step": inner_steps(), "hvp": (backward(10) - backward(5)) / 5}
    hand = {"inner step": calls(hand_step), "hvp": calls(hand_hvp)}
    print({"binom_opt": got, "hand-written": hand})
    return PINS[key], got, hand


@pytest.mark.parametrize("what", ["inner step", "hvp"])
def test_calls_stay_within_their_pins(counts, what):
    pins, got, _ = counts
    assert got[what] <= pins[what] * (1 + TOLERANCE), f"{got[what]} calls per {what}, more than 10 % above the pin {pins[what]}"
    assert got[what] >= pins[what] * (1 - TOLERANCE), f"{got[what]} calls per {what}: lower the pin in tests/test_overhead.py"


@pytest.mark.parametrize("what", ["inner step", "hvp"])
def test_calls_against_the_hand_written_loop(counts, what):
    _, got, hand = counts
    assert got[what] / hand[what] <= RATIOS[what], f"{got[what] / hand[what]:.2f}x the hand-written loop's calls per {what}"
