"""The benchmark suite behind ``benchmarks/run.py``, one module per concern.

``configs`` (the settings), ``methods`` (what is compared, one meta-step each), ``measure`` (time and memory
inside a child), ``children`` (one child process per method), ``results`` (rows, errors, ratios, memory
against K) and ``report`` (markdown, JSON and the plot).
"""

from __future__ import annotations

import sys
from pathlib import Path

MIB = 2**20
# benchmarks/ (this package's parent) and examples/ (the few-shot models the configs build)
SUITE_PATHS = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]
sys.path[:0] = [p for p in SUITE_PATHS if p not in sys.path]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
