"""MAML on Omniglot with binom_opt: every Conv4 parameter adapts in the inner loop (Finn et al., 2017).

The same flags, report and checkpoints as ``omniglot_anil.py``; what differs is what adapts, so
every inner step and HVP goes through the whole network. The defaults are a short CPU run;
``--preset paper`` is the standard protocol for a GPU.

    python examples/omniglot_maml.py                                   # a short CPU run
    python examples/omniglot_maml.py --estimator exact --out runs/maml_exact
    python examples/omniglot_maml.py --preset paper --device cuda --task-batched
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

# Full MAML takes its HVPs through the whole network: the CPU run is short (meta-batch 4, 5 queries).
DEFAULTS = dict(iterations=300, meta_batch=4, queries=5, eval_every=100, checkpoint_every=100, out=Path("runs/omniglot_maml"))
PRESETS = {"paper": dict(ways=5, shots=1, queries=15, steps=5, eval_steps=10, inner_lr=0.4, meta_batch=32, iterations=60000,
                         eval_every=1000, val_tasks=600, checkpoint_every=1000)}


def meta_step(model, engine, meta_opt, batch, args, rank=0, world=1):
    """One meta-gradient of a meta-batch and one Adam step; the mean query loss and accuracy of its tasks, and
    whether the binomial series of one of them diverged."""
    x_s, y_s, x_q, y_q = batch
    tasks = bo.distributed.shard(len(x_s), rank, world)
    meta_opt.zero_grad(set_to_none=True)
    if args.task_batched:  # every task at once: one vmapped call per inner step and per HVP round
        learners = engine.adapt_batch(lambda m, task: F.cross_entropy(m(task[0]), task[1]), (x_s[tasks], y_s[tasks]))
        logits = learners(x_q[tasks])  # [tasks, queries, ways]
        (F.cross_entropy(logits.flatten(0, 1), y_q[tasks].flatten()) * len(tasks) / len(x_s)).backward()
        diverging = engine.last_stats.diverging
    else:
        logits, diverging = [], False
        for t in tasks:
            learner = engine.adapt(lambda m, x=x_s[t], y=y_s[t]: F.cross_entropy(m(x), y))  # K steps, no graph kept
            logits.append(learner(x_q[t]))
            (F.cross_entropy(logits[-1], y_q[t]) / len(x_s)).backward()  # the estimator's meta-gradient lands in .grad
            diverging |= engine.last_stats.diverging
        logits = torch.stack(logits)
    bo.distributed.all_reduce_gradients(model.parameters())  # under torchrun: the meta-batch's meta-gradient everywhere
    meta_opt.step()
    return meta_batch_numbers(logits, y_q[tasks], diverging, engine, len(x_s), world)


def evaluate(model, tasks, count, steps, lr, device):
    """Accuracy after ``steps`` plain SGD steps of every parameter on each task's support set, with its 95% CI."""
    accuracies = []
    for _ in range(count):
        x_s, y_s, x_q, y_q = (t.to(device) for t in tasks.sample())
        params = {n: p.detach() for n, p in model.named_parameters()}
        for _ in range(steps):
            params = {n: p.requires_grad_(True) for n, p in params.items()}
            loss = F.cross_entropy(torch.func.functional_call(model, params, (x_s,)), y_s)
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}
        with torch.no_grad():
            accuracies.append(float((torch.func.functional_call(model, params, (x_q,)).argmax(1) == y_q).float().mean()))
    return confidence(accuracies)


def main(argv=None):
    args = parse(common_parser(__doc__, DEFAULTS, PRESETS), argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = bo.distributed.init_from_env(torch.device(args.device))
    splits = load_tasks(args)  # the data, or a short error that says how to get it
    torch.manual_seed(args.seed)
    return meta_train(Conv4(out_features=args.ways, hidden=args.hidden), splits, args, rank, world)


def meta_train(model, splits, args, rank=0, world=1, dataset="Omniglot"):
    """MAML: meta-train ``model`` on tasks of ``splits`` with the estimator the flags name, then meta-test it."""
    device = torch.device(args.device)
    model = model.to(device)
    estimator = make_estimator(args)
    run = Run(args, "MAML", estimator, splits, rank, world, dataset)
    inner_opt = torch.optim.SGD(model.parameters(), lr=args.inner_lr)  # what adapts: every parameter
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
