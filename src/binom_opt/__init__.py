"""binom_opt: graph-free MAML meta-gradients with the binomial estimator of BinomGBML.

One dial, the estimator, goes from first-order through truncated and binomial to exact:

    >>> import binom_opt as bo
    >>> [type(e).__name__ for e in (bo.FirstOrder(), bo.Truncated(2), bo.Binomial(2), bo.Hybrid(1, 3), bo.Exact())]
    ['FirstOrder', 'Truncated', 'Binomial', 'Hybrid', 'Exact']

See :class:`MetaGradientEngine` for models (``adapt`` per task, ``adapt_batch`` per
meta-batch), :func:`binom_opt.functional.meta_gradient` for pure functions of dicts of tensors,
and :mod:`binom_opt.bounds` for the paper's error bounds.
"""

from . import bounds, distributed, functional
from .adaptation import Learner
from .batch_adaptation import BatchedLearner
from .engine import ExpansionDivergenceWarning, MetaGradientEngine
from .estimators import Binomial, Estimator, Exact, FirstOrder, Hybrid, Truncated
from .hvp import HVPBackendError
from .innerloop import innerloop_ctx
from .maml import MAML
from .stats import MetaGradientStats

__version__ = "0.1.0"

__all__ = [
    "BatchedLearner",
    "Binomial",
    "Estimator",
    "Exact",
    "ExpansionDivergenceWarning",
    "FirstOrder",
    "HVPBackendError",
    "Hybrid",
    "Learner",
    "MAML",
    "MetaGradientEngine",
    "MetaGradientStats",
    "Truncated",
    "bounds",
    "distributed",
    "functional",
    "innerloop_ctx",
]
