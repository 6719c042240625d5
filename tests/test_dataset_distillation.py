"""The dataset-distillation example end to end on real Omniglot (tiny K, few iterations), its meta-gradient against
autograd through the unrolled loop, and the float32-drift benchmark."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from test_examples import DATA, EXAMPLES, needs_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(EXAMPLES))

import dataset_distillation  # noqa: E402

from fewshot.distillation import Characters, confidence  # noqa: E402

pytestmark = [pytest.mark.cpu_only, pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")]


def drift_module():
    spec = importlib.util.spec_from_file_location("float32_drift", ROOT / "benchmarks" / "float32_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot_cache")


@needs_data
def test_end_to_end_on_real_data(tmp_path, cache_dir):
    out = tmp_path / "run"
    results = dataset_distillation.main([
        "--classes", "4", "--steps", "4", "--iterations", "2", "--eval-inits", "2", "--memory-ks", "3", "--threads", "1",
        "--data-root", str(DATA), "--cache-dir", str(cache_dir), "--out", str(out), "--no-progress"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["evaluation"] == results["evaluation"]
    for row in ("distilled", "random_real", "all_real"):
        assert 0 <= saved["evaluation"][row]["mean"] <= 1 and saved["evaluation"][row]["runs"] == 2
    assert len(saved["history"]) == 2 and saved["history"][0]["hvps"] == 4  # Exact: one HVP per inner step
    assert [r["hvps"] for r in saved["estimators"]] == [4, 4, 1, 1]  # equal cost: Exact = Binomial(1), Truncated = Hybrid
    assert saved["estimators"][0]["relative_error"] == 0
    assert {r["method"] for r in saved["memory"]} >= {"higher (unrolled)", "binom_opt Exact"}
    assert all(r.get("peak_mib", -1) >= 0 for r in saved["memory"]), saved["memory"]
    distilled = torch.load(out / "distilled.pt")
    assert not torch.equal(distilled["images"], distilled["start"])  # the meta-gradient moved the pixels
    assert "distilled images" in (out / "table.md").read_text()
    assert (out / "distilled.png").is_file()


@needs_data
@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_meta_gradient_of_the_images_is_exact_in_float64(cache_dir, checkpoint_every):
    drift = drift_module()
    chars = Characters.load(3, seed=0, data_root=DATA, cache_dir=cache_dir, verbose=False)
    images, init, _ = drift.graph_free(chars, 4, torch.float64, 5, 0.1, checkpoint_every)
    ref_images, ref_init = drift.unrolled(chars, 4, torch.float64, 5, 0.1)
    assert drift.relative(images, ref_images) < 1e-10 and drift.relative(init, ref_init) < 1e-10


@needs_data
def test_float32_drift_writes_its_tables(tmp_path, cache_dir):
    result = drift_module().main(["--ks", "3", "--classes", "3", "--hidden", "4", "--unrolled-max-k", "3", "--threads", "1",
                                  "--data-root", str(DATA), "--cache-dir", str(cache_dir), "--out", str(tmp_path / "drift")])
    (row,) = result["rows"]
    for method in ("exact", "exact_checkpointed", "unrolled_autograd"):
        assert 0 < row[method]["images"] < 1e-4  # float32 rounding, not another gradient
    assert row["exact_float64_checkpointed"]["images"] < 1e-12
    assert json.loads((tmp_path / "drift.json").read_text())["rows"][0]["K"] == 3
    assert "| 3 |" in (tmp_path / "drift.md").read_text()


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps must be at least 1"),
                                           (["--estimator", "trunc", "--L", "300"], "L"),
                                           (["--classes", "1"], "--classes must be at least 2")])
def test_bad_flags_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit):
        dataset_distillation.parse(argv)
    assert message in capsys.readouterr().err


def test_confidence_interval_uses_student_t():
    ci = confidence([0.5, 0.7])
    assert ci["mean"] == pytest.approx(0.6) and ci["ci95"] == pytest.approx(12.71 * 0.1414213 / 2 ** 0.5, rel=1e-4)


@needs_data
def test_learned_step_size_moves_and_the_baseline_uses_it(tmp_path, cache_dir):
    results = dataset_distillation.main([
        "--classes", "3", "--steps", "3", "--iterations", "2", "--eval-inits", "2", "--learn-lr", "--no-compare",
        "--no-memory", "--estimator", "trunc", "--L", "2", "--threads", "1", "--data-root", str(DATA),
        "--cache-dir", str(cache_dir), "--out", str(tmp_path), "--no-progress"])
    assert results["inner_lr"] != 0.1 and results["estimator"] == "Truncated(L=2)"
    assert results["history"][0]["hvps"] == 2 and results["memory"] == [] and results["estimators"] == []
