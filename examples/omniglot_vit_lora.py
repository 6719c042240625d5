"""A small ViT meta-learned on Omniglot that adapts to each task through LoRA adapters (Hugging Face + peft).

The base is a Vision Transformer built from ``transformers.ViTConfig`` (random init, no download):
the 28x28 drawings cut into 7x7 patches (16 patches and a CLS token), width 64, 2 layers of 4 heads,
dropout 0, Hugging Face's default attention (SDPA; binom_opt replays it under the math kernel, which
has second derivatives). ``peft.get_peft_model`` puts LoRA adapters of rank ``--lora-rank`` on the
query and value projections of every layer. What adapts to a task in the inner loop: the LoRA
adapters and the classifier head. What is meta-learned: everything, the base included. The base is
not in the inner optimizer: it requires grad, the support loss uses it, and the engine gives it its
meta-gradient through that closure; the adapters' and the head's initial values get theirs too.

    python examples/omniglot_vit_lora.py                                 # 5-way 1-shot, under 10 min on 2 CPU cores
    python examples/omniglot_vit_lora.py --estimator exact --out runs/vit_exact
    python examples/omniglot_vit_lora.py --layers 4 --lora-rank 8 --iterations 500

The flags, progress bar, checkpoints, ``results.json``, ``curves.png`` and summary table are the
Omniglot examples' (``examples/fewshot/run.py``); ``--hidden`` is the ViT's width. Needs
``pip install transformers peft``.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import binom_opt as bo

from fewshot.run import Run, common_parser, confidence, load_tasks, make_estimator, meta_batch_numbers, parse, sampler

# A 2-core CPU budget: 0.37 s per iteration, 6.6 minutes in all with the 600-task meta-test (measured on a busy 2-core
# Xeon: docs/examples.md). One thread: a tiny ViT's kernels are too small to share, and with two threads on a busy 2-core
# machine one meta-step measured 30x slower (OpenMP threads waiting on each other) than with one. At alpha = 0.4 the
# adapters and the head diverged (21 % after 300 iterations, against 60 % at 0.1); the adapters alone, under a head
# that does not adapt, stayed at chance (21 %), and the head alone reached 58 %.
DEFAULTS = dict(iterations=1000, meta_batch=4, queries=5, inner_lr=0.1, eval_every=250, checkpoint_every=250, threads=1,
                out=Path("runs/omniglot_vit_lora"), network="vit-lora")
PRESETS = {
    "paper": dict(ways=5, shots=1, queries=15, steps=5, eval_steps=10, meta_batch=32, iterations=60000, eval_every=1000,
                  val_tasks=600, checkpoint_every=1000),
}
LORA_TARGETS = ["q_proj", "v_proj"]  # the attention's query and value projections (transformers >= 5 names)


def build_model(ways: int, hidden: int = 64, layers: int = 2, heads: int = 4, lora_rank: int = 4, image_size: int = 28,
                patch_size: int = 7, attn_implementation: str | None = None) -> torch.nn.Module:
    """The ViT with LoRA adapters, every parameter requiring grad (the base is meta-learned as well).

    ``attn_implementation`` None is Hugging Face's default (SDPA); ``"eager"`` is the reference the tests compare with.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=1, hidden_size=hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=ways,
                       **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    vit = ViTForImageClassification(config)
    with warnings.catch_warnings():  # peft asks transformers >= 5 for a property it deprecated: nothing a user can change
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(vit, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS, lora_dropout=0.0))
    model.requires_grad_(True)  # peft freezes the base for fine-tuning; here the base is meta-learned
    return model


ADAPT = {"lora+head": ("lora_", ".classifier."), "lora": ("lora_",), "head": (".classifier.",)}


def adapted_parameters(model: torch.nn.Module, adapt: str = "lora+head") -> list:
    """What adapts in the inner loop: the LoRA adapters and the classifier head (``adapt``: one of ``ADAPT``)."""
    return [p for n, p in model.named_parameters() if any(part in n for part in ADAPT[adapt])]


def logits(m, images: torch.Tensor) -> torch.Tensor:
    return m(pixel_values=images).logits


def meta_gradient(engine, batch, tasks):
    """The meta-gradient of the meta-batch's tasks ``tasks`` into ``.grad`` (base, adapters' and head's initial
    values); their query logits and whether a binomial series diverged."""
    x_s, y_s, x_q, y_q = batch
    out, diverging = [], False
    for t in tasks:
        learner = engine.adapt(lambda m, x=x_s[t], y=y_s[t]: F.cross_entropy(logits(m, x), y))  # K steps, no graph kept
        out.append(logits(learner, x_q[t]))
        (F.cross_entropy(out[-1], y_q[t]) / len(x_s)).backward()  # the base's meta-gradient comes through the closure
        diverging |= engine.last_stats.diverging
    return torch.stack(out), diverging


def meta_step(model, engine, meta_opt, batch, rank=0, world=1):
    """One meta-gradient of a meta-batch and one Adam step; the mean query loss and accuracy of its tasks, and
    whether the binomial series of one of them diverged."""
    tasks = bo.distributed.shard(len(batch[0]), rank, world)  # under torchrun each rank takes a share of the tasks
    meta_opt.zero_grad(set_to_none=True)
    out, diverging = meta_gradient(engine, batch, tasks)
    bo.distributed.all_reduce_gradients(model.parameters())
    meta_opt.step()
    return meta_batch_numbers(out, batch[3][tasks], diverging, engine, len(batch[0]), world)


def evaluate(model, tasks, count, steps, lr, device, adapt="lora+head"):
    """Accuracy after ``steps`` plain SGD steps of what adapts on each task's support set, with its 95% CI."""
    names = {id(p) for p in adapted_parameters(model, adapt)}
    adapted = {n: p.detach() for n, p in model.named_parameters() if id(p) in names}
    accuracies = []
    for _ in range(count):
        x_s, y_s, x_q, y_q = (t.to(device) for t in tasks.sample())
        params = dict(adapted)
        for _ in range(steps):
            params = {n: p.requires_grad_(True) for n, p in params.items()}
            loss = F.cross_entropy(torch.func.functional_call(model, params, (), {"pixel_values": x_s}, strict=False).logits, y_s)
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}
        with torch.no_grad():
            out = torch.func.functional_call(model, params, (), {"pixel_values": x_q}, strict=False).logits
        accuracies.append(float((out.argmax(1) == y_q).float().mean()))
    return confidence(accuracies)


def main(argv=None):
    parser = common_parser(__doc__, DEFAULTS, PRESETS)
    parser.add_argument("--layers", type=int, default=2, help="transformer layers of the ViT")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per layer")
    parser.add_argument("--lora-rank", type=int, default=4, help="rank r of the LoRA adapters")
    parser.add_argument("--adapt", choices=sorted(ADAPT), default="lora+head", help="what adapts to each task")
    args = parse(parser, argv)
    if args.task_batched:
        parser.error("--task-batched: this example adapts task by task (engine.adapt)")
    if args.estimator == "reptile":
        parser.error("--estimator reptile moves only what adapts, and here the base does not")
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: this example needs transformers and peft ({e}): pip install transformers peft") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rank, world = bo.distributed.init_from_env(device)
    splits = load_tasks(args)  # the data, or a short error that says how to get it
    estimator = make_estimator(args)
    run = Run(args, "ViT-LoRA", estimator, splits, rank, world)

    torch.manual_seed(args.seed)
    model = build_model(args.ways, args.hidden, args.layers, args.heads, args.lora_rank).to(device)
    inner_opt = torch.optim.SGD(adapted_parameters(model, args.adapt), lr=args.inner_lr)  # the adapters and the head
    engine = bo.MetaGradientEngine(model, inner_opt, steps=args.steps, estimator=estimator, nan_policy=args.nan_policy)
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    train = sampler(splits["train"], args, args.seed)
    if args.resume:
        run.restore(model, meta_opt, train)

    evaluate_on = functools.partial(evaluate, model, steps=args.eval_steps, lr=args.inner_lr, device=device, adapt=args.adapt)
    run.train(model, meta_opt, train, lambda batch: meta_step(model, engine, meta_opt, batch, rank, world), evaluate_on, device)
    return run.finish(evaluate_on, model)  # the meta-test, results.json, curves.png and the summary table


if __name__ == "__main__":
    main()
