"""The context of every support-loss call, and errors that say what to change.

:class:`calls` wraps each call of a support loss binom_opt makes (an inner step, an HVP, a replay, a mixed term):
the module policy of :mod:`~binom_opt.core.norm_layers`, the recorded context of the step it replays
(:mod:`~binom_opt.core.context`), and, when torch raises, an error naming what was running and what to change.

Example:
    >>> from binom_opt.core.options import Options
    >>> try:
    ...     with calls(Options(), None, "inner step 0"):
    ...         raise RuntimeError("derivative for aten::_flash_attention_backward is not implemented")
    ... except RuntimeError as error:
    ...     print(str(error).split(":")[0])
    An operator of the support loss has no second derivative
"""

from __future__ import annotations

from typing import Optional

from .context import StepContext
from .norm_layers import module_policy

__all__ = ["calls", "HVPBackendError", "REPLAY_HINT", "add_note"]


REPLAY_HINT = ("It runs under torch.func transforms (grad, vjp, vmap) there: in-place updates of tensors from outside "
               "the closure, module hooks that change state, and .item() or Python branches on tensor values are not allowed.")


class HVPBackendError(RuntimeError):
    """An HVP backend failed inside PyTorch for a reason that another backend avoids."""


class calls:
    """The context of every support-loss call: the module policy, the recorded context of the step it
    replays (``None`` for the inner step itself, which runs in the caller's), and errors that say what to
    change (``during``: what was running). A class, not a generator: it is entered at every inner step and HVP.
    ``modules=False``: a call that runs no module (a kept graph's backward) takes the errors only; ``hooks=False``: the
    module policy without its hooks (:func:`~binom_opt.core.norm_layers.needs_hooks`)."""

    def __init__(self, options, context: Optional[StepContext], during: str, hint: str = "", modules: bool = True,
                 hooks: bool = True):
        self.options, self.context, self.during, self.hint = options, context, during, hint
        self.policy = module_policy(options.bn, hooks) if modules else None

    def __enter__(self) -> None:
        if self.policy is not None:
            self.policy.__enter__()
        self.replay = None
        if self.context is not None:
            self.replay = self.context.replay()
            try:
                self.replay.__enter__()
            except BaseException:
                if self.policy is not None:
                    self.policy.__exit__(None, None, None)
                raise

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if self.replay is not None:
                self.replay.__exit__(kind, error, traceback)
        finally:
            if self.policy is not None:
                self.policy.__exit__(kind, error, traceback)
        if isinstance(error, RuntimeError):
            _explain(error, self.options, self.during, self.hint)


def _explain(error: RuntimeError, options, during: str, hint: str) -> None:
    """Raise ``error`` as what to change, where it is a known failure; else add a note of where it was raised."""
    if "randomness error mode" in str(error) and options.randomness in ("error", "replay"):  # vmap's own message
        raise RuntimeError(_RANDOM_UNDER_VMAP[options.randomness]) from error
    if options.hvp_mode == "fwd" and "ZeroTensors are immutable" in str(error):
        raise HVPBackendError(
            "The forward-over-reverse HVP (hvp='fwd') failed inside PyTorch: forward-mode AD is broken for an "
            "operator in your loss (known for F.mse_loss in torch 2.13). Use hvp='rev' or hvp='auto'."
        ) from error
    for clue, explanation in _KNOWN_FAILURES:
        if all(part in str(error) for part in clue):
            raise RuntimeError(f"{explanation} (Raised during {during}: {str(error).splitlines()[0]})") from error
    add_note(error, f"binom_opt: raised during {during}. {hint or REPLAY_HINT}")


# what torch says when the support loss does what replays cannot (substrings it must all contain), and what to do
_KNOWN_FAILURES = (
    (("derivative for", "is not implemented"),
     "An operator of the support loss has no second derivative: binom_opt's Hessian-vector products differentiate "
     "the support loss twice, and fused kernels (flash attention, fused norms or losses) differentiate once. Run that "
     "part with a composite implementation: for a transformers model attn_implementation='sdpa' (binom_opt runs "
     "torch's scaled_dot_product_attention under its math kernel) or 'eager'. FirstOrder() needs no second derivative."),
    (("requires_grad_()", "functorch transform"),
     "A module or forward hook of the support loss calls requires_grad_(), which torch.func, taking binom_opt's "
     "Hessian-vector products, refuses: transformers' enable_input_require_grads() hooks the input embeddings so "
     "(gradient_checkpointing_enable() installs it too). binom_opt needs no gradient on the inputs: call "
     "model.disable_input_require_grads() before adapting."),
    (("escaped?",),
     "The support loss used a tensor kept from an earlier call of the closure: a key/value cache (past_key_values, "
     "which the model extends at every call) or another object that one call fills and the next reads. binom_opt "
     "replays the closure at recorded points, so each call must compute the loss from the learner and the task's "
     "data alone: build the cache inside the closure (cache = m(input_ids=prefix, use_cache=True).past_key_values) "
     "or pass use_cache=False."),
)


_RANDOM_UNDER_VMAP = {
    "replay": (
        "The support loss draws random numbers (dropout or another random op), and a meta-batch's tasks are adapted "
        "together (adapt_batch, meta_gradient_batched): vmapped tasks cannot draw the numbers a loop over tasks draws, "
        "so their steps cannot be replayed as that loop took them. Adapt task by task (engine.adapt, bo.MAML, "
        "innerloop_ctx, functional.meta_gradient: each step's draws are replayed, the loop's own meta-gradient), or "
        "pass randomness='same' (every replay of a task draws the same numbers: the meta-gradient of that fixed-mask "
        "loss) or 'different' (replays draw new numbers), or make the support loss deterministic (dropout layers in "
        "eval mode)."
    ),
    "error": (
        "The support loss draws random numbers (dropout or another random op), which randomness='error' refuses. Pass "
        "randomness='replay' (the default: each inner step's draws are replayed, the loop's own meta-gradient; one task "
        "at a time), 'same' or 'different' (see binom_opt.Options), or make the support loss deterministic, e.g. with "
        "the dropout layers in eval mode."
    ),
}


def add_note(error: BaseException, note: str) -> None:
    """Attach context to an exception without changing its type (PEP 678; a no-op before Python 3.11)."""
    if hasattr(error, "add_note"):
        error.add_note(note)  # pyright: ignore[reportAttributeAccessIssue]  # Python >= 3.11
