"""The house rules of the source tree: small modules, and no import circle in the core."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "binom_opt"
MAX_LINES = 400
NODE_MAX_LINES = 250  # core/node.py: the meta-gradient's one place, kept to the schedule dispatch and the checks' order


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_is_over_its_size(path):
    lines = len(path.read_text().splitlines())
    limit = NODE_MAX_LINES if path.relative_to(SRC).as_posix() == "core/node.py" else MAX_LINES
    assert lines <= limit, f"{path.relative_to(SRC)} has {lines} lines, more than {limit}: give a concept its own module"


def core_imports() -> dict:
    """``{module: modules of core it imports}``, from every import statement, ``TYPE_CHECKING`` blocks included."""
    graph = {}
    for path in (SRC / "core").glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
        graph[path.stem] = found & {p.stem for p in (SRC / "core").glob("*.py")}
    return graph


def test_the_core_has_no_import_circle():
    graph, state = core_imports(), {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import circle: {' -> '.join([*path, module])}"
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
