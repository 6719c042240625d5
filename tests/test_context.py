"""Each inner step's context (random state, autocast) is recorded and every replay runs under it.

References: the loop itself, unrolled with ``create_graph`` under the same seed (it keeps each step's
dropout masks in its graph), and the brute-force expansion with each step's masks fixed.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo
from binom_opt.core.context import RandomState, StepContext
from binom_opt.functional import meta_gradient

import references as R
from cases import generator

TOL = 1e-10
K, LR, SEED = 3, 0.3, 123


def dropout_mlp(p=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(p), nn.Linear(16, 3)).double()


def data(seed=1, n=10):
    gen = generator(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.arange(n) % 3


X, Y = data(1)
XQ, YQ = data(2)
support = lambda f: F.cross_entropy(f(X), Y)
query = lambda f: F.cross_entropy(f(XQ), YQ)


def reference(model, steps=K):
    """The loop's meta-gradient (create_graph, every step's masks in the graph) and the next draw after it."""
    torch.manual_seed(SEED)
    grads = R.unrolled_autograd(model, [n for n, _ in model.named_parameters()], {n: LR for n, _ in model.named_parameters()},
                                support, query, steps)
    return grads, torch.rand(4)


def run(entry, model, estimator, **options):
    """The meta-gradient of one entry point under the same seed, and the next draw after it."""
    torch.manual_seed(SEED)
    if entry == "maml":
        learner = bo.MAML(model, lr=LR, estimator=estimator, **options).clone()
        for _ in range(K):
            learner.adapt(lambda m: support(m))
        query(learner).backward()
    elif entry == "innerloop_ctx":
        with bo.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=LR), estimator=estimator,
                              copy_initial_weights=False, **options) as (fmodel, diffopt):
            for _ in range(K):
                diffopt.step(lambda m: support(m))
            query(fmodel).backward()
    elif entry == "engine":
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K, estimator, **options)
        engine.meta_backward(query(engine.adapt(support)))
    else:
        call = lambda p: (lambda *a: torch.func.functional_call(model, p, a))
        grads = meta_gradient(lambda p: support(call(p)), lambda p: query(call(p)), dict(model.named_parameters()), steps=K,
                              lr=LR, estimator=estimator, **options)
        return grads, torch.rand(4)
    return {n: p.grad for n, p in model.named_parameters()}, torch.rand(4)


@pytest.mark.parametrize("entry", ["maml", "innerloop_ctx", "engine", "functional"])
@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Truncated(K), bo.Binomial(K)], ids=repr)
def test_dropout_gives_the_loops_own_meta_gradient_and_leaves_the_stream_where_the_loop_does(entry, estimator):
    ref, after = reference(dropout_mlp())
    got, next_draw = run(entry, dropout_mlp(), estimator)
    assert R.relative_error(got, ref) < TOL
    assert torch.equal(next_draw, after)


def brute_force_with_masks(model, estimator):
    """The brute-force expansion where step ``k``'s loss is the support loss with step ``k``'s masks (its random
    state in the loop, found by running the loop once)."""
    torch.manual_seed(SEED)
    states, phi = [], dict(model.named_parameters())
    for _ in range(K):
        states.append(torch.get_rng_state())
        g = torch.autograd.grad(support(lambda *a: torch.func.functional_call(model, phi, a)), list(phi.values()))
        phi = {n: p - LR * gi for (n, p), gi in zip(phi.items(), g)}

    def at(k):
        def loss(f):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(states[k])
                return support(f)
        return loss

    u = R.unroll(model, [n for n, _ in model.named_parameters()], {n: LR for n, _ in model.named_parameters()},
                 [at(k) for k in range(K)], query, K)
    init, _ = R.brute_force(u, estimator, K)
    return R.unflatten(init, dict(model.named_parameters()))


@pytest.mark.parametrize("estimator", [bo.Binomial(1), bo.Truncated(1), bo.Hybrid(1, 2), bo.Binomial(2)], ids=repr)
def test_every_estimator_replays_each_point_from_its_own_step_state(estimator):
    got, _ = run("engine", dropout_mlp(0.3), estimator)
    assert R.relative_error(got, brute_force_with_masks(dropout_mlp(0.3), estimator)) < TOL


@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Binomial(1)], ids=repr)
def test_checkpointed_steps_are_recomputed_from_their_random_states(estimator):
    plain, _ = run("engine", dropout_mlp(0.3), estimator)
    checkpointed, _ = run("engine", dropout_mlp(0.3), estimator, checkpoint_every=2)
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


def test_noise_drawn_in_the_closure_and_other_meta_parameters_are_replayed():
    torch.manual_seed(0)
    body, head = nn.Linear(5, 8).double(), nn.Linear(8, 3).double()
    noisy = lambda f: F.cross_entropy(f(torch.tanh(body(X + 0.1 * torch.randn_like(X)))), Y)
    outer = lambda f: F.cross_entropy(f(torch.tanh(body(XQ))), YQ)
    torch.manual_seed(SEED)
    ref = R.unrolled_autograd(head, ["weight", "bias"], {"weight": LR, "bias": LR}, noisy, outer, K)
    ref_body = torch.autograd.grad(_unrolled_loss(head, noisy, outer), list(body.parameters()))
    torch.manual_seed(SEED)
    engine = bo.MetaGradientEngine(head, torch.optim.SGD(head.parameters(), lr=LR), K)
    head.zero_grad()
    engine.meta_backward(outer(engine.adapt(noisy)))
    assert R.relative_error({n: p.grad for n, p in head.named_parameters()}, ref) < TOL
    for got, want in zip(body.parameters(), ref_body):
        assert float((got.grad - want).norm() / want.norm()) < TOL


def _unrolled_loss(model, support_loss, query_loss):
    torch.manual_seed(SEED)
    phi = dict(model.named_parameters())
    for _ in range(K):
        g = torch.autograd.grad(support_loss(lambda *a: torch.func.functional_call(model, phi, a)), list(phi.values()),
                                create_graph=True)
        phi = {n: p - LR * gi for (n, p), gi in zip(phi.items(), g)}
    return query_loss(lambda *a: torch.func.functional_call(model, phi, a))


def test_a_step_without_random_ops_records_no_random_state():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    learner = bo.MAML(model, lr=LR, memory_budget="inner_step").clone()  # no kept graph: every step may be replayed
    learner.adapt(lambda m: support(m))
    learner.adapt(lambda m: support(m) + 0 * torch.rand(()))
    contexts = learner._loop.stepper.contexts
    assert contexts[0].random is None and contexts[1].random is not None
    assert not contexts[1].joins(contexts[0])


@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Binomial(1)], ids=repr)
def test_kept_steps_record_their_start_state_and_a_second_backward_replays_them_as_they_ran(estimator):
    """A step that keeps its graph is replayed only by a second backward (the first differentiates its graph): its
    start state is recorded whether or not it drew, and the replays of the second backward give the first one's
    meta-gradient, the caller's stream left where the loop leaves it."""
    model = dropout_mlp(0.3)
    torch.manual_seed(SEED)
    learner = bo.MAML(model, lr=LR, estimator=estimator).clone()
    for _ in range(K):
        learner.adapt(lambda m: support(m))
    assert learner._loop._graphs and all(c.random is not None for c in learner._loop.stepper.contexts)
    loss = query(learner)
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    after = torch.rand(4)
    second = torch.autograd.grad(loss, list(model.parameters()))
    assert all(R.relative_error({"t": a}, {"t": b}) < TOL for a, b in zip(first, second))
    ref, ref_after = reference(dropout_mlp(0.3))
    if isinstance(estimator, bo.Exact):
        assert R.relative_error(dict(zip(ref, first)), ref) < TOL
    assert torch.equal(after, ref_after)


def test_meta_batches_keep_their_modes_and_name_them():
    model = dropout_mlp()
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K)
    tasks = (torch.stack([X, XQ]), torch.stack([Y, YQ]))
    for plan in ({}, {"memory_budget": None}):  # the CPU's task-by-task plan and vmapped tasks
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K, **plan)
        with pytest.raises(RuntimeError, match="vmapped tasks cannot draw the numbers a loop over tasks draws.*randomness='same'"):
            engine.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), tasks)
    same = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K, randomness="same")
    learners = same.adapt_batch(lambda m, t: F.cross_entropy(m(t[0]), t[1]), tasks)
    same.meta_backward(F.cross_entropy(learners(tasks[0]).flatten(0, 1), tasks[1].flatten()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_randomness_error_still_refuses_random_ops():
    learner = bo.MAML(dropout_mlp(), lr=LR, randomness="error").clone()
    learner.adapt(lambda m: support(m))
    with pytest.raises(RuntimeError, match="randomness='error' does not replay"):
        query(learner).backward()


def test_compiled_replays_refuse_random_steps_before_compiling():
    learner = bo.MAML(dropout_mlp(), lr=LR, compile_hvps=True).clone()
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="drew random numbers.*compile_hvps cannot replay"):
        learner.adapt(lambda m: support(m))
    assert learner.steps_taken == 0 and torch.equal(torch.get_rng_state(), before)  # nothing changed


def test_step_context_replays_autocast_and_forks_the_generator():
    torch.manual_seed(0)
    before = RandomState.capture([])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        drawn = torch.rand(3)
        context = StepContext.now(["cpu"], before)
    assert before.moved([])
    with context.replay():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.equal(torch.rand(3), drawn)
    assert not torch.is_autocast_enabled("cpu")
    assert not torch.equal(torch.rand(3), drawn)


# --- mixed precision: the backward outside autocast replays steps taken inside it ------------------------------


def adapted_under_autocast(device: str, dtype: torch.dtype, backward_inside: bool = False):
    """A small MLP adapted 3 steps under ``torch.autocast(device, dtype)``, its query loss computed there too (and,
    with ``backward_inside``, differentiated there); the model and the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).to(device)
    gen = generator(3)
    x, y = torch.randn(20, 16, generator=gen).to(device), torch.randint(0, 5, (20,), generator=gen).to(device)
    learner = bo.MAML(model, lr=0.3).clone()
    with torch.autocast(device, dtype=dtype):
        for _ in range(3):
            learner.adapt(lambda m: F.cross_entropy(m(x), y))
        loss = F.cross_entropy(learner(x), y)
        if backward_inside:
            loss.backward()
    return model, loss


def test_bf16_autocast_meta_gradient_does_not_depend_on_where_the_backward_runs():
    inside, _ = adapted_under_autocast("cpu", torch.bfloat16, backward_inside=True)
    outside, loss = adapted_under_autocast("cpu", torch.bfloat16)
    loss.backward()  # outside autocast: PyTorch's recommended pattern
    grads = lambda model: {n: p.grad for n, p in model.named_parameters()}
    assert R.relative_error(grads(outside), grads(inside)) < 1e-6


# --- dropout 0.1 in train mode on tiny Hugging Face models -------------------------------------------------


def hf_model(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=40, attn_implementation="eager")
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.1, embd_pdrop=0.1,
                                         attn_pdrop=0.1, **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.1,
                                         attention_probs_dropout_prob=0.1, **common)
        model = transformers.BertForSequenceClassification(config)
    return model.double().train()


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("estimator", [bo.Exact(), bo.Truncated(2), bo.Binomial(2)], ids=repr)
def test_hugging_face_dropout_in_train_mode_gives_the_loops_meta_gradient(kind, estimator):
    gen = generator(5)
    ids, labels = torch.randint(0, 40, (3, 8), generator=gen), torch.randint(0, 3, (3,), generator=gen)
    if kind == "gpt2":
        loss = lambda f: f(input_ids=ids, labels=ids).loss
    else:
        loss = lambda f: F.cross_entropy(f(input_ids=ids).logits, labels)
    model = hf_model(kind)
    names = [n for n, p in model.named_parameters()]
    torch.manual_seed(SEED)
    ref = R.unrolled_autograd(model, names, dict.fromkeys(names, 0.1), loss, loss, 2)
    after = torch.rand(4)
    model = hf_model(kind)
    torch.manual_seed(SEED)
    learner = bo.MAML(model, lr=0.1, estimator=estimator).clone()
    for _ in range(2):
        learner.adapt(loss)
    loss(learner).backward()
    assert torch.equal(torch.rand(4), after)
    assert R.relative_error({n: p.grad for n, p in model.named_parameters()}, ref) < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast and GradScaler need CUDA")
def test_fp16_grad_scaler_scales_the_meta_gradient_and_unscale_recovers_it():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def meta_step(scaled):
        model, loss = adapted_under_autocast("cuda", torch.float16)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if scaled:
            scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        return {n: p.grad.float() for n, p in model.named_parameters()}

    assert R.relative_error(meta_step(True), meta_step(False)) < 1e-2  # fp16 rounding of the scaled adjoints
