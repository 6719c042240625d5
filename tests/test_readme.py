"""README.md's first lines, its usage example and its switching diffs must stay true (they are run here)."""

import re
from pathlib import Path

import higher
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import binom_opt as bo

import references as R
from cases import small_model, tasks
from l2l_reference import l2l

TOL, STEPS = 1e-10, 3
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands():
    first = code_blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    assert first[0].startswith("pip install torch==2.13.0") and "examples/sinusoid_maml.py" in first[0]
    assert first[1].startswith("pip install torch==2.13.0") and first[1].endswith("python -m pytest -q")
    assert README.index("```bash") < README.index("\n## ")


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    test_command = code_blocks("bash")[0].strip().splitlines()[1]
    assert test_command in ci


def test_usage_example_runs():
    blocks = code_blocks("python")
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md usage example", "exec"), namespace)
    assert namespace["engine"].last_stats.hvp_count > 0


# --- the switching diffs of the README run for real ---------------------------------------------

def diff_sides(block):
    before, after = [], []
    for line in block.splitlines():
        marker, code = line[:1], line[1:]
        if marker in (" ", "-"):
            before.append(code)
        if marker in (" ", "+"):
            after.append(code)
    return "\n".join(before), "\n".join(after)


def run_snippet(code):
    """Run a README snippet on a fresh model and return the gradients it produced."""
    model = small_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    inner_loss = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)
    namespace = dict(
        torch=torch, F=F, bo=bo, l2l=l2l, higher=higher, model=model, tasks=tasks(), steps=STEPS, lr=0.1,
        inner_opt=torch.optim.SGD(model.parameters(), lr=0.1), params=params, inner_loss=inner_loss,
        meta_grads=[torch.zeros_like(p) for p in params.values()],
    )
    exec(compile(code, "README.md", "exec"), namespace)
    if "task_loss" in namespace:
        return dict(zip(params, namespace["meta_grads"]))
    return {n: p.grad.clone() for n, p in model.named_parameters()}


DIFFS = re.findall(r"```diff\n(.*?)```", README, flags=re.S)


def test_readme_has_the_three_switching_diffs():
    assert len(DIFFS) == 3
    for block in DIFFS:
        removed = sum(line.startswith("-") for line in block.splitlines())
        added = sum(line.startswith("+") for line in block.splitlines())
        assert 1 <= removed == added <= 2


@pytest.mark.parametrize("index", range(3), ids=["learn2learn", "higher", "torch.func"])
def test_two_line_switch_gives_the_original_meta_gradient(index):
    before, after = diff_sides(DIFFS[index])
    original, switched = run_snippet(before), run_snippet(after)
    assert R.relative_error(switched, original) < TOL
