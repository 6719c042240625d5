"""Smoke tests of the example scripts on tiny settings: each script's ``main(argv)`` runs in-process.

The Omniglot examples use the real data at ``$OMNIGLOT_ROOT`` or, by default,
``../shared/data/omniglot`` next to the repository, and are skipped when it is absent.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import binom_opt as bo  # noqa: E402

from fewshot.models import Conv4  # noqa: E402
from fewshot.omniglot import find_omniglot_root  # noqa: E402

DATA = Path(os.environ.get("OMNIGLOT_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot")


def _has_omniglot() -> bool:
    try:
        find_omniglot_root(DATA)
    except FileNotFoundError:
        return False
    return True


# Tiny untrained models at these settings make the binomial series diverge; the engine's warning
# about it is tested with the engine, here it would only be noise.
pytestmark = [pytest.mark.cpu_only, pytest.mark.filterwarnings("ignore::binom_opt.ExpansionDivergenceWarning")]

needs_data = pytest.mark.skipif(not _has_omniglot(), reason=f"Omniglot not found at {DATA} (set $OMNIGLOT_ROOT)")

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


def script(name: str):
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One decoded-image cache for the whole module (decoding the PNGs takes a few seconds)."""
    return tmp_path_factory.mktemp("omniglot_cache")


def tiny(out: Path, cache: Path, iterations: int = 3, *extra: str) -> list:
    """5-way 1-shot, 2 queries, K=2, meta-batch 2, Conv4 with 8 filters, a handful of evaluation tasks."""
    return [
        "--ways", "5", "--shots", "1", "--queries", "2", "--steps", "2", "--meta-batch", "2",
        "--iterations", str(iterations), "--hidden", "8", "--eval-every", "2", "--val-tasks", "3",
        "--eval-tasks", "5", "--checkpoint-every", "2", "--no-progress",
        "--data-root", str(DATA), "--cache-dir", str(cache), "--out", str(out), *extra,
    ]


def _ordinary_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_results(results: dict, out: Path, iterations: int) -> None:
    saved = json.loads((out / "results.json").read_text())
    for key in ("config", "history", "test", "train_seconds", "seconds_per_iteration", "machine", "iterations", "estimator"):
        assert key in saved, key
    assert saved["iterations"] == iterations == len(saved["history"]["train"])
    assert 0 <= saved["test"]["accuracy"] <= 1 and saved["test"]["ci95"] >= 0 and saved["test"]["tasks"] == 5
    assert all(0 <= r["accuracy"] <= 1 for r in saved["history"]["train"] + saved["history"]["val"])
    assert [r["iteration"] for r in saved["history"]["val"]] == list(range(2, iterations + 1, 2))
    assert saved["machine"]["torch"] == torch.__version__
    assert (out / "checkpoint.pt").is_file() and not list(out.glob("*.tmp"))
    assert (out / "curves.png").is_file() == HAS_MATPLOTLIB
    assert all(f.stat().st_mode & 0o777 == _ordinary_mode() for f in out.iterdir())
    assert results["test"] == saved["test"]


@needs_data
@pytest.mark.parametrize("name", ["omniglot_anil", "omniglot_maml"])
def test_omniglot_script_runs_end_to_end_on_the_real_data(name, tmp_path, cache_dir, capsys):
    """Training, validation, the meta-test, the report, the plot and the table that says how to read them."""
    results = script(name).main(tiny(tmp_path, cache_dir))
    check_results(results, tmp_path, 3)
    assert results["method"] == {"omniglot_anil": "ANIL", "omniglot_maml": "MAML"}[name]
    assert results["estimator"] == "Binomial(L=1, hessian_scale='paper')" and results["hvps_per_task"] == 2
    table = capsys.readouterr().out
    test = results["test"]
    assert f"| test accuracy (5 tasks of 5-way 1-shot) | {100 * test['accuracy']:.2f} % ± {100 * test['ci95']:.2f}" in table
    assert "| training | 3 iterations," in table and "How to read it:" in table
    assert f"Results: {tmp_path / 'results.json'}" in table


@needs_data
@pytest.mark.filterwarnings("ignore::binom_opt.ImplicitSolveWarning")  # an untrained BatchNorm net has negative curvature
@pytest.mark.parametrize(("estimator", "hvps"), [(["--estimator", "reptile"], 0),
                                                 (["--estimator", "imaml", "--L", "2", "--nan-policy", "skip_task"], 2)])
def test_reptile_and_imaml_train_through_the_maml_example(estimator, hvps, tmp_path, cache_dir, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = script("omniglot_maml").main(tiny(tmp_path, cache_dir, 3, *estimator))
    check_results(results, tmp_path, 3)
    assert results["hvps_per_task"] == hvps and results["estimator"] in ("Reptile()", "Implicit(cg_steps=2, reg=2.0, tol=None)")
    # an unreliable implicit solve is counted per meta-step and explained in the table, not repeated as warnings
    assert not [w for w in caught if issubclass(w.category, bo.ImplicitSolveWarning)]
    unreliable = results["unreliable_solve_fraction"]
    flags = [r["unreliable_solve"] for r in results["history"]["train"]]
    assert unreliable == pytest.approx(sum(flags) / 3)
    table = capsys.readouterr().out
    if "imaml" in estimator:
        assert f"| conjugate gradient unreliable | {100 * unreliable:.0f} % of the meta-steps |" in table
        assert ("the conjugate gradient of some task met negative curvature" in table) == (unreliable > 0)
    else:
        assert unreliable == 0 and "conjugate gradient" not in table


@needs_data
def test_other_warnings_of_a_meta_step_are_shown_once_per_place(tmp_path, cache_dir, monkeypatch):
    maml = script("omniglot_maml")
    original = maml.meta_step

    def warning_meta_step(*args, **kwargs):
        warnings.warn("a user's warning", UserWarning, stacklevel=1)
        return original(*args, **kwargs)

    monkeypatch.setattr(maml, "meta_step", warning_meta_step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        maml.main(tiny(tmp_path, cache_dir, 3))
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == ["a user's warning"]


@needs_data
def test_plot_has_its_setup_in_the_title_and_validation_and_test_points(tmp_path, cache_dir, monkeypatch):
    """The defaults validate during training, and curves.png shows those points and the test point."""
    figure = pytest.importorskip("matplotlib.figure")
    anil = script("omniglot_anil")
    defaults = anil.parse(anil.common_parser("", anil.DEFAULTS, anil.PRESETS), [])
    assert 0 < defaults.eval_every <= defaults.iterations and defaults.eval_tasks == 600
    drawn = []
    monkeypatch.setattr(figure.Figure, "savefig", lambda fig, path, **_: drawn.append(fig))
    anil.main(tiny(tmp_path, cache_dir))
    (fig,) = drawn
    title = fig._suptitle.get_text()
    assert title.startswith("ANIL Binomial(L=1, hessian_scale='paper'): Omniglot 5-way 1-shot, K=2") and "3 iterations" in title
    labels = [text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()]
    assert labels[1] == "validation" and labels[2].startswith("test (5 tasks): ")


def test_offline_without_data_is_a_short_error_that_creates_nothing(tmp_path):
    """No data anywhere and no network: the command ends with the two fixes, no traceback, and no
    output folder, cache or data folder left behind."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMNIGLOT_ROOT", "no_proxy", "NO_PROXY")}
    # An unreachable proxy makes every download fail at once, as on a machine without network.
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, str(EXAMPLES / "omniglot_anil.py"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: Omniglot is needed in") and "downloading it failed" in error
    assert "(1) point --data-root or $OMNIGLOT_ROOT" in error and "(2) run with internet access once" in error
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_data
@pytest.mark.parametrize("name", ["omniglot_anil", "omniglot_maml"])
def test_task_batched_training_follows_the_per_task_loop(name, tmp_path, cache_dir):
    """--task-batched (engine.adapt_batch) takes the same meta-steps as the loop over tasks, to float32 rounding."""
    loop = script(name).main(tiny(tmp_path / "loop", cache_dir, 3))
    batched = script(name).main(tiny(tmp_path / "batched", cache_dir, 3, "--task-batched"))
    assert len(loop["history"]["train"]) == len(batched["history"]["train"]) == 3
    for a, b in zip(loop["history"]["train"], batched["history"]["train"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["hvps_per_task"] == b["hvps_per_task"]


@needs_data
def test_resume_continues_bitwise(tmp_path, cache_dir):
    """Stopping after 2 iterations and resuming gives the 3rd loss of an uninterrupted run, bit for bit."""
    anil = script("omniglot_anil")
    straight = anil.main(tiny(tmp_path / "straight", cache_dir, 3))
    anil.main(tiny(tmp_path / "resumed", cache_dir, 2))
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["iteration"] == 2
    resumed = anil.main(tiny(tmp_path / "resumed", cache_dir, 3, "--resume"))
    assert [r["iteration"] for r in resumed["history"]["train"]] == [1, 2, 3]
    assert resumed["history"]["train"] == straight["history"]["train"]
    assert resumed["test"] == straight["test"]


@needs_data
def test_resume_refuses_other_settings(tmp_path, cache_dir):
    anil = script("omniglot_anil")
    anil.main(tiny(tmp_path, cache_dir, 2))
    with pytest.raises(SystemExit, match="ways: 5 -> 4"):
        anil.main(tiny(tmp_path, cache_dir, 3, "--resume", "--ways", "4"))


@needs_data
def test_hybrid_table(tmp_path, cache_dir):
    argv = tiny(tmp_path, cache_dir, 2, "--steps", "3", "--L", "1", "--C", "2")
    rows = script("hybrid_binom_trunc").main(argv)
    table = (tmp_path / "table.md").read_text()
    for name in ("Hybrid(L=1, C=2", "Binomial(L=1", "Truncated(L=1)"):
        assert name in table
    # HVPs per task's meta-gradient: Hybrid(1, 2) L(C-L+1) = 2, Binomial(1) L(K-L+1) = 3, Truncated(1) L = 1.
    assert [rows[n]["hvps_per_task"] for n in ("hybrid", "binom", "trunc")] == [2, 3, 1]
    assert all(0 <= r["test"]["accuracy"] <= 1 for r in rows.values())


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--ways", "0"], "--ways"),
        (["--inner-lr", "fast"], "--inner-lr"),
        (["--estimator", "trunc", "--L", "6", "--steps", "5"], "--L"),
        (["--estimator", "hybrid", "--L", "3", "--C", "2"], "--C"),
        (["--shots", "10", "--queries", "15"], "--queries"),
        (["--estimator", "imaml", "--L", "0"], "cg_steps"),
        (["--estimator", "reptile"], "omniglot_maml.py"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        script("omniglot_anil").main(argv)
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_anil_feature_shortcut_gives_the_exact_body_meta_gradient():
    """Features computed once outside the closure and the plain ``m(x)`` closure give the same
    meta-gradient at L = K (float64, tiny Conv4), for the body as well as the head."""
    torch.manual_seed(0)
    model = Conv4(out_features=3, hidden=4, image_size=16).double()
    x_s, y_s = torch.randn(6, 1, 16, 16, dtype=torch.float64), torch.arange(6) % 3
    x_q, y_q = torch.randn(9, 1, 16, 16, dtype=torch.float64), torch.arange(9) % 3

    def meta_gradient(closure_of):
        model.zero_grad()
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(model.head.parameters(), lr=0.3), steps=3, estimator=bo.Binomial(3))
        learner = engine.adapt(closure_of())
        F.cross_entropy(learner(x_q), y_q).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    head = script("omniglot_anil").head
    plain = meta_gradient(lambda: (lambda m: F.cross_entropy(m(x_s), y_s)))
    shortcut = meta_gradient(lambda: (lambda features: (lambda m: F.cross_entropy(head(m, features), y_s)))(model.features(x_s)))
    for name in plain:
        torch.testing.assert_close(shortcut[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)
    assert plain["features.0.weight"].abs().sum() > 0


@needs_data
def test_compare_runs_writes_table_1_and_figure_5a(tmp_path, cache_dir):
    maml = script("omniglot_maml")
    runs = {name: tmp_path / name for name in ("exact", "binom", "fo", "trunc")}
    results = {name: maml.main(tiny(out, cache_dir, 2, "--estimator", name)) for name, out in runs.items()}
    text = script("compare_runs").main([*map(str, runs.values()), "--out", str(tmp_path / "compare")])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0] for row in rows] == ["| FOMAML", "| TruncMAML", "| BinomMAML (paper scale)", "| MAML"]
    delta = 100 * (results["fo"]["test"]["accuracy"] - results["exact"]["test"]["accuracy"])
    assert rows[0].split(" | ")[3] == f"{delta:+.2f}" and rows[-1].split(" | ")[3] == ""
    assert "### Omniglot 5-way 1-shot (MAML, K=2" in text
    assert (tmp_path / "compare" / "table.md").read_text() == text
    assert (tmp_path / "compare" / "curves.png").is_file() == HAS_MATPLOTLIB
    with pytest.raises(SystemExit, match="results.json not found"):
        script("compare_runs").main([str(tmp_path / "nothing")])


def test_error_bounds_runs(tmp_path):
    script("error_bounds").main(["--samples", "2", "--out", str(tmp_path)])
    assert "| L | FO bound |" in (tmp_path / "error_bounds.md").read_text()
    assert (tmp_path / "error_bounds.png").is_file() == HAS_MATPLOTLIB


def test_sinusoid_runs(tmp_path, capsys):
    argv = ["--batches", "2", "--tasks", "2", "--alphas", "0.003", "0.01", "--iterations", "2",
            "--eval-tasks", "3", "--out", str(tmp_path)]
    results = script("sinusoid_maml").main(argv)
    rows = results["training"]
    assert list(rows) == ["untrained", "Binomial(L=1, hessian_scale='exact')", "Binomial(L=1, hessian_scale='paper')", "Exact()"]
    assert all(0 <= rows[name]["diverging_meta_steps"] <= 2 for name in list(rows)[1:])
    printed = capsys.readouterr().out
    for name, row in rows.items():
        assert f"| {name} | {row['post_adaptation_mse']:.3f} |" in printed
    assert printed.count("How to read") == 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["errors"]) == {"0.003", "0.01"} and len(saved["errors"]["0.01"]["binomial"]) == 4
    curves = results["errors_per_batch"][0.01]
    assert list(curves) == ["FirstOrder()", "Truncated(L=4)", "Binomial(L=4, hessian_scale='exact')"]
    assert all(len(errs) == 2 and all(e >= 0 for e in errs) for errs in curves.values())
    for png in ("meta_gradient_error.png", "figure3a_per_batch.png"):
        assert (tmp_path / png).is_file() == HAS_MATPLOTLIB


@needs_data
def test_torchrun_two_ranks_train_like_one_process(tmp_path, cache_dir):
    """`torchrun --nproc_per_node 2` splits each meta-batch over two gloo ranks; the losses match one process."""
    import subprocess

    single = script("omniglot_anil").main(tiny(tmp_path / "single", cache_dir, 3, "--meta-batch", "4"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / "omniglot_anil.py"), *tiny(tmp_path / "ranks", cache_dir, 3, "--meta-batch", "4")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads((tmp_path / "ranks" / "results.json").read_text())
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    for a, b in zip(sharded["history"]["train"], single["history"]["train"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == pytest.approx(b["accuracy"])
    assert len(list((tmp_path / "ranks").glob("checkpoint*"))) == 1  # rank 0 alone writes


@needs_data
def test_two_runs_with_one_seed_are_bitwise_identical(tmp_path, cache_dir):
    first = script("omniglot_anil").main(tiny(tmp_path / "a", cache_dir, 2))
    second = script("omniglot_anil").main(tiny(tmp_path / "b", cache_dir, 2))
    assert first["history"]["train"] == second["history"]["train"] and first["test"] == second["test"]
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_data
def test_vit_lora_example_runs_end_to_end_and_meta_learns_its_base(tmp_path, cache_dir, capsys):
    """The ViT + LoRA example through the harness: the report, and a base that moved (it is not in the inner
    optimizer; its meta-gradient comes through the closure) next to adapters that moved from their init."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    vit = script("omniglot_vit_lora")
    results = vit.main(tiny(tmp_path, cache_dir, 3, "--layers", "1", "--heads", "2", "--lora-rank", "2"))
    check_results(results, tmp_path, 3)
    assert results["method"] == "ViT-LoRA" and results["hvps_per_task"] == 2 and results["config"]["threads"] == 1
    assert "| training | 3 iterations," in capsys.readouterr().out
    torch.manual_seed(0)
    initial = vit.build_model(5, hidden=8, layers=1, heads=2, lora_rank=2).state_dict()
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert initial.keys() == trained.keys()
    moved = {k for k in trained if not torch.equal(trained[k], initial[k])}
    for part in ("q_proj.base_layer.weight", "mlp.fc1.weight", "patch_embeddings", "lora_A", "lora_B", "classifier"):
        assert any(part in k for k in moved), part
    with pytest.raises(SystemExit, match="lora_rank: 2 -> 4"):
        vit.main(tiny(tmp_path, cache_dir, 4, "--layers", "1", "--heads", "2", "--resume"))


def test_vit_lora_meta_step_is_exact_against_unrolled_autograd(monkeypatch):
    """The ViT example's own meta-gradient (its SDPA model, LoRA adapters, closure and loop over tasks; K = 3, Exact)
    equals autograd through the unrolled inner loop (create_graph) of the same model with eager attention, float64,
    for the meta-learned base as well as the adapters' and the head's initial values."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from transformers.models.vit import modeling_vit

    vit = script("omniglot_vit_lora")
    sizes = dict(ways=3, hidden=16, layers=2, heads=2, lora_rank=2, image_size=8, patch_size=4)
    torch.manual_seed(0)
    model = vit.build_model(**sizes).double()
    reference = vit.build_model(**sizes, attn_implementation="eager").double()
    assert (model.config._attn_implementation, reference.config._attn_implementation) == ("sdpa", "eager")
    with torch.no_grad():  # LoRA's B starts at zero (every A then has a zero gradient at first): move every weight
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    reference.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    x_s, x_q = (torch.rand(2, n, 1, 8, 8, generator=gen, dtype=torch.float64) for n in (6, 9))
    y_s, y_q = (torch.arange(6) % 3).repeat(2, 1), (torch.arange(9) % 3).repeat(2, 1)
    steps, lr = 3, 0.5
    adapted = [n for n, p in reference.named_parameters() if any(p is q for q in vit.adapted_parameters(reference))]
    params = dict(reference.named_parameters())
    base = [n for n in params if n not in adapted]
    assert any("lora_A" in n for n in adapted) and any("classifier" in n for n in adapted)
    assert any("base_layer" in n for n in base) and any("layers.1.mlp.fc1" in n for n in base)

    def unrolled():
        outer = 0
        for t in range(2):
            fast = dict(params)
            for _ in range(steps):
                loss = F.cross_entropy(torch.func.functional_call(reference, fast, (), {"pixel_values": x_s[t]}).logits, y_s[t])
                grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=True)
                fast.update({n: fast[n] - lr * g for n, g in zip(adapted, grads)})
            query = torch.func.functional_call(reference, fast, (), {"pixel_values": x_q[t]}).logits
            outer = outer + F.cross_entropy(query, y_q[t]) / 2
        return dict(zip(params, torch.autograd.grad(outer, list(params.values()))))

    def binom_opt_gradient(estimator):
        model.zero_grad(set_to_none=True)
        engine = bo.MetaGradientEngine(model, torch.optim.SGD(vit.adapted_parameters(model), lr=lr), steps=steps, estimator=estimator)
        vit.meta_gradient(engine, (x_s, y_s, x_q, y_q), range(2))
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    def relative_error(got, want, names):
        got, want = (torch.cat([g[n].flatten() for n in names]) for g in (got, want))
        assert want.norm() > 0
        return float((got - want).norm() / want.norm())

    hf_eager = unrolled()  # Hugging Face's eager attention takes its softmax in float32, whatever the model's dtype
    monkeypatch.setattr(modeling_vit, "eager_attention_forward", _eager_attention_in_dtype)
    expected = unrolled()
    exact = binom_opt_gradient(bo.Exact())
    for names in (base, adapted):
        assert relative_error(exact, expected, names) < 1e-10
        assert relative_error(exact, hf_eager, names) < 1e-6  # that float32 softmax, and nothing else
    for n in params:  # k_proj's bias has a zero gradient (softmax ignores a shift of every score), hence the atol
        torch.testing.assert_close(exact[n], expected[n], rtol=1e-9, atol=1e-12, msg=n)
    # the comparison can tell: first-order leaves out the second-order terms, by far more than the tolerance
    assert relative_error(binom_opt_gradient(bo.FirstOrder()), expected, base) > 1e-3


def _eager_attention_in_dtype(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Hugging Face's eager attention (matmul, softmax, matmul) with the softmax in the inputs' dtype."""
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
