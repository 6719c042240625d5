"""Hugging Face transformers and peft models through every entry point: exact MAML, or a clear error first.

Tiny models built here in float64 (hidden 16, 2 layers, 2 heads, 8 tokens, a vocabulary of 50), with every dropout
probability 0 so that train mode is deterministic: an encoder (BERT, sequence classification), a decoder (GPT-2, a
causal LM whose loss comes from ``labels=``) and a ViT (image classification of 8x8 images). They adapt fully, or
through LoRA adapters (peft) with the base frozen or meta-learned. The reference is exact MAML by autograd through
the unrolled inner loop (``create_graph=True``, ``torch.func.functional_call``) on the model with eager attention:
K = 3 SGD steps over a meta-batch of 2 tasks of 6 examples. binom_opt runs transformers' default, SDPA attention.
"""

import functools

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import binom_opt as bo
from binom_opt.functional import meta_gradient, meta_gradient_batched

import references as R
from cases import generator

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers' renames (gradient_checkpointing_*)
              pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")]

K, LR, B, N, TOKENS, VOCAB, TOL = 3, 0.3, 2, 6, 8, 50, 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from a second intra-op thread, only its synchronisation: on a busy 2-core
    machine the BERT entry-point tests took 66 s with two threads and 8 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bert(attention):
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, attn_implementation=attention))


def gpt2(attention, use_cache=False):
    # use_cache=False: a batched learner returns tensors, and GPT-2 would return its key/value cache, an object
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, use_cache=use_cache, attn_implementation=attention))


def vit(attention):
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attention))


MODELS = {"bert": bert, "gpt2": gpt2, "vit": vit}
# full: every parameter adapts; lora: the adapters and the classifier adapt, the base is frozen (allow_nograd);
# lora+base: the same adapt, and the base is meta-learned through the inner loop without adapting
ADAPTERS = ["full", "lora", "lora+base"]
ENTRIES = {"maml": {}, "innerloop_ctx": {}, "adapt": {}, "adapt_batch": {}, "adapt_batch-vmap": {"memory_budget": None},
           "meta_gradient": {}, "meta_gradient_batched": {}, "meta_gradient_batched-vmap": {"memory_budget": None}}


def with_lora(model, name, adapter):
    # the attention projections: GPT-2's fused c_attn, BERT's query/value, ViT's query/value (q_proj/v_proj lately)
    layers = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = ["c_attn"] if name == "gpt2" else [t for t in ("query", "value", "q_proj", "v_proj") if t in layers]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=name == "gpt2",
                             modules_to_save=None if name == "gpt2" else ["classifier"],
                             init_lora_weights=False)  # B != 0: every adapter weight has a meta-gradient from the start
    model = peft.get_peft_model(model, config).double()
    if adapter == "lora+base":
        for n, p in model.named_parameters():
            p.requires_grad_("original_module" not in n)  # peft keeps the classifier as it was, unused
    return model


def build(name, attention="sdpa", adapter="full", train=True, **config):
    torch.manual_seed(0)
    model = MODELS[name](attention, **config).double()
    return (model if adapter == "full" else with_lora(model, name, adapter)).train(train)


def adapted(model, adapter):
    return [n for n, p in model.named_parameters() if p.requires_grad and (adapter == "full" or "lora_" in n or "modules_to_save" in n)]


def tasks(name, padded=False, seed=1):
    """The support and query sets of the meta-batch: the model's keyword arguments, each ``[B, N, ...]``."""
    gen = generator(seed)

    def one():
        if name == "vit":
            return {"pixel_values": torch.randn(B, N, 3, 8, 8, generator=gen, dtype=torch.float64),
                    "labels": torch.randint(0, 3, (B, N), generator=gen)}
        ids = torch.randint(0, VOCAB, (B, N, TOKENS), generator=gen)
        data = {"input_ids": ids, "labels": ids if name == "gpt2" else torch.randint(0, 3, (B, N), generator=gen)}
        if padded:  # every other sequence ends in two padding tokens
            data["attention_mask"] = torch.ones_like(ids)
            data["attention_mask"][:, ::2, -2:] = 0
        return data

    return one(), one()


def task(data, b):
    return {k: v[b] for k, v in data.items()}


def loss(m, data):
    return m(**data).loss


@functools.cache
def unrolled(name, adapter="full", train=True, attention="eager", padded=False):
    """Exact MAML of the meta-batch by autograd through the unrolled loop (SDPA through its math kernel, the one
    with a second derivative)."""
    model = build(name, attention, adapter, train)
    names = adapted(model, adapter)
    support, query = tasks(name, padded)
    total = {}
    with sdpa_kernel(SDPBackend.MATH):
        for b in range(B):
            one = R.unrolled_autograd(model, names, dict.fromkeys(names, LR), lambda f, b=b: loss(f, task(support, b)),
                                      lambda f, b=b: loss(f, task(query, b)), K)
            total = {n: total.get(n, 0) + g for n, g in one.items()}
    return total


def reference(name, attention="sdpa", adapter="full", train=True, padded=False):
    # ViT's eager attention takes its softmax in float32 (transformers casts it there), 2e-8 away from its SDPA form
    # in float64: against SDPA, its reference is the SDPA model
    return unrolled(name, adapter, train, attention if name == "vit" else "eager", padded)


def meta_grads(entry, name, adapter="full", estimator=bo.Exact(), train=True, attention="sdpa", padded=False, model=None):
    """The meta-gradient of the summed query losses of the meta-batch through ``entry``, by parameter name."""
    options = ENTRIES[entry]
    model = model or build(name, attention, adapter, train)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = adapted(model, adapter)
    support, query = tasks(name, padded)
    inner_opt = lambda: torch.optim.SGD([named[n] for n in names], lr=LR)
    if entry == "maml":
        # learn2learn's way adapts every parameter that requires grad (allow_nograd: not the frozen base); a base
        # meta-learned without adapting is left out by an inner optimizer over the adapted ones
        step = {"inner_opt": inner_opt()} if adapter == "lora+base" else {"lr": LR}
        maml = bo.MAML(model, estimator=estimator, allow_nograd=adapter == "lora", **step, **options)
        for b in range(B):
            learner = maml.clone()
            for _ in range(K):
                learner.adapt(lambda m, b=b: loss(m, task(support, b)))
            loss(learner, task(query, b)).backward()
    elif entry == "innerloop_ctx":
        for b in range(B):
            with bo.innerloop_ctx(model, inner_opt(), estimator=estimator, copy_initial_weights=False, **options) as (fmodel, diffopt):
                for _ in range(K):
                    diffopt.step(lambda m, b=b: loss(m, task(support, b)))
                loss(fmodel, task(query, b)).backward()
    elif entry == "adapt":
        engine = bo.MetaGradientEngine(model, inner_opt(), K, estimator, **options)
        for b in range(B):
            engine.meta_backward(loss(engine.adapt(lambda m, b=b: loss(m, task(support, b))), task(query, b)))
    elif entry.startswith("adapt_batch"):
        engine = bo.MetaGradientEngine(model, inner_opt(), K, estimator, **options)
        learners = engine.adapt_batch(loss, support)
        engine.meta_backward(loss(learners, query).sum())  # one query loss per task
    else:
        params = {n: named[n].detach() for n in names}
        base = {n: p for n, p in named.items() if n not in params}  # meta-learned, not adapted: read from the model
        f = lambda p, data: loss(lambda **kw: functional_call(model, p, (), kw), data)
        if entry.startswith("meta_gradient_batched"):
            grads = meta_gradient_batched(lambda p, t: f(p, t[0]), lambda p, t: f(p, t[1]), params, (support, query), steps=K,
                                          lr=LR, estimator=estimator, meta_params=base, **options)
            return {n: g.sum(0) if n in params else g for n, g in grads.items()}
        total = {}
        for b in range(B):
            grads = meta_gradient(lambda p, b=b: f(p, task(support, b)), lambda p, b=b: f(p, task(query, b)), params, steps=K,
                                  lr=LR, estimator=estimator, meta_params=base, **options)
            total = {n: total.get(n, 0) + g for n, g in grads.items()}
        return total
    return {n: p.grad for n, p in named.items() if p.grad is not None}


def assert_exact(got, expected, tol=TOL):
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
    assert R.relative_error(got, expected) < tol, R.relative_error(got, expected)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_against_unrolled_autograd(name, train, attention):
    assert_exact(meta_grads("maml", name, train=train, attention=attention), reference(name, attention, train=train))


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_every_entry_point_with_and_without_adapters(entry, name, adapter):
    expected = reference(name, adapter=adapter)
    if adapter == "lora+base":
        assert any("lora_" not in n and "modules_to_save" not in n for n in expected)  # the base is meta-learned
    assert_exact(meta_grads(entry, name, adapter), expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_binomial_and_truncated_of_order_k_are_exact(name):
    # adapters with the base meta-learned: the estimators' terms through other meta-parameters too
    exact = meta_grads("adapt", name, "lora+base")
    for estimator in (bo.Binomial(K), bo.Truncated(K)):
        assert_exact(meta_grads("adapt", name, "lora+base", estimator), exact)
    assert R.relative_error(meta_grads("adapt", name, "lora+base", bo.Binomial(1)), exact) > 1e-6  # the order matters here


def test_frozen_base_needs_allow_nograd():
    with pytest.raises(ValueError, match=r"requires_grad=False and cannot adapt\. Pass allow_nograd=True"):
        bo.MAML(build("bert", adapter="lora"), lr=LR)


@pytest.mark.cpu_only  # on CUDA, SDPA in float64 takes the math kernel by itself
def test_default_sdpa_kernel_has_no_second_derivative_outside_binom_opt():
    """The unrolled loop and higher fail on transformers' default attention, which binom_opt replays under SDPA's
    math kernel (test_exact_against_unrolled_autograd)."""
    model = build("bert")
    support, query = tasks("bert")
    names = adapted(model, "full")
    missing = r"derivative for .*scaled_dot_product.* is not implemented"
    with pytest.raises(RuntimeError, match=missing):
        R.unrolled_autograd(model, names, dict.fromkeys(names, LR), lambda f: loss(f, task(support, 0)), lambda f: loss(f, task(query, 0)), K)
    with pytest.raises(RuntimeError, match=missing):
        R.unrolled_higher(model, torch.optim.SGD(model.parameters(), lr=LR), lambda f: loss(f, task(support, 0)),
                          lambda f: loss(f, task(query, 0)), K)


CHECKPOINT = r"torch.utils.checkpoint.*Remove activation checkpointing"


@pytest.mark.parametrize("entry", ["maml", "adapt_batch-vmap", "meta_gradient"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradient_checkpointing_inside_the_model_is_refused(name, entry):
    model = build(name)
    model.gradient_checkpointing_enable()  # checkpoints the layers in train mode
    with pytest.raises(RuntimeError, match=CHECKPOINT):
        meta_grads(entry, name, model=model)
    assert all(p.grad is None for p in model.parameters())


def enable_input_require_grads(model):
    model.enable_input_require_grads()
    return model


@pytest.mark.parametrize("hook", {
    "gradient_checkpointing_enable-eval": lambda model: (model.gradient_checkpointing_enable(), model.eval())[1],
    "enable_input_require_grads": enable_input_require_grads,
}.items(), ids=lambda item: item[0])
def test_input_require_grads_hook_works_in_plain_replays_and_is_refused_clearly_under_torch_func(hook):
    """transformers' gradient_checkpointing_enable() also hooks a text model's input embeddings to call requires_grad_()
    on their output, as enable_input_require_grads() does; it stays in eval mode, where nothing is checkpointed. One
    task's HVPs run with plain autograd (from kept graphs, or replayed one point at a time), where the hook is harmless;
    points replayed under torch.func (a model too large to keep its graphs, and the vmapped tasks) refuse it: the error
    names the fix."""

    model = hook[1](build("bert"))
    assert_exact(meta_grads("adapt", "bert", model=model, train=model.training), reference("bert", train=model.training))
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"disable_input_require_grads\(\)"):
        meta_grads("adapt_batch-vmap", "bert", model=model, estimator=bo.Binomial(1))
    model.disable_input_require_grads()
    model.zero_grad(set_to_none=True)
    assert_exact(meta_grads("adapt", "bert", model=model, train=model.training), reference("bert", train=model.training))


def cached(m, data, prefix=4):
    """The loss of the tokens after ``prefix``, with the prefix's keys and values cached by a first call."""
    ids = data["input_ids"]
    cache = m(input_ids=ids[:, :prefix], use_cache=True).past_key_values
    return m(input_ids=ids[:, prefix:], past_key_values=cache, labels=ids[:, prefix:]).loss


@pytest.mark.parametrize("entry", ["maml", "adapt_batch-vmap"])
def test_key_value_cache_built_inside_the_closure_is_exact(entry):
    support, query = tasks("gpt2")
    model = build("gpt2", "eager")
    names = adapted(model, "full")
    expected = {}
    for b in range(B):
        one = R.unrolled_autograd(model, names, dict.fromkeys(names, LR), lambda f, b=b: cached(f, task(support, b)),
                                  lambda f, b=b: loss(f, task(query, b)), K)
        expected = {n: expected.get(n, 0) + g for n, g in one.items()}
    model = build("gpt2")
    if entry == "maml":
        maml = bo.MAML(model, lr=LR)
        for b in range(B):
            learner = maml.clone()
            for _ in range(K):
                learner.adapt(lambda m, b=b: cached(m, task(support, b)))
            loss(learner, task(query, b)).backward()
    else:
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K, memory_budget=None)
        engine.meta_backward(loss(engine.adapt_batch(cached, support), query).sum())
    assert_exact({n: p.grad for n, p in model.named_parameters()}, expected)


def test_key_value_cache_carried_between_calls_is_refused_clearly():
    """A cache made outside the closure grows at every call (the model appends to it), so no two calls of the closure
    take the same loss: binom_opt cannot replay it."""
    model = build("gpt2")
    support, query = tasks("gpt2")
    ids = support["input_ids"][0]
    with torch.no_grad():
        cache = model(input_ids=ids[:, :4], use_cache=True).past_key_values
    maml = bo.MAML(model, lr=LR)
    learner = maml.clone()
    for _ in range(K):
        learner.adapt(lambda m: m(input_ids=ids[:, 4:], past_key_values=cache, labels=ids[:, 4:]).loss)
    with pytest.raises(RuntimeError, match=r"not a pure function.*past_key_values.*build it inside the closure"):
        bo.meta_backward(loss(learner, task(query, 0)))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("entry", ["adapt_batch", "adapt_batch-vmap"])
def test_batched_learner_refuses_a_cache_in_the_outputs_clearly(entry):
    model = build("gpt2", use_cache=True)
    support, query = tasks("gpt2")
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K, **ENTRIES[entry])
    learners = engine.adapt_batch(loss, support)
    with pytest.raises(TypeError, match=r"DynamicCache.*use_cache=False"):
        learners(**query)


@pytest.mark.parametrize("entry", ["adapt_batch", "adapt_batch-vmap"])
def test_batched_learner_passes_arguments_that_are_not_tensors(entry):
    model = build("gpt2", use_cache=True)
    support, query = tasks("gpt2")
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.parameters(), lr=LR), K, **ENTRIES[entry])
    learners = engine.adapt_batch(lambda m, t: m(**t, use_cache=False).loss, support)
    engine.meta_backward(learners(**query, use_cache=False).loss.sum())
    assert_exact({n: p.grad for n, p in model.named_parameters()}, reference("gpt2"))


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_padding_masks(entry):
    assert_exact(meta_grads(entry, "bert", padded=True), reference("bert", padded=True))


def fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention by a fused kernel called directly, as flash-attention packages do: a first derivative only."""
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout, attn_mask=attention_mask,
                                                                     scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.cpu_only  # the CPU's flash kernel
def test_fused_kernel_without_second_derivative_is_refused_clearly():
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        pytest.skip("transformers without AttentionInterface")
    interface.register("fused_cpu", fused_attention)
    model = build("bert", "fused_cpu")
    with pytest.raises(RuntimeError, match=r"second derivative.*attn_implementation='sdpa'"):
        meta_grads("adapt", "bert", model=model)
    assert all(p.grad is None for p in model.parameters())
