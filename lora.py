"""A LoRA baseline for the paper's adapter ablation (arXiv 2502.14644, §4: Gated Memory against
PiSSA, a LoRA variant): the same LIFT loop, but the trainable part is a low-rank update
    W x  ->  W x + (α / r) · B A x,     A: (r, in), B: (out, r)
on the attention and feed-forward projections (wq, wk, wv, wo, w1, w2, w3) of every block, or on
one of the two groups only (`targets`, a probe of where a document's facts are stored).

It has the same interface as gated_memory.py (attach, remove, disabled, adapters, save, load) so
that lift.py can train either. Departures: plain LoRA initialisation (A small random, B = 0, so a
fresh adapter *is* the base model), not PiSSA's SVD initialisation; the update is added by a
forward hook on each frozen nn.Linear, so the base model's modules and names stay untouched.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from checkpoint import write_adapter_file
from model import ConfigError, Transformer
from options import option

TARGETS = {"attention": ("attention.wq", "attention.wk", "attention.wv", "attention.wo"),
           "feed_forward": ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
           "values": ("attention.wv", "attention.wo"),     # what attention reads and writes, not where it looks
           "wo": ("attention.wo",)}    # only what it writes, at each position alone, where Gated Memory writes
TARGETS["all"] = TARGETS["attention"] + TARGETS["feed_forward"]


@dataclass
class LoRAConfig:
    rank: int = option(16, "r (the paper's PiSSA baseline: r = 128 on an 8B model)")
    alpha: float = option(32.0, "the update is scaled by alpha / rank")
    targets: str = option("all", "which projections get an update: all, attention (wq wk wv wo), "
                                 "feed_forward (w1 w2 w3), values (wv wo) or wo alone, to see where a document's facts "
                                 "are stored",
                          choices=tuple(TARGETS))


class LoRA(nn.Module):
    """The low-rank update for one nn.Linear: returns (α/r)·B A x for input x (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig):
        super().__init__()
        self.A = nn.Parameter(torch.empty(cfg.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, cfg.rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = cfg.alpha / cfg.rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale


def _hook(lora: LoRA):
    def add_update(module, inputs, output):
        return output + lora(inputs[0]) if lora.enabled else output
    return add_update


def attach(model: Transformer, cfg: LoRAConfig, seed: Optional[int] = None) -> list[LoRA]:
    remove(model)
    if seed is not None:
        torch.manual_seed(seed)
    device = model.tok_embeddings.weight.device
    model.lora = nn.ModuleDict()
    model._lora_handles = []
    for i, layer in enumerate(model.layers):
        for target in TARGETS[cfg.targets]:
            linear = layer.get_submodule(target)
            lora = LoRA(linear.in_features, linear.out_features, cfg).to(device)
            model.lora[f"{i}_{target.replace('.', '_')}"] = lora
            model._lora_handles.append(linear.register_forward_hook(_hook(lora)))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("lora."))
    model.adapter_config = cfg
    return list(model.lora.values())


def adapters(model: Transformer) -> list[LoRA]:
    return list(model.lora.values()) if getattr(model, "lora", None) is not None else []


def remove(model: Transformer) -> None:
    for h in getattr(model, "_lora_handles", []):
        h.remove()
    model._lora_handles, model.lora, model.adapter_config = [], None, None


@contextmanager
def disabled(model: Transformer):
    for a in adapters(model):
        a.enabled = False
    try:
        yield
    finally:
        for a in adapters(model):
            a.enabled = True


def adapter_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith("lora.")}


FORMAT = "lift-lora/1"


def save(model: Transformer, path: str, extra: Optional[dict] = None) -> None:
    write_adapter_file(model, path, FORMAT, asdict(model.adapter_config), adapter_state_dict(model), extra)


def restore(model: Transformer, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Attach LoRA with this config and exactly these tensors (from checkpoint.read_adapter_file)."""
    attach(model, LoRAConfig(**config))
    own = adapter_state_dict(model)
    if set(tensors) != set(own) or any(tensors[n].shape != p.shape for n, p in own.items()):
        raise ConfigError("LoRA tensors do not match this model")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(tensors[n])
