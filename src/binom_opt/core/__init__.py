"""The one meta-gradient pipeline: model -> recorded trajectory -> expansion -> autograd node -> ``.grad``.

See docs/design.md. The public entry points (``binom_opt.engine``, ``maml``, ``innerloop``,
``functional``) are thin shells over :class:`~binom_opt.core.recorder.InnerLoop`.
"""
