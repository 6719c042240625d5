"""Smoke test of benchmarks/run.py on a tiny config: every method runs and its numbers make sense."""

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import binom_opt as bo

pytestmark = pytest.mark.cpu_only  # the example scripts, processes and files run on the host

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
PER_TASK = ["higher", "autograd", "fo-task", "exact-task", "imaml1-task", "reptile-task"]
BATCHED_METHODS = ["exact-batch", "imaml1-batch"]
FUNCTIONAL = ["exact-ftask", "exact-fbatch"]  # functional.meta_gradient per task, meta_gradient_batched


def load_run_module():
    spec = importlib.util.spec_from_file_location("benchmark_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    methods = PER_TASK + BATCHED_METHODS + FUNCTIONAL
    argv = ["--config", "tiny", "--threads", "1", "--ks", "2", "--out", str(out), "--methods", *methods]
    rows = load_run_module().main(argv)
    return out, rows


def check_row(row):
    assert row["error"] is None, row
    assert math.isfinite(row["seconds"]) and row["seconds"] > 0, row
    assert row["peak_mib"] > 0, row
    if row["estimator"] == "Exact":
        assert row["rel_error"] < 1e-8, row
    if row["estimator"] == "FirstOrder":
        assert row["rel_error"] > 0, row
        assert row["hvp_count"] == 0, row
    if row["how"] == "peer":
        assert row["hvp_count"] is None
    elif row["estimator"] == "Exact":
        assert row["hvp_count"] == 2 * 2, row  # K = 2 HVPs for each of the B = 2 tasks
    # counted after the timed steps: one host read per meta-gradient (B = 2 per task, one batched)
    assert row["kernel_ops"] > 0 and row["graph_breaks"] == 0, row
    # the tiny config's tasks are small enough for the CPU's "auto" to vmap them: one read per meta-batch
    syncs = {"peer": 0, "per-task": 2, "batched": 1}[row["how"]]
    assert row["host_syncs"] == syncs, row
    if row["estimator"] in ("Implicit", "Reptile"):  # other objectives: no error against MAML's meta-gradient
        assert row["hvp_count"] == {"Implicit": 2 * 1, "Reptile": 0}[row["estimator"]], row


def test_outputs_written(run):
    out, rows = run
    document = json.loads((out / "tiny_cpu.json").read_text())
    assert [r["method"] for r in document["rows"]] == [r["method"] for r in rows]
    assert document["machine"]["threads"] == 1 and document["machine"]["cpu"]
    assert {r["K"] for r in document["memory_vs_k"]} == {2}
    table = (out / "tiny_cpu.md").read_text()
    assert "| method | ms per meta-step |" in table and "--config tiny" in table
    assert "| HVPs | kernel ops | vs higher ops | host syncs | rel. error vs exact |" in table
    assert all(f"| {r['method']} |" in table for r in rows)
    assert "| Implicit(1, reg=1) (per-task) |" in table and table.count("| other objective |") == 3


def test_per_task_and_peer_rows(run):
    _, rows = run
    assert [r["slug"] for r in rows if r["how"] != "batched" and r["api"] == "engine"] == PER_TASK
    for row in rows:
        if row["how"] != "batched":
            check_row(row)
    assert rows[0]["ratios"]["time_vs_higher"] == pytest.approx(1.0)
    assert rows[3]["ratios"]["time_vs_first_order"] == pytest.approx(rows[3]["seconds"] / rows[2]["seconds"])


def test_batched_rows(run):
    _, rows = run
    batched = [r for r in rows if r["how"] == "batched" and r["api"] == "engine"]
    assert [r["slug"] for r in batched] == BATCHED_METHODS
    for row in batched:
        check_row(row)


def test_functional_rows_and_the_task_batching_table(run, tmp_path):
    """The functional entry points measured like the engine's, and task_batching.py pairing each path with its own loop."""
    out, rows = run
    functional = {r["slug"]: r for r in rows if r["api"] == "functional"}
    assert list(functional) == FUNCTIONAL
    for row in functional.values():
        check_row(row)
    assert functional["exact-ftask"]["method"] == "Exact (meta_gradient)"
    script = RUN_PY.parent / "task_batching.py"
    spec = importlib.util.spec_from_file_location("task_batching", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pairs = [p for p in module.ratios(json.loads((out / "tiny_cpu.json").read_text())) if p["estimator"] == "Exact"]
    assert [(p["api"], p["estimator"]) for p in pairs] == [("adapt / adapt_batch", "Exact"),
                                                           ("meta_gradient / meta_gradient_batched", "Exact")]
    fn = pairs[1]
    assert fn["time_ratio"] == pytest.approx(functional["exact-fbatch"]["seconds"] / functional["exact-ftask"]["seconds"])
    assert "| B=2, Conv4-8 | meta_gradient / meta_gradient_batched | Exact |" in module.markdown(
        [json.loads((out / "tiny_cpu.json").read_text())], pairs, "")


def test_a_broken_down_implicit_solve_is_flagged_not_fatal():
    """A conjugate gradient that met negative curvature costs the same: its row is timed, and flagged."""
    module = load_run_module()
    assert module.flagged(SimpleNamespace(diverging=False, unreliable_solve=True))
    assert not module.flagged(SimpleNamespace(diverging=False, unreliable_solve=False))
    row = {"slug": "imaml4-task", "estimator": "Implicit", "diverging": True, "rel_error": None}
    assert module.fmt_error(row) == "other objective (CG broke down)"
    assert module.fmt_error({**row, "diverging": False}) == "other objective"
    cfg = module.CONFIGS["tiny"]
    method = next(m for m in module.all_methods(cfg) if m.slug == "imaml1-task")
    engine = module.make_engine(module.build_model(cfg, torch.device("cpu")), cfg, method, {})
    learner = engine.adapt(lambda m: -(m.params["head.bias"] ** 2).sum())  # concave: CG meets negative curvature
    with pytest.warns(bo.ImplicitSolveWarning):
        learner.params["head.bias"].sum().backward()
    assert module.flagged(engine.last_stats)


def test_quick_leaves_out_batched_rows_of_the_other_objectives_unless_asked(monkeypatch):
    module = load_run_module()
    chosen = {}

    def fake_measure(methods, cfg, args, workdir):
        chosen[tuple(args.methods or ())] = [m.slug for m in methods]
        raise SystemExit(0)  # stop before anything runs

    monkeypatch.setattr(module, "measure_methods", fake_measure)
    for extra in ([], ["--methods", "imaml1-batch", "reptile-batch"]):
        with pytest.raises(SystemExit):
            module.main(["--config", "omniglot", "--quick", *extra])
    quick = chosen[()]
    assert not [s for s in quick if s.endswith(("-ftask", "-fbatch"))]  # the functional rows only when asked for
    assert "imaml1-task" in quick and "reptile-task" in quick and "exact-batch" in quick and "binom2-batch" in quick
    assert not [s for s in quick if s.startswith(("imaml", "reptile")) and s.endswith("-batch")]
    assert chosen[("imaml1-batch", "reptile-batch")] == ["imaml1-batch", "reptile-batch"]


def test_a_failing_child_gives_its_error_and_the_parent_goes_on(tmp_path, capsys):
    """Children are forked from the forkserver: an exception in one comes back as the row's error, with its log's tail."""
    module = load_run_module()
    cfg = module.CONFIGS["tiny"]
    method = module.Method("trunc9-task", "Truncated(9)", "per-task", "Truncated", 9)  # L > K: refused in the child
    args = SimpleNamespace(device="cpu", threads=1, memory_budget=None, compile=False, error_tasks=None)
    result = module.run_job(method, cfg, args, tmp_path, repeats=0, with_grad=False)
    assert result["error"].startswith("ValueError: Truncated(L=9) needs L <= K"), result
    assert "Truncated(9) failed (exit code 1)" in capsys.readouterr().err
    fine = module.run_job(module.Method("fo-task", "FirstOrder", "per-task", "FirstOrder", 0), cfg, args, tmp_path, repeats=0,
                          with_grad=False, for_memory=True)
    assert "error" not in fine and fine["peak_bytes"] > 0, fine
