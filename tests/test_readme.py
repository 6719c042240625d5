"""README.md's first lines and its usage example must stay true."""

import re
from pathlib import Path

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
