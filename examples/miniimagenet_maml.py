"""MAML on miniImageNet (or tieredImageNet) with binom_opt: the paper's Table 1 protocol.

The defaults are Table 1's 5-way 1-shot protocol (Finn et al., 2017): Conv4-32 on 84x84 colour
images, K=5 inner SGD steps at alpha=0.01 (10 at test time), meta-batch 4, 15 queries per class,
20,000 iterations, early stopping on validation and 600 meta-test tasks with a 95% confidence
interval (``--preset paper`` or ``paper-1shot`` names it); ``--preset paper-5shot`` is the 5-shot one
(meta-batch 2). It is a GPU job. The data
cannot be downloaded (see ``fewshot/imagenet.py`` for the forms it reads): ``--data-root`` is needed.
The meta-training loop and the evaluation are those of ``omniglot_maml.py`` (its ``meta_train``); what
differs is the data, the model's input and the protocol. ``compare_runs.py`` turns finished runs into Table 1's layout.

    python examples/miniimagenet_maml.py --data-root ~/data/miniimagenet --device cuda --estimator binom --L 1
    python examples/miniimagenet_maml.py --data-root ~/data/miniimagenet --device cuda --preset paper-5shot --estimator imaml --L 2
    python examples/miniimagenet_maml.py --dataset tiered --data-root ~/data/tieredimagenet --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from omniglot_maml import meta_train

import binom_opt as bo

from fewshot.imagenet import SPLITS, DataNotFound, load_miniimagenet, load_tieredimagenet
from fewshot.models import Conv4
from fewshot.run import common_parser, parse

DATASETS = {"mini": ("miniImageNet", load_miniimagenet), "tiered": ("tieredImageNet", load_tieredimagenet)}
DEFAULTS = dict(ways=5, shots=1, queries=15, steps=5, eval_steps=10, inner_lr=0.01, meta_batch=4, iterations=20000, hidden=32,
                eval_every=500, val_tasks=300, checkpoint_every=500, early_stopping=True, out=Path("runs/miniimagenet_maml"))
# "paper" is Table 1's 1-shot protocol (the defaults), named so that the command says which protocol it ran
PRESETS = {"paper": dict(shots=1, meta_batch=4), "paper-1shot": dict(shots=1, meta_batch=4),
           "paper-5shot": dict(shots=5, meta_batch=2)}


def main(argv=None):
    parser = common_parser(__doc__, DEFAULTS, PRESETS, omniglot=False)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mini", help="miniImageNet or tieredImageNet")
    args = parse(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = bo.distributed.init_from_env(torch.device(args.device))
    name, load = DATASETS[args.dataset]
    try:  # the data, or a short error that says what was expected
        splits = {split: load(args.data_root, split) for split in SPLITS}
    except (DataNotFound, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    torch.manual_seed(args.seed)
    model = Conv4(in_channels=3, out_features=args.ways, hidden=args.hidden, image_size=84)
    return meta_train(model, splits, args, rank, world, dataset=name)  # omniglot_maml.py's loop and evaluation

if __name__ == "__main__":
    main()
