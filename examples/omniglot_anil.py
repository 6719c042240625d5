"""ANIL on Omniglot, meta-trained with binom_opt's binomial meta-gradient: the README's main example.

ANIL (Raghu et al., 2020): the Conv4 body is meta-learned and only its linear head adapts to each
task; the body's meta-gradient flows through the support features. The defaults fit a 2-core CPU
in under 10 minutes (5-way 1-shot); ``--preset 20way`` is 20-way 1-shot in about 10 minutes, and
``--preset paper`` the standard protocol for a GPU (meta-batch 32, 60000 iterations).

    python examples/omniglot_anil.py                                  # the main example (CPU)
    python examples/omniglot_anil.py --estimator trunc --L 1 --out runs/anil_trunc
    python examples/omniglot_anil.py --preset paper --device cuda --task-batched
    torchrun --standalone --nproc_per_node 2 examples/omniglot_anil.py   # the meta-batch over 2 processes
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import binom_opt as bo

from fewshot.models import Conv4
from fewshot.run import Run, common_parser, confidence, load_tasks, make_estimator, meta_batch_numbers, parse, sampler

# Measured on a 2-core CPU (README, "Results"): about 0.11 s per iteration with 2 threads; a small meta-batch with
# many iterations learned fastest per second, and alpha = 0.1 beat 0.4 (the head's alpha * ||H|| is large at 0.4).
DEFAULTS = dict(iterations=3000, meta_batch=4, queries=5, inner_lr=0.1, eval_every=500, checkpoint_every=500,
                out=Path("runs/omniglot_anil"))
PRESETS = {
    "20way": dict(ways=20, queries=5, meta_batch=2, iterations=3000, inner_lr=0.1, out=Path("runs/omniglot_anil_20way")),
    "paper": dict(ways=5, shots=1, queries=15, steps=5, eval_steps=10, inner_lr=0.4, meta_batch=32, iterations=60000,
                  eval_every=1000, val_tasks=600, checkpoint_every=1000),
}


def head(learner, features):
    """The adapted head on the body's features: the support loss needs only the head's parameters."""
    return F.linear(features, learner.params["head.weight"], learner.params["head.bias"])


def meta_step(model, engine, meta_opt, batch, args, rank=0, world=1):
    """One meta-gradient of a meta-batch and one Adam step; the mean query loss and accuracy of its tasks, and
    whether the binomial series of one of them diverged."""
    x_s, y_s, x_q, y_q = batch
    tasks = bo.distributed.shard(len(x_s), rank, world)  # under torchrun each rank takes a share of the tasks
    meta_opt.zero_grad(set_to_none=True)
    if args.task_batched:  # every task at once: one vmapped call per inner step and per HVP round
        features = torch.func.vmap(model.features)(x_s[tasks])  # each task's own BatchNorm statistics
        learners = engine.adapt_batch(lambda m, task: F.cross_entropy(head(m, task[0]), task[1]), (features, y_s[tasks]))
        logits = learners(x_q[tasks])  # [tasks, queries, ways]
        (F.cross_entropy(logits.flatten(0, 1), y_q[tasks].flatten()) * len(tasks) / len(x_s)).backward()
        diverging = engine.last_stats.diverging
    else:
        logits, diverging = [], False
        for t in tasks:
            features = model.features(x_s[t])  # the body, once per task; its meta-gradient reaches the body through these
            learner = engine.adapt(lambda m, f=features, y=y_s[t]: F.cross_entropy(head(m, f), y))  # K steps
            logits.append(learner(x_q[t]))
            (F.cross_entropy(logits[-1], y_q[t]) / len(x_s)).backward()  # the meta-gradient lands in .grad, body included
            diverging |= engine.last_stats.diverging
        logits = torch.stack(logits)
    bo.distributed.all_reduce_gradients(model.parameters())  # under torchrun: the meta-batch's meta-gradient everywhere
    meta_opt.step()
    return meta_batch_numbers(logits, y_q[tasks], diverging, engine, len(x_s), world)


def evaluate(model, tasks, count, steps, lr, device):
    """Accuracy after ``steps`` plain SGD steps of the head on each task's support set, with its 95% CI."""
    accuracies = []
    for _ in range(count):
        x_s, y_s, x_q, y_q = (t.to(device) for t in tasks.sample())
        with torch.no_grad():
            support, query = model.features(x_s), model.features(x_q)
        w, b = model.head.weight.detach().clone(), model.head.bias.detach().clone()
        for _ in range(steps):
            w.requires_grad_(True), b.requires_grad_(True)
            gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(support, w, b), y_s), (w, b))
            w, b = (w - lr * gw).detach(), (b - lr * gb).detach()
        accuracies.append(float((F.linear(query, w, b).argmax(1) == y_q).float().mean()))
    return confidence(accuracies)


def main(argv=None):
    parser = common_parser(__doc__, DEFAULTS, PRESETS)
    args = parse(parser, argv)
    if args.estimator == "reptile":
        parser.error("--estimator reptile moves only what adapts, and in ANIL the body does not: use omniglot_maml.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rank, world = bo.distributed.init_from_env(device)  # (0, 1) without torchrun
    splits = load_tasks(args)  # the data, or a short error that says how to get it
    estimator = make_estimator(args)
    run = Run(args, "ANIL", estimator, splits, rank, world)

    torch.manual_seed(args.seed)
    model = Conv4(out_features=args.ways, hidden=args.hidden).to(device)
    inner_opt = torch.optim.SGD(model.head.parameters(), lr=args.inner_lr)  # what adapts: the head
    engine = bo.MetaGradientEngine(model, inner_opt, steps=args.steps, estimator=estimator, nan_policy=args.nan_policy)
    meta_opt = torch.optim.Adam(model.parameters(), lr=args.meta_lr)
    train = sampler(splits["train"], args, args.seed)
    if args.resume:
        run.restore(model, meta_opt, train)

    evaluate_on = functools.partial(evaluate, model, steps=args.eval_steps, lr=args.inner_lr, device=device)
    run.train(model, meta_opt, train, lambda batch: meta_step(model, engine, meta_opt, batch, args, rank, world), evaluate_on,
              device)
    return run.finish(evaluate_on, model)  # the meta-test, results.json, curves.png and the summary table


if __name__ == "__main__":
    main()
