"""benchmarks/gpu.sh, the one command a GPU machine runs, works end to end (here: --device cpu --dry-run)."""

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run_on_the_cpu(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "gpu_cpu.log").read_text()
    for part in ("tests_cpu", "run_omniglot_cpu", "run_miniimagenet_cpu", "hvp_backends_cpu", "memory_wall_cpu", "transformer_wall_cpu",
                 "done"):
        assert part in log
    assert "passed" in (tmp_path / "tests_cpu.txt").read_text()
    report = json.loads((tmp_path / "tiny_cpu.json").read_text())
    assert {row["slug"] for row in report["rows"]} >= {"exact-task", "exact-batch"}
    assert all(row["error"] is None for row in report["rows"])
    assert json.loads((tmp_path / "hvp_backends_cpu.json").read_text())["rows"]
    wall = json.loads((tmp_path / "memory_wall_cpu_tiny.json").read_text())
    assert {(p["method"], p["K"]) for p in wall["points"] if p["status"] == "measured"} == {
        (m, k) for m in ("higher", "exact", "exact-ckpt") for k in (1, 2)}
    transformer = json.loads((tmp_path / "transformer_wall_cpu_bert-tiny.json").read_text())
    assert {(p["method"], p["K"]) for p in transformer["points"] if p["status"] == "measured"} == {
        (m, k) for m in ("higher", "exact") for k in (1, 2)}
