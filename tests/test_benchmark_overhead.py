"""benchmarks/dropout_cost.py, overhead.py and task_plan.py run end to end at tiny sizes and write their tables (speed itself is
not tested)."""

import json
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dropout_cost


def test_dropout_benchmark_writes_every_method_with_and_without_dropout(tmp_path):
    result = dropout_cost.main(["--width", "8", "--steps", "2", "--tasks", "1", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"hand-written exact", "hand-written first-order", "higher", "bo.MAML Exact", "bo.MAML Binomial(1)",
                       "bo.MAML FirstOrder"}
    assert sorted({r["dropout"] for r in result["rows"]}) == [0.0, 0.1]
    assert json.loads((tmp_path / "dropout_cpu.json").read_text())["rows"] == result["rows"]
    assert "| bo.MAML Exact | 0.1 |" in (tmp_path / "dropout_cpu.md").read_text()


def test_overhead_benchmark_writes_every_setting_and_method(tmp_path):
    import overhead

    result = overhead.main(["--small", "--repeats", "1", "--out", str(tmp_path)])
    methods = {(r["setting"], r["method"]) for r in result["rows"]}
    assert ("sine", "higher") in methods and ("sine", "adapt_batch Exact, memory_budget=None") in methods
    assert ("anil", "engine.adapt Binomial(1)") in methods and ("conv4", "bo.MAML Exact") in methods and len(methods) == 20
    assert "| sine | bo.MAML Exact |" in (tmp_path / "overhead_cpu.md").read_text()
    for row in result["rows"]:  # round by round ratios: the median within its quartiles
        (q1, q3), (low, high) = row["vs_hand_written_quartiles"], row["vs_hand_written_ci95"]
        assert q1 <= row["vs_hand_written"] <= q3 and low <= row["vs_hand_written"] <= high
        assert (row["vs_higher"] is None) == (row["setting"] == "anil")


def test_task_plan_benchmark_times_both_plans_and_restores_the_cap(tmp_path):
    import task_plan

    from binom_opt.core import memory

    cap = memory.AUTO_VMAP_TASKS_CAP
    result = task_plan.main(["--small", "--repeats", "1", "--out", str(tmp_path)])
    assert cap == memory.AUTO_VMAP_TASKS_CAP
    assert [r["setting"] for r in result["rows"]] == ["MLP 1-8-8-1, 4 points", "Conv4-4, Omniglot"]
    for row in result["rows"]:
        assert row["vmapped_ms"] > 0 and row["loop_ms"] > 0 and 0 < row["activations_mib"] < 16
        assert row["auto"] == "vmapped"  # tiny tasks: under the cap
    assert "| MLP 1-8-8-1, 4 points | 2 |" in (tmp_path / "task_plan_cpu.md").read_text()


def test_overhead_sweep_splits_each_method_into_a_cost_per_task_and_per_step(tmp_path):
    import overhead

    result = overhead.main(["--small", "--repeats", "1", "--sweep", "1", "2", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"hand-written exact", "hand-written first-order", "higher", "bo.MAML Exact", "bo.MAML Binomial(1)",
                         "bo.MAML FirstOrder"}
    for r in rows.values():  # two points: the line goes through both
        assert r["per_task"] + r["per_step"] == pytest.approx(r["ms_per_task"]["1"])
        assert r["per_task"] + 2 * r["per_step"] == pytest.approx(r["ms_per_task"]["2"])
    assert "| bo.MAML Exact |" in (tmp_path / "overhead_cpu_steps.md").read_text()


def test_overhead_phases_split_each_method_by_phase_of_a_task(tmp_path):
    import overhead

    result = overhead.main(["--small", "--repeats", "1", "--phases", "--out", str(tmp_path)])
    rows = {r["method"]: r["us_per_task"] for r in result["rows"]}
    assert set(rows) == {"hand-written exact", "hand-written first-order", "higher", "bo.MAML Exact", "bo.MAML Binomial(1)",
                         "bo.MAML FirstOrder"}
    for phases in rows.values():  # every phase of every method was timed
        assert list(phases) == list(overhead.PHASES) and all(t > 0 for t in phases.values())
    assert "| bo.MAML Exact |" in (tmp_path / "overhead_cpu_phases.md").read_text()
    with pytest.raises(SystemExit):  # one run at a time
        overhead.main(["--small", "--phases", "--sweep", "1", "2", "--out", str(tmp_path)])


def test_overhead_refuses_to_measure_peers_beside_a_global_module_hook():
    """A hook left in place would slow the hand-written loops and higher measured in the same process."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    import overhead

    overhead.check_peers_unhooked("nothing")  # binom_opt's calls leave none behind (the runs above pass this check)
    handle = register_module_forward_pre_hook(lambda module, args: None)
    try:
        with pytest.raises(RuntimeError, match="still in place after 'a step'"):
            overhead.check_peers_unhooked("a step")
    finally:
        handle.remove()


def test_ratios_are_taken_round_by_round():
    """A slower round slows both methods of it: the ratio of each round's pair, not of the medians, carries no drift."""
    import overhead

    drifting = {"method": [2.0, 4.0, 8.0], "peer": [1.0, 2.0, 4.0]}  # the machine halves its speed at each round
    assert overhead.paired_ratio(drifting, "method", "peer") == (2.0, 2.0, 2.0, 2.0, 2.0)
    ratio = overhead.paired_ratio({"method": [2.0, 1.0], "peer": [1.0, 1.0]}, "method", "peer")
    assert (ratio.median, ratio.q1, ratio.q3) == (1.5, 1.25, 1.75) and (ratio.low, ratio.high) == (1.0, 2.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=60))
def test_the_interval_of_the_median_holds_the_median_and_lies_within_the_values(values):
    import overhead

    low, high = overhead.median_interval(values)
    assert min(values) <= low <= statistics.median(values) <= high <= max(values)


def test_the_interval_of_the_median_is_the_sign_tests():
    """The order statistics of the published tables of the sign test's interval (95 %), which narrows with the rounds."""
    import overhead

    for n, (low, high) in {6: (1, 6), 10: (2, 9), 20: (6, 15), 41: (14, 28)}.items():
        assert overhead.median_interval([float(x) for x in range(1, n + 1)]) == (float(low), float(high))
    assert overhead.median_interval([5.0, 1.0, 3.0]) == (1.0, 5.0)  # too few for 95 %: the whole range
