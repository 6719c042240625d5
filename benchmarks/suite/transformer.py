"""The memory wall's transformer setting: a BERT-shaped encoder (random init, built in code) whose LoRA adapters adapt.

The adapters (rank ``rank`` on every layer's query and value projections) are what the inner loop moves; the
encoder, the embeddings and the classifier are meta-learned (they require grad and are not in the inner optimizer),
as in ``examples/omniglot_vit_lora.py``. One task: ``support`` and ``query`` random sequences of ``seq`` tokens with
random labels, one meta-step into ``.grad``. Methods:

* ``higher``: ``higher.innerloop_ctx``, with eager attention (its unrolled graph needs second derivatives of the
  attention) and the LoRA adapters as plain modules, because higher cannot patch peft's LoRA layers (their classes put
  ``nn.Module`` before ``ABC``, the opposite of higher's own base class, and Python finds no consistent method order);
* ``autograd``: the unrolled loop with ``torch.func.functional_call`` and ``create_graph=True`` on the peft model,
  eager attention (what higher computes, on the model binom_opt runs);
* ``exact``: binom_opt's ``Exact()`` on the peft model with Hugging Face's default attention (SDPA, replayed under
  the math kernel) and the engine's default options;
* ``exact-inner-step``: the same with ``memory_budget="inner_step"``.

The plain LoRA model is built from the peft one's weights, so every method starts from the same numbers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import binom_opt as bo

TARGETS = ("query", "value")  # BertSelfAttention's projections that get adapters


@dataclass(frozen=True)
class TransformerConfig:
    """A BERT-shaped encoder with a classifier, the task's shapes and the inner loop."""

    name: str
    hidden: int
    layers: int
    heads: int
    seq: int  # tokens per sequence
    support: int  # sequences
    query: int
    labels: int
    rank: int  # LoRA rank r (alpha = 2r, peft's usual scaling of 2)
    vocab: int = 30522  # BERT's WordPiece vocabulary
    lr: float = 0.01
    steps: int = 1  # K

    def describe(self) -> str:
        return (f"BERT-shaped encoder, {self.layers} layers, hidden {self.hidden}, {self.heads} heads, vocabulary {self.vocab}, "
                f"random init; LoRA r={self.rank} on query and value adapts, the rest is meta-learned; one task of "
                f"{self.support} support and {self.query} query sequences of {self.seq} tokens, {self.labels} classes; "
                f"K inner SGD steps at lr {self.lr}")


CONFIGS: Dict[str, TransformerConfig] = {
    # the CPU default: a few minutes on 2 cores
    "bert-small": TransformerConfig("bert-small", hidden=256, layers=4, heads=4, seq=128, support=8, query=8, labels=4, rank=8),
    # BERT-base's shape, for a GPU (benchmarks/gpu.sh)
    "bert-base": TransformerConfig("bert-base", hidden=768, layers=12, heads=12, seq=128, support=8, query=8, labels=4, rank=8),
    # the smoke test
    "bert-tiny": TransformerConfig("bert-tiny", hidden=32, layers=2, heads=2, seq=16, support=4, query=4, labels=2, rank=2,
                                   vocab=1000),
}


class LoRALinear(nn.Module):
    """``base_layer(x) + lora_B(lora_A(x)) * alpha / r``: peft's LoRA forward (dropout 0) as a plain module."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _bert(cfg: TransformerConfig, attn_implementation: Optional[str]) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                        intermediate_size=4 * cfg.hidden, max_position_embeddings=max(512, cfg.seq), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=cfg.labels,
                        **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    return BertForSequenceClassification(config)


def build_model(cfg: TransformerConfig, lora: str = "peft", attn_implementation: Optional[str] = None) -> nn.Module:
    """The encoder with LoRA adapters, every parameter requiring grad. ``lora``: ``"peft"`` (``get_peft_model``) or
    ``"plain"`` (:class:`LoRALinear`, the same weights as the peft model of this config)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    bert = _bert(cfg, attn_implementation if lora == "peft" else None)
    with warnings.catch_warnings():  # peft asks transformers >= 5 for a property it deprecated
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(bert, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=list(TARGETS), lora_dropout=0.0))
    if lora == "plain":
        weights = {k.removeprefix("base_model.model.").replace(".default.", "."): v for k, v in model.state_dict().items()}
        model = _bert(cfg, attn_implementation)
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, nn.Linear):
                parent, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, LoRALinear(module, cfg.rank, 2 * cfg.rank))
        model.load_state_dict(weights)
    return model.requires_grad_(True)  # peft freezes the base for fine-tuning; here it is meta-learned


def adapters(model: nn.Module) -> List[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def adapter_numel(cfg: TransformerConfig) -> int:
    """Parameters of the LoRA adapters: r (in + out) per adapted projection."""
    return cfg.layers * len(TARGETS) * cfg.rank * 2 * cfg.hidden


def build_task(cfg: TransformerConfig, device: torch.device) -> Tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    ids_s, ids_q = (torch.randint(cfg.vocab, (n, cfg.seq), generator=gen) for n in (cfg.support, cfg.query))
    y_s, y_q = (torch.randint(cfg.labels, (n,), generator=gen) for n in (cfg.support, cfg.query))
    return tuple(t.to(device) for t in (ids_s, y_s, ids_q, y_q))


def make_step(spec: dict, device: torch.device, engine_options: dict):
    """One meta-step of ``spec["method"]`` at ``spec["steps"]`` inner steps: a function that returns (HVPs, diverging).
    The model runs one forward before, so that what Hugging Face imports lazily is not counted in the meta-step."""
    fields = {k: v for k, v in spec.items() if k in TransformerConfig.__dataclass_fields__}
    cfg, method = TransformerConfig(**fields), spec["method"]
    if method == "higher":
        model = build_model(cfg, lora="plain", attn_implementation="eager")
    else:
        model = build_model(cfg, attn_implementation="eager" if method == "autograd" else None)
    model = model.to(device)
    ids_s, y_s, ids_q, y_q = build_task(cfg, device)
    with torch.no_grad():
        model(input_ids=ids_s)
    return _STEPS[method](model, cfg, (ids_s, y_s, ids_q, y_q), engine_options)


def _higher_step(model, cfg, task, engine_options):
    import higher

    ids_s, y_s, ids_q, y_q = task
    inner_opt = torch.optim.SGD(adapters(model), lr=cfg.lr)

    def step():
        model.zero_grad(set_to_none=True)
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(cfg.steps):
                diffopt.step(F.cross_entropy(fmodel(input_ids=ids_s).logits, y_s))
            F.cross_entropy(fmodel(input_ids=ids_q).logits, y_q).backward()
        return None, False

    return step


def _autograd_step(model, cfg, task, engine_options):
    ids_s, y_s, ids_q, y_q = task
    adapted = {n for n, p in model.named_parameters() if "lora_" in n}

    def step():
        model.zero_grad(set_to_none=True)
        params = dict(model.named_parameters())
        for _ in range(cfg.steps):
            loss = F.cross_entropy(torch.func.functional_call(model, params, (), {"input_ids": ids_s}).logits, y_s)
            names = [n for n in params if n in adapted]
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
            params = {**params, **{n: params[n] - cfg.lr * g for n, g in zip(names, grads)}}
        F.cross_entropy(torch.func.functional_call(model, params, (), {"input_ids": ids_q}).logits, y_q).backward()
        return None, False

    return step


def _exact_step(model, cfg, task, engine_options):
    ids_s, y_s, ids_q, y_q = task
    engine = bo.MetaGradientEngine(model, torch.optim.SGD(adapters(model), lr=cfg.lr), steps=cfg.steps, estimator=bo.Exact(),
                                   **engine_options)

    def step():
        model.zero_grad(set_to_none=True)
        learner = engine.adapt(lambda m: F.cross_entropy(m(input_ids=ids_s).logits, y_s))  # K steps, no graph kept
        F.cross_entropy(learner(input_ids=ids_q).logits, y_q).backward()
        return engine.last_stats.hvp_count, engine.last_stats.diverging

    return step


def _exact_inner_step(model, cfg, task, engine_options):
    return _exact_step(model, cfg, task, {**engine_options, "memory_budget": "inner_step"})


_STEPS = {"higher": _higher_step, "autograd": _autograd_step, "exact": _exact_step, "exact-inner-step": _exact_inner_step}
