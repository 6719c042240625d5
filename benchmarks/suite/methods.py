"""The methods a benchmark compares (peers' exact MAML and binom_opt's estimators) and one meta-step of each."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call

import binom_opt as bo
from binom_opt.functional import meta_gradient, meta_gradient_batched

from . import log
from .configs import Batch, Config, build_batch, build_model

IMPLICIT_REG = 1.0  # iMAML's lambda: it changes the meta-gradient, not the cost of one
OTHER_OBJECTIVES = ("Implicit", "Reptile")  # not estimates of MAML's meta-gradient: no error against it


@dataclass(frozen=True)
class Method:
    """A way to compute the meta-gradient: a peer's exact MAML or a binom_opt estimator."""

    slug: str  # the name --methods matches
    name: str  # the name in the table
    how: str  # "peer", "per-task" or "batched"
    estimator: str  # "Exact", "FirstOrder", "Truncated", "Binomial", "Hybrid", "Implicit" or "Reptile"
    L: Optional[int] = None
    C: Optional[int] = None
    checkpoint: bool = False  # checkpoint_every = round(sqrt(K)): the trajectory stores about 2 sqrt(K) points
    api: str = "engine"  # "engine" (MetaGradientEngine) or "functional" (binom_opt.functional)

    @property
    def exact(self) -> bool:
        return self.estimator == "Exact"


def estimator_specs(cfg: Config) -> List[Tuple[str, str, str, Optional[int], Optional[int]]]:
    """(slug, label, estimator, L, C) for each binom_opt estimator the config runs."""
    hl, hc = cfg.hybrid
    return [
        ("fo", "FirstOrder", "FirstOrder", 0, None),
        *[(f"trunc{L}", f"Truncated({L})", "Truncated", L, None) for L in cfg.levels],
        *[(f"binom{L}", f"Binomial({L})", "Binomial", L, None) for L in cfg.levels],
        (f"hybrid{hl}.{hc}", f"Hybrid({hl}, {hc})", "Hybrid", hl, hc),
        ("exact", "Exact", "Exact", cfg.steps, None),
        *[(f"imaml{L}", f"Implicit({L}, reg={IMPLICIT_REG:g})", "Implicit", L, None) for L in cfg.levels],
        ("reptile", "Reptile", "Reptile", 0, None),
    ]


def all_methods(cfg: Config) -> List[Method]:
    methods = [
        Method("higher", "higher exact", "peer", "Exact", cfg.steps),
        Method("autograd", "autograd exact", "peer", "Exact", cfg.steps),
    ]
    for how, suffix in (("per-task", "task"), ("batched", "batch")):
        for slug, label, estimator, L, C in estimator_specs(cfg):
            methods.append(Method(f"{slug}-{suffix}", f"{label} ({how})", how, estimator, L, C))
    methods.append(Method("exact-ckpt-task", "Exact, checkpointed (per-task)", "per-task", "Exact", cfg.steps, checkpoint=True))
    for how, suffix, call in (("per-task", "ftask", "meta_gradient"), ("batched", "fbatch", "meta_gradient_batched")):
        for slug, label, estimator, L, C in estimator_specs(cfg):
            if estimator not in OTHER_OBJECTIVES:
                methods.append(Method(f"{slug}-{suffix}", f"{label} ({call})", how, estimator, L, C, api="functional"))
    return methods


def batched_api_available() -> bool:
    return hasattr(bo.MetaGradientEngine, "adapt_batch")


def select_methods(methods: List[Method], patterns: Optional[List[str]]) -> List[Method]:
    """The methods whose slug matches one of the patterns (all without patterns), in table order."""
    if patterns:
        unmatched = [p for p in patterns if not any(fnmatch.fnmatch(m.slug, p) for m in methods)]
        if unmatched:
            raise SystemExit(f"--methods {unmatched} match none of: {' '.join(m.slug for m in methods)}")
        methods = [m for m in methods if any(fnmatch.fnmatch(m.slug, p) for p in patterns)]
    if not batched_api_available() and any(m.how == "batched" for m in methods):
        log("skipping the batched methods: this binom_opt has no MetaGradientEngine.adapt_batch")
        methods = [m for m in methods if m.how != "batched"]
    return methods


def make_estimator(method: Method) -> bo.Estimator:
    if method.estimator == "FirstOrder":
        return bo.FirstOrder()
    if method.estimator == "Truncated":
        return bo.Truncated(method.L)
    if method.estimator == "Binomial":
        return bo.Binomial(method.L)
    if method.estimator == "Hybrid":
        return bo.Hybrid(method.L, method.C)
    if method.estimator == "Implicit":
        return bo.Implicit(method.L, IMPLICIT_REG)
    if method.estimator == "Reptile":
        return bo.Reptile()
    return bo.Exact()



MetaStep = Callable[[], Tuple[Optional[int], bool]]


def make_higher_step(model: torch.nn.Module, batch: Batch, cfg: Config) -> MetaStep:
    import higher

    (xs, ys), (xq, yq) = batch
    B, inner_opt = xs.shape[0], torch.optim.SGD(model.parameters(), lr=cfg.lr)

    def step():
        model.zero_grad(set_to_none=True)
        for t in range(B):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(cfg.steps):
                    diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
                (F.cross_entropy(fmodel(xq[t]), yq[t]) / B).backward()
        return None, False

    return step


def make_autograd_step(model: torch.nn.Module, batch: Batch, cfg: Config) -> MetaStep:
    (xs, ys), (xq, yq) = batch
    B = xs.shape[0]

    def adapted(x, y):
        params = dict(model.named_parameters())
        for _ in range(cfg.steps):
            loss = F.cross_entropy(functional_call(model, params, (x,)), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {name: p - cfg.lr * g for (name, p), g in zip(params.items(), grads)}
        return params

    def step():
        model.zero_grad(set_to_none=True)
        for t in range(B):
            params = adapted(xs[t], ys[t])
            (F.cross_entropy(functional_call(model, params, (xq[t],)), yq[t]) / B).backward()
        return None, False

    return step


def make_engine(model: torch.nn.Module, cfg: Config, method: Method, engine_options: dict) -> bo.MetaGradientEngine:
    """``engine_options``: extra keyword arguments of the engines (``memory_budget``, ``compile_hvps``)."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    if method.checkpoint:
        engine_options = {**engine_options, "checkpoint_every": max(1, round(math.sqrt(cfg.steps)))}
    if method.estimator == "Implicit":  # a broken-down CG costs the same: time it, and flag it in the table
        engine_options = {**engine_options, "nan_policy": "skip_task"}
    return bo.MetaGradientEngine(model, inner_opt, steps=cfg.steps, estimator=make_estimator(method), **engine_options)


def make_per_task_step(model: torch.nn.Module, batch: Batch, cfg: Config, method: Method, engine_options: dict) -> MetaStep:
    (xs, ys), (xq, yq) = batch
    B, engine = xs.shape[0], make_engine(model, cfg, method, engine_options)

    def step():
        model.zero_grad(set_to_none=True)
        hvps, diverging = 0, False
        for t in range(B):
            learner = engine.adapt(lambda m, x=xs[t], y=ys[t]: F.cross_entropy(m(x), y))
            (F.cross_entropy(learner(xq[t]), yq[t]) / B).backward()
            hvps += engine.last_stats.hvp_count
            diverging |= flagged(engine.last_stats)
        return hvps, diverging

    return step


def make_functional_step(model: torch.nn.Module, batch: Batch, cfg: Config, method: Method, engine_options: dict) -> MetaStep:
    """``meta_gradient`` in a loop over the tasks, or one ``meta_gradient_batched``; the mean over the tasks into ``.grad``."""
    (xs, ys), (xq, yq) = batch
    B, estimator = xs.shape[0], make_estimator(method)
    options = {**engine_options, **({"checkpoint_every": max(1, round(math.sqrt(cfg.steps)))} if method.checkpoint else {})}
    loss = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)

    def step():
        model.zero_grad(set_to_none=True)
        params = {n: p.detach() for n, p in model.named_parameters()}
        if method.how == "batched":
            grads, stats = meta_gradient_batched(lambda p, t: loss(p, t[0], t[1]), lambda p, t: loss(p, t[2], t[3]), params,
                                                 (xs, ys, xq, yq), steps=cfg.steps, lr=cfg.lr, estimator=estimator,
                                                 return_stats=True, **options)
            means, hvps, diverging = {n: g.mean(0) for n, g in grads.items()}, stats.hvp_count, flagged(stats)
        else:  # the loop meta_gradient_batched replaces: each task's meta-gradient, kept, then stacked
            per_task, hvps, diverging = [], 0, False
            for t in range(B):
                grads, stats = meta_gradient(lambda p, x=xs[t], y=ys[t]: loss(p, x, y), lambda p, x=xq[t], y=yq[t]: loss(p, x, y),
                                             params, steps=cfg.steps, lr=cfg.lr, estimator=estimator, return_stats=True, **options)
                per_task.append(grads)
                hvps, diverging = hvps + stats.hvp_count, diverging or flagged(stats)
            means = {n: torch.stack([g[n] for g in per_task]).mean(0) for n in params}
        for n, p in model.named_parameters():
            p.grad = means[n]
        return hvps, diverging

    return step


def make_batched_step(model: torch.nn.Module, batch: Batch, cfg: Config, method: Method, engine_options: dict) -> MetaStep:
    (xs, ys), (xq, yq) = batch
    engine = make_engine(model, cfg, method, engine_options)

    def step():
        model.zero_grad(set_to_none=True)
        learners = engine.adapt_batch(lambda m, task: F.cross_entropy(m(task[0]), task[1]), (xs, ys))
        logits = learners(xq)  # [B, Q, ways]
        F.cross_entropy(logits.flatten(0, 1), yq.flatten()).backward()
        return engine.last_stats.hvp_count, flagged(engine.last_stats)

    return step


def flagged(stats: bo.MetaGradientStats) -> bool:
    """What the table flags: a binomial series that grows with the order, or a conjugate gradient that broke down."""
    return stats.diverging or stats.unreliable_solve


def make_step(method: Method, model: torch.nn.Module, batch: Batch, cfg: Config, engine_options: dict) -> MetaStep:
    if method.slug == "higher":
        return make_higher_step(model, batch, cfg)
    if method.slug == "autograd":
        return make_autograd_step(model, batch, cfg)
    if method.api == "functional":
        return make_functional_step(model, batch, cfg, method, engine_options)
    if method.how == "per-task":
        return make_per_task_step(model, batch, cfg, method, engine_options)
    return make_batched_step(model, batch, cfg, method, engine_options)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])



def float64_gradient(method: Method, cfg: Config, device: torch.device, error_tasks: Optional[int], engine_options: dict) -> torch.Tensor:
    """The method's meta-gradient of the fixed meta-batch (its first ``error_tasks`` tasks) in float64."""
    model = build_model(cfg, device).double()
    (xs, ys), (xq, yq) = build_batch(cfg, device)
    n = error_tasks or cfg.meta_batch
    batch = ((xs[:n].double(), ys[:n]), (xq[:n].double(), yq[:n]))
    make_step(method, model, batch, cfg, engine_options)()
    return flat_grad(model).cpu()

