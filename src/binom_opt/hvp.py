"""Hessian-vector product backends: batched HVPs at many trajectory points in one call.

Two ways to differentiate twice with ``torch.func``:

* ``"rev"``: reverse-over-reverse, ``vjp`` of ``grad``. Works through every loss we know of.
* ``"fwd"``: forward-over-reverse, ``jvp`` of ``grad``. Often leaner in memory, but forward-mode
  AD is missing or broken for some operators (in torch 2.13, ``F.mse_loss`` fails with
  "ZeroTensors are immutable").

``"auto"`` is ``"rev"``: it never hits those forward-mode gaps, and it measured ~25% faster
than ``"fwd"`` for Conv4 on an H100.

An oracle made here answers ``oracle(range_of_steps, stacked_vectors)`` with the stacked
``H_j v_j``, vmapping one HVP over the requested trajectory points (``chunk_size`` bounds how
many run at once).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch.func import grad, jvp, vjp, vmap

from .memory import Chunking, activation_bytes, check_chunk_size
from .trajectory import add_note

Tensors = Dict[str, torch.Tensor]
LossFn = Callable[[Tensors], torch.Tensor]

__all__ = ["HVP_MODES", "HVPBackendError", "resolve_hvp_mode", "hvp_function", "trajectory_hvp_oracle", "check_chunk_size", "check_randomness", "explained_replay_errors", "compiled"]

HVP_MODES = ("auto", "rev", "fwd")


class HVPBackendError(RuntimeError):
    """An HVP backend failed inside PyTorch for a reason that another backend avoids."""


def resolve_hvp_mode(mode: str) -> str:
    """Validate an ``hvp=`` argument and return the concrete backend (``"rev"`` or ``"fwd"``)."""
    if mode not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}, got {mode!r}.")
    return "rev" if mode == "auto" else mode


def hvp_function(loss_fn: LossFn, mode: str) -> Callable[[Tensors, Tensors], Tensors]:
    """Return ``hvp(point, vector) -> H(point) @ vector`` for the scalar ``loss_fn`` of a dict.

    Example:
        >>> import torch
        >>> from binom_opt.hvp import hvp_function
        >>> f = lambda p: (p["w"] ** 3).sum()           # Hessian diag(6 w)
        >>> hvp = hvp_function(f, "rev")
        >>> hvp({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 1.0])})["w"]
        tensor([ 6., 12.])
    """
    mode = resolve_hvp_mode(mode)
    gradient = grad(loss_fn)
    if mode == "rev":

        def hvp(point: Tensors, vector: Tensors) -> Tensors:
            return vjp(gradient, point)[1](vector)[0]

    else:

        def hvp(point: Tensors, vector: Tensors) -> Tensors:
            return jvp(gradient, (point,), (vector,))[1]

    return hvp


def trajectory_hvp_oracle(
    loss_fn: Union[LossFn, Sequence[LossFn]],
    points: Tensors,
    mode: str = "auto",
    chunk_size: Optional[int] = None,
    randomness: str = "error",
    memory_budget: Union[None, int, str] = None,
    compile_hvps: bool = False,
):
    """An oracle for :func:`binom_opt.expansion.expand` over recorded trajectory points.

    Args:
        loss_fn: the inner (support) loss as a pure function of a dict of parameters, or one
            such function per step (when the steps used different closures). Steps that share
            a function are vmapped together.
        points: the trajectory, each entry stacked along a leading step dimension.
        mode: HVP backend, see the module docstring.
        chunk_size: at most this many HVPs at once (``None``: a round's HVPs at once).
        randomness: passed to ``torch.func.vmap`` (``"error"``, ``"same"`` or ``"different"``).
        memory_budget: bytes (or ``"512MiB"``) for one round's activations; the chunk size
            follows from one HVP's measured activations (see :mod:`binom_opt.memory`). A round
            that runs out of memory is retried with half the chunk size, down to 1.
        compile_hvps: run the HVPs through ``torch.compile`` (see :func:`compiled`).

    The oracle's ``chunking`` attribute (a :class:`~binom_opt.memory.Chunking`) tells what ran.
    """
    check_randomness(randomness)
    chunking = Chunking(chunk_size, memory_budget)
    mode = resolve_hvp_mode(mode)
    steps_total = next(iter(points.values())).shape[0]
    per_step = list(loss_fn) if isinstance(loss_fn, Sequence) else [loss_fn] * steps_total
    singles: Dict[int, Callable] = {}
    for fn in per_step:
        singles.setdefault(id(fn), hvp_function(fn, mode))
    single = {i: compiled(f, compile_hvps) for i, f in singles.items()}

    def run(fn_id: int, lo: int, hi: int, vectors: Tensors) -> Tensors:
        at = {n: t[lo:hi] for n, t in points.items()}

        def one_at_a_time() -> Tensors:  # a loop skips vmap's batching rules (measured ~15% faster on CPU)
            outs = [single[fn_id]({n: t[i] for n, t in at.items()}, {n: t[i] for n, t in vectors.items()})
                    for i in range(hi - lo)]
            return {n: torch.stack([o[n] for o in outs]) for n in outs[0]}

        if hi - lo == 1:  # a single HVP: nothing to batch or to budget
            return one_at_a_time()

        def batch(chunk: Optional[int]) -> Tensors:
            if chunk == 1:
                return one_at_a_time()
            return compiled(vmap(singles[fn_id], chunk_size=chunk, randomness=randomness), compile_hvps)(at, vectors)

        return chunking.run(hi - lo, lambda: activation_bytes(per_step[lo], {n: t[0] for n, t in at.items()}), batch)

    def oracle(steps: range, vectors: Tensors) -> Tensors:
        # Runs of consecutive steps with the same loss function: one vmapped call each.
        runs, start = [], steps.start
        for j in range(steps.start + 1, steps.stop + 1):
            if j == steps.stop or per_step[j] is not per_step[start]:
                runs.append((start, j))
                start = j
        with explained_replay_errors(mode, randomness):
            parts = [
                run(id(per_step[lo]), lo, hi, {n: t[lo - steps.start : hi - steps.start] for n, t in vectors.items()})
                for lo, hi in runs
            ]
        return parts[0] if len(parts) == 1 else {n: torch.cat([p[n] for p in parts]) for n in parts[0]}

    oracle.chunking = chunking
    return oracle


def compiled(fn: Callable, enabled: bool) -> Callable:
    """``torch.compile(fn)`` when ``enabled``, else ``fn``.

    Compiled graphs are cached by code, not by closure: the HVPs of every later task with the
    same shapes reuse the first task's graph, so the compile time (about a minute for Conv4 on a
    CPU) is paid once per shape (rounds of a different size compile once more). Measured by
    ``benchmarks/hvp_backends.py``: 2.3x faster HVP rounds for Conv4 on a 2-core CPU.
    """
    return torch.compile(fn, dynamic=False) if enabled else fn


@contextlib.contextmanager
def explained_replay_errors(mode: str, randomness: str):
    """Turn torch.func failures while replaying a support loss into errors that say what to change."""
    try:
        yield
    except RuntimeError as error:
        if "randomness" in str(error) and randomness == "error":
            raise RuntimeError(
                "The support loss draws random numbers (dropout or another random op) inside the batched "
                "HVPs. Pass randomness='same' or 'different' (forwarded to torch.func.vmap; the replays then "
                "draw new masks, so each HVP is that of a resampled loss), or make the support loss "
                "deterministic, e.g. with the dropout layers in eval mode."
            ) from error
        if mode == "fwd" and "ZeroTensors are immutable" in str(error):
            raise HVPBackendError(
                "The forward-over-reverse HVP (hvp='fwd') failed inside PyTorch: forward-mode AD "
                "is broken for an operator in your loss (known for F.mse_loss in torch 2.13). "
                "Use hvp='rev' or hvp='auto'."
            ) from error
        add_note(error, "binom_opt: raised while replaying the support loss under torch.func (grad, vjp, vmap) "
                        "for Hessian-vector products. In-place updates of tensors from outside the closure, "
                        "module hooks that change state, and .item() or data-dependent Python branches on "
                        "tensors are not allowed there.")
        raise


RANDOMNESS = ("error", "same", "different")


def check_randomness(randomness: object) -> None:
    if randomness not in RANDOMNESS:
        raise ValueError(f"randomness must be one of {RANDOMNESS} (torch.func.vmap's), got {randomness!r}.")

