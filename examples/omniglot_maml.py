"""MAML on Omniglot with a choice of meta-gradient estimator (default Binomial(1)).

Every Conv4 parameter adapts in the inner loop (Finn et al., 2017). Same CLI, loop, checkpoints
and report as ``omniglot_anil.py`` (see ``fewshot/training.py``); only what adapts differs. The
defaults are a short CPU run; ``--preset paper`` is the standard protocol for a GPU.

    python examples/omniglot_maml.py                                   # a short CPU run
    python examples/omniglot_maml.py --estimator exact --out runs/maml_exact
    python examples/omniglot_maml.py --preset paper --device cuda --out runs/maml_paper
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewshot.training import MAML, entry_point

# Full MAML takes HVPs through the whole network: a CPU run is kept short (meta-batch 4, 5 queries).
CPU_DEFAULTS = dict(iterations=300, meta_batch=4, queries=5, eval_every=100, checkpoint_every=100,
                    out=Path("runs/omniglot_maml"))

main = entry_point(MAML, __doc__, CPU_DEFAULTS)


if __name__ == "__main__":
    main()
