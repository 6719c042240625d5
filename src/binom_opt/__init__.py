"""binom_opt: graph-free MAML meta-gradients with the binomial estimator of BinomGBML.

One dial, the estimator, goes from first-order through truncated and binomial to exact:

    >>> import binom_opt as bo
    >>> [type(e).__name__ for e in (bo.FirstOrder(), bo.Truncated(2), bo.Binomial(2), bo.Hybrid(1, 3), bo.Exact())]
    ['FirstOrder', 'Truncated', 'Binomial', 'Hybrid', 'Exact']

and, besides that dial, iMAML's ``bo.Implicit(cg_steps, reg)`` and ``bo.Reptile()``.

Entry points, all thin shells over one pipeline (docs/design.md): :class:`MetaGradientEngine`
(``adapt`` per task, ``adapt_batch`` per meta-batch), the drop-ins :class:`MAML` (learn2learn)
and :func:`innerloop_ctx` (higher), :class:`MetaSGD` (learned per-parameter rates), and :mod:`binom_opt.functional` for pure functions of dicts
of tensors. :class:`Options` holds every setting besides the estimator; :mod:`binom_opt.bounds`
has the paper's error bounds and :mod:`binom_opt.distributed` shards meta-batches over ranks.
"""

from . import bounds, distributed, functional
from .core.adaptation import meta_backward
from .core.calls import HVPBackendError
from .core.estimators import Binomial, Estimator, Exact, FirstOrder, Hybrid, Implicit, Reptile, Truncated
from .core.implicit import ImplicitSolveWarning
from .core.learner import BatchedLearner, Learner
from .core.options import Options
from .core.stats import ExpansionDivergenceWarning, MetaGradientStats
from .engine import MetaGradientEngine
from .innerloop import innerloop_ctx
from .maml import MAML, MetaSGD

__version__ = "0.3.0"

__all__ = [
    "BatchedLearner",
    "Binomial",
    "Estimator",
    "Exact",
    "ExpansionDivergenceWarning",
    "FirstOrder",
    "HVPBackendError",
    "Hybrid",
    "Implicit",
    "ImplicitSolveWarning",
    "Learner",
    "MAML",
    "MetaGradientEngine",
    "MetaGradientStats",
    "MetaSGD",
    "Options",
    "Reptile",
    "Truncated",
    "bounds",
    "distributed",
    "functional",
    "innerloop_ctx",
    "meta_backward",
]
