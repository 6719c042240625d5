"""Every ```python block of every documentation page runs, so no page shows code that does not.

The blocks of one page run top to bottom in one namespace, as a reader would paste them, from the
repository root with ``examples/`` importable (the data page uses the examples' loaders).
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted(p for p in DOCS.glob("*.md"))  # the reference pages are generated from docstrings (doctests)

pytestmark = pytest.mark.cpu_only  # files, the examples' data and the working directory are the host's
OPTIONAL = ("transformers", "peft")  # the hf extra: a page that imports them is skipped where they are missing


def python_blocks(page: Path):
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_every_guide_page_has_a_runnable_snippet():
    assert GUIDES, "no documentation pages found"
    assert [p.name for p in GUIDES if not python_blocks(p)] == []


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: p.name)
def test_page_snippets_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    for module in OPTIONAL:
        if re.search(rf"^(?:import|from) .*\b{module}\b", "\n".join(python_blocks(page)), flags=re.M):
            pytest.importorskip(module)
    namespace = {"__name__": f"docs.{page.stem}"}
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.relative_to(ROOT)} [python block {i + 1}]", "exec"), namespace)
    sys.stdout.flush()
