"""Hypothesis profiles: ``pytest --hypothesis-profile ci`` (or CI=1) runs derandomized.

Tests that fix ``max_examples`` in their own ``@settings`` keep it; the profiles set the rest.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, max_examples=50, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)

if os.environ.get("CI"):
    settings.load_profile("ci")
