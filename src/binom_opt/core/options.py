"""Every setting besides the estimator, in one frozen object validated once.

Each entry point (``MetaGradientEngine``, ``MAML``, ``innerloop_ctx``, the functional API) takes
``options=bo.Options(...)`` and, as sugar, the same fields as keyword arguments:

    >>> import binom_opt as bo
    >>> bo.Options(memory_budget="512MiB", randomness="same").memory_budget
    '512MiB'
    >>> bo.Options.resolve(bo.Options(hvp="rev"), chunk_size=4).chunk_size
    4
    >>> bo.Options(randomness="fresh")
    Traceback (most recent call last):
    ...
    ValueError: randomness must be one of ('replay', 'error', 'same', 'different'), got 'fresh'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from .memory import check_chunk_size, parse_memory_budget
from .norm_layers import NORM_POLICIES

__all__ = ["Options", "HVP_MODES", "RANDOMNESS", "NAN_POLICIES"]

HVP_MODES = ("auto", "rev", "fwd")
RANDOMNESS = ("replay", "error", "same", "different")
NAN_POLICIES = ("raise", "skip_task")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Options:
    """How meta-gradients are computed, apart from the estimator (see docs/design.md).

    Attributes:
        hvp: Hessian-vector products by ``"rev"`` (reverse-over-reverse, ``vjp`` of ``grad``),
            ``"fwd"`` (forward-over-reverse, ``jvp`` of ``grad``) or ``"auto"`` (``"rev"``, which
            works through every loss; forward mode is broken for some, e.g. ``F.mse_loss`` in torch 2.13).
        chunk_size: at most this many HVPs (trajectory points x tasks) at once; ``None``: a round at once.
        memory_budget: bytes (or ``"512MiB"``) for the activations of the HVPs run at once, measured
            for one HVP (:mod:`binom_opt.core.memory`); ``"inner_step"``: no more than the inner step's;
            ``None``: everything at once on every device (a meta-batch's tasks vmapped together in the
            inner steps, the rounds over points x tasks and the query). ``"auto"`` (default) depends on
            the device. On every device, one task at a time (``adapt``, the drop-ins, a meta-batch's tasks one
            after another) keeps each inner step's graph (taken with grad enabled: under ``torch.no_grad()``
            no meta-gradient follows) while the graphs of one adaptation stay within
            4 MiB of measured activations (a small model, where replaying a step costs more than keeping it:
            its HVPs and mixed terms are then backwards of the kept graphs), and takes a round's other
            points one by one with plain autograd (the same computation, so kept and replayed steps give the
            same bits). On CUDA: the tasks vmapped together, a round's HVPs capped at a quarter of the
            free device memory, at most 512 MiB. On the CPU: as many HVPs of a vmapped round (and mixed terms
            of other meta-parameters) at once as fit in 64 MiB of measured activations (at least one; measured
            once per support loss and shapes), and a meta-batch's tasks vmapped together where one HVP of
            every task holds at most 16 MiB of activations (small models, several times faster so), else
            one after another, each run as a task of its own (its round's points vmapped), which is faster
            and lighter there than vmapped tasks and gives bitwise the per-task results: ``meta_gradient_batched``
            takes each task's whole meta-gradient before the next (the cost of a loop over
            ``meta_gradient``); ``adapt_batch``, whose query the caller writes for the whole meta-batch,
            checkpoints each task's query forward but the last (recomputed in the backward) and takes
            the tasks' meta-gradients one after another in the backward
            (:func:`~binom_opt.core.memory.loops_over_tasks`; docs/performance.md).
        compile_hvps: run the HVP rounds, and the inner steps of one task after the first, through
            ``torch.compile`` (the graph is reused across tasks); ``True`` for its default mode or a mode
            name, e.g. ``"reduce-overhead"`` (CUDA graphs: for small per-task steps that are launch-bound
            on a GPU; shapes must not change).
        randomness: random ops (dropout, ``torch.randn`` in the closure) in the support loss.
            ``"replay"`` (default): each inner step records the random state it starts from (only if it
            draws random numbers) and every replay of it (HVPs, recomputed checkpoints, the replay check,
            the mixed terms) runs from that state, so it draws the step's own numbers: the meta-gradient of
            the loop itself, as unrolled autograd keeps each step's dropout masks in its graph; the caller's
            generators advance as the loop's would. A round's points that drew random numbers are replayed
            one by one, not vmapped. A meta-batch's tasks adapted together (``adapt_batch``,
            ``meta_gradient_batched``) cannot draw a loop's numbers: random ops are refused there with an
            error naming the choices. ``"error"``: random ops are refused (as the replay check or vmap
            finds them). ``"same"``: every inner step and every replay of a task draws the same random
            numbers, so the meta-gradient is that of one fixed-mask loss taken at every step, a
            different training run (tasks of ``adapt_batch`` draw different ones; the caller's generators
            are left untouched). ``"different"``: replays draw new random numbers, a stochastic estimate
            of no loop's meta-gradient.
        bn: normalisation layers with running statistics (BatchNorm, InstanceNorm): ``"auto"``
            follows each layer's own mode (train: batch statistics, eval: running statistics; the
            running buffers are never updated, except by a layer that only a later inner step runs, on a
            branch the support loss's first call did not take: it updates them as the user's own loop
            would, with the same values either way), ``"transductive"`` (batch statistics everywhere),
            ``"frozen"`` (running statistics everywhere) or ``"error"`` (refuse such layers).
        nan_policy: ``"raise"`` (a NaN/Inf meta-gradient is a ``FloatingPointError`` naming where it
            appeared) or ``"skip_task"`` (the tasks whose meta-gradient is not finite contribute zero,
            counted in ``stats.skipped``). The check is the one host sync of a meta-gradient: backward reads
            it, the inner loop's finiteness flags (a non-finite inner step is raised there, naming the
            step) and the stats back in one transfer before returning the meta-gradient.
        checkpoint_every: store only every m-th point of the inner loop and recompute the others
            (bitwise the same) when the estimator needs them: about ``K/m + m`` stored points instead
            of ``K``, for one more gradient per inner step; ``m`` near ``sqrt(K)`` stores the fewest.
    """

    hvp: str = "auto"
    chunk_size: Optional[int] = None
    memory_budget: Union[None, int, str] = "auto"
    compile_hvps: Union[bool, str] = False
    randomness: str = "replay"
    bn: str = "auto"
    nan_policy: str = "raise"
    checkpoint_every: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice("hvp", self.hvp, HVP_MODES)
        check_chunk_size(self.chunk_size)
        parse_memory_budget(self.memory_budget)
        if not isinstance(self.compile_hvps, bool) and self.compile_hvps not in COMPILE_MODES:
            raise ValueError(f"compile_hvps must be True, False or a torch.compile mode {COMPILE_MODES}, got {self.compile_hvps!r}.")
        _check_choice("randomness", self.randomness, RANDOMNESS)
        _check_choice("bn", self.bn, NORM_POLICIES)
        _check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        every = self.checkpoint_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"checkpoint_every must be None or an integer >= 1 (store every m-th point), got {every!r}.")
        if every is not None and every > 1 and self.randomness == "different":
            raise ValueError(
                "checkpoint_every recomputes inner steps, which randomness='different' cannot reproduce: use "
                "randomness='same' (one random stream per task) or leave checkpoint_every=None."
            )

    @property
    def hvp_mode(self) -> str:
        """The concrete backend, ``"rev"`` or ``"fwd"``."""
        return "rev" if self.hvp == "auto" else self.hvp

    @classmethod
    def resolve(cls, options: Optional[Options] = None, **keywords: Any) -> Options:
        """``options`` (or the defaults) with ``keywords`` replacing fields, validated."""
        if options is not None and not isinstance(options, Options):
            raise TypeError(f"options must be a binom_opt.Options, got {type(options).__name__}.")
        unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(
                f"Unknown option(s) {unknown}; the options are {[f.name for f in dataclasses.fields(cls)]} "
                "(see binom_opt.Options)."
            )
        return dataclasses.replace(options or cls(), **keywords)


def _check_choice(name: str, value: object, choices: tuple, note: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}{note}, got {value!r}.")
