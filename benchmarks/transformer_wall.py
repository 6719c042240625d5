"""The memory wall on a transformer: one meta-step of a BERT-shaped encoder whose LoRA adapters adapt, against K.

A BERT-shaped encoder built in code (random init, no download; ``suite/transformer.py``): by default 4 layers of
hidden 256 and 4 heads, BERT's 30,522-token vocabulary, one task of 8 support and 8 query sequences of 128 tokens.
LoRA adapters of rank 8 on every layer's query and value projections adapt in K inner SGD steps; everything else is
meta-learned and gets its meta-gradient. Methods (``--methods`` takes shell-style patterns):

* ``higher``: ``higher.innerloop_ctx`` with eager attention (the only kind whose unrolled graph it can differentiate
  twice) and the adapters as plain modules (higher cannot patch peft's LoRA layers);
* ``autograd``: the unrolled loop (``functional_call``, ``create_graph=True``) on the peft model, eager attention;
* ``exact``: binom_opt's ``Exact()`` on the peft model, Hugging Face's default attention, default options;
* ``exact-inner-step``: the same with ``memory_budget="inner_step"``. With the base meta-learned, Exact adds each
  step's mixed second-order term (the base's share), and on the CPU the default budget computes those of all K
  steps in one batched call, holding K steps' activations at once; ``"inner_step"`` takes them a step at a time.

Each (method, K) point is one meta-step in a fresh child process, measured, fitted and extrapolated as
``memory_wall.py`` does (``suite/wall.py``): peak memory above what was in use before it, its time, the growth per
inner step (in MiB and in copies of the LoRA adapters), the largest K in 8 and 16 GiB and the ratios of higher's peak
to each Exact's. A point predicted above ``--max-memory`` is skipped, never run.

    python benchmarks/transformer_wall.py                     # the default points: a few minutes on 2 CPU cores
    python benchmarks/transformer_wall.py --methods 'exact' --ks 32
    python benchmarks/transformer_wall.py --config bert-base --device cuda --ks 1 2 4 8 16   # BERT-base's shape
    python benchmarks/transformer_wall.py --from-json benchmarks/results/transformer_wall_cpu.json   # re-render only

Writes ``transformer_wall_<device>[_<config>].{json,md,png}`` to ``--out`` (no suffix for the default config) and
prints the markdown.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_wall import MEMORY_SHARE, checked, measure, parse_mib, plan, total_memory_mib, write

from suite import MIB, log
from suite.children import preload, run_step_job
from suite.report import machine_info, machine_text, memory_note
from suite.transformer import CONFIGS, adapter_numel, build_model

# name -> (the name the child's factory knows, the K values measured by default): chosen so that the default run takes
# minutes on 2 CPU cores; the graph-free Exact grows by an adapter's copy per step, so its Ks reach further, to show
# that growth against the measurement's noise
METHODS: Dict[str, Tuple[str, Tuple[int, ...]]] = {
    "higher": ("higher", (1, 2, 3, 4)),
    "autograd": ("autograd", (1, 2, 3, 4)),
    "exact": ("exact", (1, 2, 4, 8)),
    "exact-inner-step": ("exact-inner-step", (1, 2, 4, 8, 16, 32)),
}
DEFAULT_METHODS = ("higher", "exact", "exact-inner-step")
DEFAULT_CONFIG = "bert-small"
FACTORY = "suite.transformer:make_step"


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--config", choices=sorted(CONFIGS), default=DEFAULT_CONFIG, help="the encoder and task shapes")
    p.add_argument("--methods", nargs="+", metavar="PATTERN",
                   help=f"patterns over {' '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--ks", type=int, nargs="+", help="the K values of every chosen method (default: each method's own)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--max-memory", type=parse_mib, help="skip a point whose predicted peak is above this (e.g. 14GiB; "
                   f"default {MEMORY_SHARE * 100:.0f}%% of the memory; on the CPU never above the memory available then)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--memory-budget", help="memory_budget= of the binom_opt engine (bytes, e.g. 512MiB)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--from-json", type=Path, metavar="PATH", help="re-render a run's table and plot without measuring")
    return checked(p.parse_args(argv), METHODS)


def main(argv: Optional[List[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json:
        return write(json.loads(args.from_json.read_text()), args.from_json.parent, args.from_json.stem)
    cfg = CONFIGS[args.config]
    names = [n for n in METHODS if any(fnmatch.fnmatch(n, pat) for pat in args.methods or DEFAULT_METHODS)]
    if args.max_memory is None:
        args.max_memory = MEMORY_SHARE * total_memory_mib(args.device)
    todo = plan(names, args.ks, METHODS)
    model = build_model(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    adapters = adapter_numel(cfg)
    assert adapters == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    del model
    setting = f"{cfg.describe()}; one meta-step into .grad"
    log(f"{setting}: {len(todo)} points on {args.device}, --max-memory {args.max_memory / 1024:.1f} GiB")
    preload("transformers", "peft", "suite.transformer")  # imported once by the children's server, not by every child
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="binom_opt_transformer_wall_") as tmp:
        def run_point(name: str, k: int) -> dict:
            spec = {**asdict(cfg), "method": METHODS[name][0], "steps": k}
            return run_step_job(FACTORY, spec, f"{name}_K{k}", args, Path(tmp), repeats=0, for_memory=args.device == "cpu")

        points = measure(todo, None, args, Path(tmp), run_point)
    document = {
        "command": "python benchmarks/transformer_wall.py " + shlex.join(argv),
        "setting": setting,
        "config": cfg.name,
        "device": args.device,
        "machine": machine_text(machine_info(args)),
        "memory": memory_note(args.device),
        "max_memory_mib": args.max_memory,
        "parameters": parameters,
        "parameter_mib": parameters * 4 / MIB,
        "copy_unit": {"name": "LoRA adapters", "parameters": adapters, "mib": adapters * 4 / MIB},
        "targets": False,  # the ResNet-12 wall's targets; here the ratios say it
        "compare": [["higher", "exact"], ["higher", "exact-inner-step"]],  # the ratios the report gives
        "wall_seconds": time.perf_counter() - started,
        "points": points,
    }
    suffix = "" if cfg.name == DEFAULT_CONFIG else f"_{cfg.name}"
    return write(document, args.out, f"transformer_wall_{args.device}{suffix}")


if __name__ == "__main__":
    main()
