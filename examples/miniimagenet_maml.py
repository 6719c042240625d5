"""MAML on miniImageNet (or tieredImageNet) with binom_opt: the paper's Table 1 protocol.

The defaults are Table 1's 5-way 1-shot protocol (Finn et al., 2017): Conv4-32 on 84x84 colour
images, K=5 inner SGD steps at alpha=0.01 (10 at test time), meta-batch 4, 15 queries per class,
20,000 iterations, early stopping on validation and 600 meta-test tasks with a 95% confidence
interval (``--preset paper`` or ``paper-1shot`` names it); ``--preset paper-5shot`` is the 5-shot one
(meta-batch 2). It is a GPU job.

``--network resnet12`` swaps Conv4 for ResNet-12 (64-160-320-640, 12.4M parameters, see ``fewshot/models.py``),
the backbone on which MAML needs many inner steps: ``--preset resnet12-1shot`` (K=15 at alpha=0.05) and
``resnet12-5shot`` (K=20 at alpha=0.1) are the inner loops of Ye & Chao, "How to train your MAML to excel in
few-shot classification" (ICLR 2022), the same K at test time; the meta-batch, meta-optimiser and iterations
stay this script's, and that paper's other changes (its initialisation, the shared head of UNICORN-MAML) are
not reproduced. Unrolled exact MAML keeps the graph of every inner step of that network, the memory wall that
``benchmarks/memory_wall.py`` measures; binom_opt's meta-gradients hold about one parameter copy per step. The data
cannot be downloaded (see ``fewshot/imagenet.py`` for the forms it reads): ``--data-root`` is needed.
The meta-training loop and the evaluation are those of ``omniglot_maml.py`` (its ``meta_train``); what
differs is the data, the model's input and the protocol. ``compare_runs.py`` turns finished runs into Table 1's layout.

    python examples/miniimagenet_maml.py --data-root ~/data/miniimagenet --device cuda --estimator binom --L 1
    python examples/miniimagenet_maml.py --data-root ~/data/miniimagenet --device cuda --preset paper-5shot --estimator imaml --L 2
    python examples/miniimagenet_maml.py --dataset tiered --data-root ~/data/tieredimagenet --device cuda
    python examples/miniimagenet_maml.py --data-root ~/data/miniimagenet --device cuda --preset resnet12-5shot --estimator exact
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from omniglot_maml import meta_train

import binom_opt as bo

from fewshot.imagenet import SPLITS, DataNotFound, load_miniimagenet, load_tieredimagenet
from fewshot.models import DEFAULT_HIDDEN, NETWORKS, build_network
from fewshot.run import common_parser, parse

DATASETS = {"mini": ("miniImageNet", load_miniimagenet), "tiered": ("tieredImageNet", load_tieredimagenet)}
DEFAULTS = dict(ways=5, shots=1, queries=15, steps=5, eval_steps=10, inner_lr=0.01, meta_batch=4, iterations=20000, hidden=None,
                eval_every=500, val_tasks=300, checkpoint_every=500, early_stopping=True, out=Path("runs/miniimagenet_maml"))
# "paper" is Table 1's 1-shot protocol (the defaults), named so that the command says which protocol it ran;
# every preset names its network and width
PAPER = dict(network="conv4", hidden=32, steps=5, eval_steps=10, inner_lr=0.01)
PRESETS = {"paper": dict(PAPER, shots=1, meta_batch=4), "paper-1shot": dict(PAPER, shots=1, meta_batch=4),
           "paper-5shot": dict(PAPER, shots=5, meta_batch=2),
           # Ye & Chao (ICLR 2022): MAML on ResNet-12 needs many inner steps, at a larger step size
           "resnet12-1shot": dict(network="resnet12", hidden=64, shots=1, steps=15, eval_steps=15, inner_lr=0.05),
           "resnet12-5shot": dict(network="resnet12", hidden=64, shots=5, steps=20, eval_steps=20, inner_lr=0.1)}


def main(argv=None):
    parser = common_parser(__doc__, DEFAULTS, PRESETS, omniglot=False)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mini", help="miniImageNet or tieredImageNet")
    parser.add_argument("--network", choices=sorted(NETWORKS), default="conv4",
                        help=f"the backbone; --hidden defaults to its usual width ({DEFAULT_HIDDEN})")
    args = parse(parser, argv)
    args.hidden = args.hidden or DEFAULT_HIDDEN[args.network]  # before the run records it: a resume checks it
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = bo.distributed.init_from_env(torch.device(args.device))
    name, load = DATASETS[args.dataset]
    try:  # the data, or a short error that says what was expected
        splits = {split: load(args.data_root, split) for split in SPLITS}
    except (DataNotFound, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    torch.manual_seed(args.seed)
    model = build_network(args.network, in_channels=3, out_features=args.ways, image_size=84, hidden=args.hidden)
    return meta_train(model, splits, args, rank, world, dataset=name)  # omniglot_maml.py's loop and evaluation

if __name__ == "__main__":
    main()
