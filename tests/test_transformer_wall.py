"""benchmarks/transformer_wall.py: its methods compute the same meta-gradient (float64, tiny BERT), and a tiny run of
its command line writes the table, the JSON it re-renders from, and the ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cpu_only  # processes and files on the host

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def load_script():
    spec = importlib.util.spec_from_file_location("transformer_wall", BENCHMARKS / "transformer_wall.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def hugging_face():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("higher")


def test_every_method_takes_the_same_meta_gradient_of_the_same_model():
    """higher on the plain LoRA model (eager attention), the unrolled loop and binom_opt's Exact, with either budget,
    on the peft model: one meta-gradient, float64, for the adapters' initial values and the meta-learned base."""
    from suite import transformer

    cfg = transformer.CONFIGS["bert-tiny"]
    task = transformer.build_task(cfg, torch.device("cpu"))
    grads = {}
    for method, lora, attention in [("higher", "plain", "eager"), ("autograd", "peft", "eager"), ("exact", "peft", None),
                                    ("exact-inner-step", "peft", None)]:
        model = transformer.build_model(cfg, lora=lora, attn_implementation=attention).double()
        with torch.no_grad():  # LoRA's B starts at zero: move every weight so that every term counts
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
        transformer._STEPS[method](model, cfg, task, {})()
        grads[method] = {n.removeprefix("base_model.model.").replace(".default.", "."): p.grad for n, p in model.named_parameters()}
    reference = grads.pop("higher")
    assert any("lora_A" in n for n in reference) and reference["bert.encoder.layer.1.intermediate.dense.weight"].norm() > 0
    assert len(transformer.adapters(model)) == 2 * cfg.layers * len(transformer.TARGETS)
    assert sum(p.numel() for p in transformer.adapters(model)) == transformer.adapter_numel(cfg)
    for method, got in grads.items():
        assert got.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-9, atol=1e-12, msg=f"{method}: {name}")


def test_a_tiny_run_writes_its_table_and_ratio_and_rerenders_from_its_json(tmp_path):
    script = load_script()
    out = tmp_path / "results"
    document = script.main(["--config", "bert-tiny", "--methods", "higher", "exact", "--ks", "1", "2", "--threads", "1",
                            "--out", str(out)])
    measured = [(p["method"], p["K"]) for p in document["points"] if p["status"] == "measured"]
    assert measured == [("higher", 1), ("higher", 2), ("exact", 1), ("exact", 2)]
    assert all(p["peak_mib"] > 0 and p["seconds"] > 0 for p in document["points"])
    assert document["copy_unit"]["parameters"] == 2 * 2 * 2 * 2 * 32 and "acceptance" not in document
    (ratio,) = document["ratios"]  # only the pair whose two methods ran
    assert ratio["of"] == ["higher", "exact"] and [r["K"] for r in ratio["peaks"]] == [1, 2, 10, 100]
    text = (out / "transformer_wall_cpu_bert-tiny.md").read_text()
    assert "Command: `python benchmarks/transformer_wall.py --config bert-tiny --methods higher exact" in text
    assert "| K | higher exact | Exact |" in text and "| in copies of the LoRA adapters |" in text
    assert "LoRA adapters (what adapts): 512 parameters" in text and "higher exact / Exact: peak " in text
    assert "Targets:" not in text
    saved = json.loads((out / "transformer_wall_cpu_bert-tiny.json").read_text())
    assert saved["points"] == document["points"]
    (out / "transformer_wall_cpu_bert-tiny.md").unlink()
    script.main(["--from-json", str(out / "transformer_wall_cpu_bert-tiny.json")])
    assert (out / "transformer_wall_cpu_bert-tiny.md").read_text() == text
    with pytest.raises(SystemExit, match=r"--methods \['hessian'\] match none of"):
        script.parse_args(["--methods", "hessian"])
