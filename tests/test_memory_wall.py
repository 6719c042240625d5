"""benchmarks/memory_wall.py: the fits, extrapolations, largest K and targets on synthetic peaks (pure functions of
the points), the skipping of points predicted above --max-memory, and a tiny run end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.cpu_only  # processes and files on the host

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from suite import wall  # noqa: E402


def load_script():
    spec = importlib.util.spec_from_file_location("memory_wall", BENCHMARKS / "memory_wall.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def points(method, peaks, status="measured"):
    return [{"method": method, "K": k, "status": status, "peak_mib": peak, "seconds": 1.0} for k, peak in peaks.items()]


HIGHER = points("higher", {1: 1124 + 1635, 2: 1124 + 2 * 1635, 3: 1124 + 3 * 1635})  # 1,635 MiB per step
EXACT = points("exact", {1: 2900 + 48, 2: 2900 + 96, 3: 2900 + 144})  # one 48 MiB parameter copy per step


def test_held_points_count_the_stored_points_and_one_segment_of_the_checkpointed_loop():
    assert [wall.held_points("exact", k) for k in (1, 7, 100)] == [1, 7, 100]
    assert [wall.checkpoint_every(k) for k in (1, 4, 10, 100)] == [1, 2, 3, 10]
    assert [wall.held_points("exact-ckpt", k) for k in (1, 4, 10, 100)] == [1, 4, 4 + 3, 10 + 10]


def test_a_line_needs_two_distinct_k():
    assert wall.line_fit([2.0, 2.0], [1.0, 3.0]) is None
    assert wall.line_fit([1.0, 2.0, 3.0], [5.0, 7.0, 9.0]) == pytest.approx((3.0, 2.0))
    line = wall.fit(HIGHER, "higher")
    assert line is not None and (line["intercept"], line["slope"]) == pytest.approx((1124, 1635))
    assert line["basis"] == "least squares over K=2, 3 (K=1 left out)"
    # K = 1 counts only where fewer than two larger K were measured: a one-step loop holds no interior point
    exact = points("exact", {1: 2800.0, 2: 2950.0, 3: 3000.0})
    assert wall.fit(exact, "exact")["slope"] == pytest.approx(50.0)
    assert wall.fit(exact[:2], "exact")["slope"] == pytest.approx(150.0)
    assert wall.fit(points("higher", {2: 10.0}), "higher") is None


def test_peaks_are_measured_where_measured_and_extrapolated_elsewhere():
    assert wall.peak_at(HIGHER, "higher", 2) == (1124 + 2 * 1635, "measured")
    peak, how = wall.peak_at(HIGHER, "higher", 10)
    assert how == "extrapolated" and peak == pytest.approx(1124 + 16350)
    assert wall.peak_at(HIGHER, "exact", 10) == (None, "unknown")
    failed = HIGHER + points("higher", {4: None}, status="failed")  # failed and skipped points do not count
    assert wall.fit(failed, "higher") == wall.fit(HIGHER, "higher")


def test_the_checkpointed_method_at_one_k_takes_exacts_growth_per_held_point():
    ckpt = points("exact-ckpt", {4: 3100.0})
    line = wall.fit(EXACT + ckpt, "exact-ckpt")
    assert line is not None and line["slope"] == pytest.approx(48) and line["basis"] == "K=4 with Exact's growth per held point"
    peak, how = wall.peak_at(EXACT + ckpt, "exact-ckpt", 100)
    assert how == "extrapolated" and peak == pytest.approx(3100 + 48 * (20 - 4))
    assert wall.fit(ckpt, "exact-ckpt") is None  # nothing to borrow from


def test_a_binomial_method_is_fitted_with_exacts_points_at_k_up_to_its_level():
    binom2 = points("binom2", {3: 2900 + 96 + 1000.0})  # 1,000 MiB above Exact at K = 2
    assert [(p["method"], p["K"]) for p in wall.measured(EXACT + binom2, "binom2")] == [("exact", 1), ("exact", 2), ("binom2", 3)]
    line = wall.fit(EXACT + binom2, "binom2")
    assert line is not None and line["slope"] == pytest.approx(1000) and line["basis"] == "least squares over K=2, 3 (K=1 left out)"
    assert [p["K"] for p in wall.measured(EXACT, "binom1")] == [1]  # one point: no line yet
    assert wall.fit(EXACT, "binom1") is None
    assert wall.measured(EXACT + binom2, "exact") == EXACT  # and Exact takes nothing from them


def test_largest_k_in_a_budget():
    assert wall.largest_k(HIGHER, "higher", 8192) == {"K": 4, "how": "extrapolated"}  # (8192 - 1124) / 1635 = 4.3
    assert wall.largest_k(HIGHER, "higher", 16384) == {"K": 9, "how": "extrapolated"}
    measured = HIGHER + points("higher", {4: 1124 + 4 * 1635, 5: 1124 + 5 * 1635})
    assert wall.largest_k(measured, "higher", 8192) == {"K": 4, "how": "measured"}  # 4 fits and 5 does not, both run
    assert wall.largest_k(HIGHER, "higher", 2000) == {"K": None, "how": "none"}
    assert wall.largest_k(points("exact", {1: 100.0, 2: 90.0}), "exact", 8192) == {"K": None, "how": "unbounded"}
    assert wall.largest_k(points("exact", {1: 100.0}), "exact", 8192) == {"K": None, "how": "unknown"}
    # a measured peak above the budget wins over a fit that would allow more
    bent = points("binom1", {1: 1000.0, 2: 2000.0, 3: 9000.0})
    assert wall.largest_k(bent, "binom1", 8192) == {"K": 2, "how": "measured"}
    # the checkpointed count is not monotone in K: the scan goes on past a K that does not fit
    ckpt = EXACT + points("exact-ckpt", {4: 3100.0})
    k = wall.largest_k(ckpt, "exact-ckpt", 8192)["K"]
    assert wall.predict(wall.fit(ckpt, "exact-ckpt"), "exact-ckpt", k) <= 8192 < wall.predict(
        wall.fit(ckpt, "exact-ckpt"), "exact-ckpt", k + 1) or k == wall.LARGEST_K_SCANNED


def test_growth_is_counted_in_parameter_copies():
    g = wall.growth(EXACT, "exact", parameter_mib=48.0)
    assert g is not None and g["mib_per_step"] == pytest.approx(48) and g["copies_per_step"] == pytest.approx(1.0)
    assert wall.growth(points("exact", {1: 5.0}), "exact", 48.0) is None


def test_the_targets_are_judged_with_their_numbers():
    ckpt = points("exact-ckpt", {4: 3100.0})
    verdict = wall.acceptance(HIGHER + EXACT + ckpt, parameter_mib=48.0)
    assert verdict["a"]["met"] and verdict["a"]["ratio"] == pytest.approx((2900 + 480) / (1124 + 16350))
    assert "(extrapolated)" in verdict["a"]["text"] and "target <= 0.25x" in verdict["a"]["text"]
    assert verdict["b"]["met"] and verdict["b"]["copies"] == pytest.approx(1.0)
    assert verdict["c"]["met"] and "20 held points, m=10" in verdict["c"]["text"] and "(measured)" in verdict["c"]["text"]
    costly = points("exact", {1: 3000.0, 2: 3100.0})  # two parameter copies per step
    verdict = wall.acceptance(HIGHER + costly, parameter_mib=48.0)
    assert verdict["b"]["met"] is False and verdict["c"]["met"] is None and "not enough points" in verdict["c"]["text"]


def test_a_point_predicted_above_max_memory_is_skipped_not_run(monkeypatch, tmp_path):
    script = load_script()
    ran = []

    def fake_job(method, cfg, args, workdir, repeats, with_grad, for_memory=False):
        ran.append((method.slug, cfg.steps))
        return {"peak_bytes": (1000 + 1000 * cfg.steps) * 2**20, "first_call_seconds": 0.5}

    monkeypatch.setattr(script, "run_job", fake_job)
    monkeypatch.setattr(script, "meminfo_mib", lambda field: 10**9)
    args = SimpleNamespace(max_memory=4500.0, device="cpu")
    todo = script.plan(["higher", "exact"], [1, 2, 4, 3])
    done = script.measure(todo, script.CONFIGS["resnet12-tiny"], args, tmp_path)
    # K=1: 2,000 MiB; K=2 guessed at 4,000 (one point scaled by K: an overestimate) and run: 3,000; K=3 from the line:
    # 4,000, run; K=4 predicted at 5,000 and skipped
    assert ran == [("higher", 1), ("higher", 2), ("higher", 3), ("exact-task", 1), ("exact-task", 2), ("exact-task", 3)]
    skipped = [p for p in done if p["status"] == "skipped"]
    assert [(p["method"], p["K"]) for p in skipped] == [("higher", 4), ("exact", 4)]
    assert skipped[0]["note"] == "skipped: predicted 4.9 GiB > --max-memory 4.4 GiB"
    assert [p["predicted_mib"] for p in done[:4]] == [None, pytest.approx(4000), pytest.approx(4000), pytest.approx(5000)]


def test_plan_orders_each_methods_k_and_leaves_out_k_below_l():
    script = load_script()
    assert script.plan(["binom2", "exact"], [3, 1, 2]) == [("binom2", 2), ("binom2", 3), ("exact", 1), ("exact", 2), ("exact", 3)]
    assert script.plan(["higher"], None) == [("higher", k) for k in script.METHODS["higher"][1]]
    with pytest.raises(SystemExit, match=r"--methods \['hessian'\] match none of"):
        script.parse_args(["--methods", "hessian"])


def test_a_tiny_run_writes_its_table_and_rerenders_from_its_json(tmp_path):
    script = load_script()
    out = tmp_path / "results"
    document = script.main(["--tiny", "--methods", "higher", "exact", "--threads", "1", "--out", str(out)])
    measured = [(p["method"], p["K"]) for p in document["points"] if p["status"] == "measured"]
    assert measured == [("higher", 1), ("higher", 2), ("exact", 1), ("exact", 2)]
    assert all(p["peak_mib"] > 0 and p["seconds"] > 0 for p in document["points"])
    assert set(document["methods"]) == {"higher", "exact"} and set(document["acceptance"]) == {"a", "b", "c"}
    text = (out / "memory_wall_cpu_tiny.md").read_text()
    assert "Command: `python benchmarks/memory_wall.py --tiny --methods higher exact" in text
    assert "| K | higher exact | Exact |" in text and "| 100 | *~" in text and "(c) not judged" in text
    saved = json.loads((out / "memory_wall_cpu_tiny.json").read_text())
    assert saved["points"] == document["points"]
    (out / "memory_wall_cpu_tiny.md").unlink()
    script.main(["--from-json", str(out / "memory_wall_cpu_tiny.json")])
    assert (out / "memory_wall_cpu_tiny.md").read_text() == text
