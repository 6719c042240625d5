"""What the dataset-distillation example shares with its tests and the float32 benchmark: the characters and their
drawings, the small ConvNet, training it from scratch, and one meta-step's peak memory in a child process.

>>> net = ConvNet(classes=10)
>>> net(torch.zeros(3, 1, 28, 28)).shape
torch.Size([3, 10])
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .omniglot import OmniglotCharacters, maml_split

__all__ = ["ConvNet", "Characters", "train_from_scratch", "accuracy", "confidence", "peak_memory_in_child"]


class ConvNet(nn.Module):
    """Two strided 3x3 convolutions with ReLU and a linear head: 28x28 -> 14x14 -> 7x7 -> logits.

    Small on purpose: a distilled image set must train it from a random initialisation in hundreds of SGD steps,
    and the meta-gradient goes through every one of them.
    """

    def __init__(self, classes: int, hidden: int = 16, image_size: int = 28):
        super().__init__()
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.features = nn.Sequential(nn.Conv2d(1, hidden, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, 2 * hidden, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(2 * hidden * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def random_init(net: nn.Module, seed: int) -> dict:
    """A fresh random initialisation of ``net``'s parameters (PyTorch's default init), as a dict of tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in net.modules():
            if module is not net and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return {n: p.detach().clone() for n, p in net.named_parameters()}


@dataclass(frozen=True, eq=False)
class Characters:
    """``classes`` Omniglot characters of the meta-test split, drawn with ``seed``; the first ``train_drawings``
    drawings of each (shuffled per character) are the real training data, the others are held out for testing.

    ``train`` and ``test`` are float32 (classes, drawings, 1, 28, 28) in [0, 1], 1 = ink; ``names`` the characters.
    """

    train: torch.Tensor
    test: torch.Tensor
    names: tuple

    @classmethod
    def load(cls, classes: int, seed: int, train_drawings: int = 10, data_root=None, cache_dir=None,
             download: bool = True, verbose: bool = True, allow_modified: bool = False) -> Characters:
        omniglot = OmniglotCharacters.load(data_root, cache_dir=cache_dir, download=download, verbose=verbose,
                                           allow_modified=allow_modified)
        pool = maml_split(0)["test"]
        if not 2 <= classes <= len(pool):
            raise ValueError(f"classes must be between 2 and {len(pool)} (the meta-test characters), got {classes}")
        if not 1 <= train_drawings < omniglot.images.shape[1]:
            raise ValueError(f"train_drawings must be between 1 and {omniglot.images.shape[1] - 1}, got {train_drawings}")
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(pool, classes, replace=False))
        order = np.stack([rng.permutation(omniglot.images.shape[1]) for _ in chosen])
        images = omniglot.images[chosen[:, None], order].float().div(255).unsqueeze(2)
        names = tuple(f"{omniglot.alphabets[c]}/{omniglot.characters[c]}" for c in chosen)
        return cls(images[:, :train_drawings], images[:, train_drawings:], names)

    @property
    def classes(self) -> int:
        return len(self.train)

    def flat(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All images of ``"train"`` or ``"test"`` as (N, 1, 28, 28) with their labels."""
        images = getattr(self, part)
        return images.flatten(0, 1), torch.arange(self.classes).repeat_interleave(images.shape[1])

    def random_real(self, per_class: int, seed: int) -> torch.Tensor:
        """``per_class`` training drawings of every class, chosen at random: (classes * per_class, 1, 28, 28)."""
        g = torch.Generator().manual_seed(seed)
        picks = torch.stack([torch.randperm(self.train.shape[1], generator=g)[:per_class] for _ in range(self.classes)])
        return self.train[torch.arange(self.classes)[:, None], picks].flatten(0, 1)


def train_from_scratch(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, seed: int) -> dict:
    """``steps`` plain SGD steps of ``net`` from random initialisation ``seed`` on ``images`` (the whole set each
    step, as in the meta-training inner loop); the trained parameters."""
    params = random_init(net, seed)
    images = images.detach()
    for _ in range(steps):
        params = {n: p.requires_grad_(True) for n, p in params.items()}
        loss = F.cross_entropy(torch.func.functional_call(net, params, (images,)), labels)
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}
    return params


def accuracy(net: nn.Module, params: dict, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.func.functional_call(net, params, (images,)).argmax(1) == labels).float().mean())


def confidence(values) -> dict:
    """Mean with the half-width of its 95% confidence interval (Student's t over the runs)."""
    x = torch.tensor(list(values), dtype=torch.float64)
    n = len(x)
    half = float(_T95.get(n - 1, 1.96) * x.std() / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": float(x.mean()), "ci95": half, "runs": n}


_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20, 12: 2.18,
        13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09, 20: 2.09, 24: 2.06, 29: 2.05}


# ------------------------------------------------------------------ one meta-step's peak memory, in a child process

_MMAP_THRESHOLD, _M_MMAP_THRESHOLD = 131072, -3  # glibc's mallopt: map every tensor above 128 KiB on its own


def peak_memory_in_child(job: dict) -> dict:
    """Run ``job`` (see :func:`_child`) in a fresh process and return ``{"peak_mib", "seconds"}`` or ``{"error"}``.

    The child fixes glibc's mmap threshold, so that freed tensors leave the resident set and its peak follows the
    live tensors (with the adaptive default it creeps up with the number of allocations), runs a 3-step meta-step as
    a warm-up (library code run for the first time is then not counted), resets the peak (``/proc/self/clear_refs``)
    and reports the peak resident memory of one meta-step above the resident memory before it.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        try:
            return pool.apply(_child, (job,))
        except Exception as e:  # a child that failed is a row that says so, not a lost run
            return {"error": f"{type(e).__name__}: {e}"}


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))


def _child(job: dict) -> dict:
    import gc
    import time
    import warnings

    import binom_opt as bo

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    torch.set_num_threads(job["threads"])
    warnings.simplefilter("ignore", bo.ExpansionDivergenceWarning)
    net = ConvNet(job["classes"], job["hidden"])
    step = meta_step_function(job["method"], net, job)
    step(3)  # warm-up: library code run for the first time is not the method's memory
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before, tic = _rss(), time.perf_counter()
    step(job["steps"])
    return {"peak_mib": (_hwm() - before) / 2**20, "seconds": time.perf_counter() - tic}


def meta_step_function(method: str, net: nn.Module, job: dict):
    """``step(K)``: one meta-gradient of the synthetic images through K SGD steps from a random init, by ``method``:
    ``"higher"`` (unrolled, differentiable optimizer) or ``"exact"`` (binom_opt's graph-free Exact, with
    ``job["checkpoint_every"]``)."""
    import binom_opt as bo
    from binom_opt.functional import meta_gradient

    images = job["images"].clone().requires_grad_(True)
    labels = torch.arange(job["classes"]).repeat_interleave(len(images) // job["classes"])
    real, real_labels = job["real"], job["real_labels"]

    def step(steps: int):
        images.grad = None
        params = random_init(net, 0)
        if method == "higher":
            import higher

            for p, value in zip(net.parameters(), params.values()):
                p.data.copy_(value)
            with higher.innerloop_ctx(net, torch.optim.SGD(net.parameters(), lr=job["lr"]), copy_initial_weights=False,
                                      track_higher_grads=True) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fnet(images), labels))
                F.cross_entropy(fnet(real), real_labels).backward()
        else:
            every = job.get("checkpoint_every")
            every = max(1, round(math.sqrt(steps))) if every == "sqrt" else every
            call = lambda p, x: torch.func.functional_call(net, p, (x,))
            images.grad = meta_gradient(lambda p: F.cross_entropy(call(p, images), labels),
                                        lambda p: F.cross_entropy(call(p, real), real_labels), params, steps=steps,
                                        lr=job["lr"], estimator=bo.Exact(), meta_params={"images": images},
                                        checkpoint_every=every, memory_budget=job["memory_budget"])["images"]
        return images.grad
    return step
