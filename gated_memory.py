"""Gated Memory: the adapter LIFT trains on a long input (arXiv 2502.14644, §3.3).

Why this shape. Attention of a query q over [long input ; context] splits exactly into
    g · Attn(q, long input) + (1 − g) · Attn(q, context),
where g is the share of q's attention mass that falls on the long input. Once the long input has
been taken out of the context, both g and Attn(q, long input) must come from the parameters, as
functions of q alone. So for every layer and every *query* head h, with q the head's query before
rotary embedding (the memory is about content, not position):
    m_h(q) = W2_h · SiLU(W1_h · q)                    D -> 2D -> D       the memory
    u_h(q) = w2_h · SiLU(W1'_h · q),  g_h = σ(3·(u − 1))   D -> ⌊√D⌋ -> 1   the gate, one scalar
    o_h    = (1 − g_h) · Attn_h + g_h · m_h(q)
and the o_h go on to the frozen output projection wo. Every base weight stays frozen.

It plugs into model.py through the hook `Attention.head_adapter`. The released code also trains a
rank-2 LoRA (alpha 4) on the output head beside the memories: `head_lora` (off by default) puts
one on `Transformer.output_adapter`.

Extensions of ours, all off by default: `memory_reads="layer"` gives each head's memory the queries
of all the layer's heads (the whole normalised residual stream, through the frozen wq) at the
same weight count, to measure how much the narrow 64-wide input slows storing
(results/NOTEBOOK.md, "Where each adapter writes": a little; the place the memory writes matters
more). `memory_reads="attention"` gives each head's memory what attention gathered for that head
(its output, D wide, the same weights) instead of its query; `"attention_layer"` the attention
outputs of all the layer's heads, H·D wide, the whole input LoRA on wo reads.
`memory_act="none"` drops the SiLU, so the memory is linear, W2·W1·x. `memory_scale=s` multiplies m
by s, as LoRA multiplies its update by alpha/rank: Adam moves each weight by about lr a step whatever
its gradient's size, so at one lr a memory scaled by 2 moves its output twice as far.
`gate_fixed=c` removes the gate: g is the constant c for every token, so that a run measures what
learning the gate costs (with memory_mix "add" and c = 1, each head adds m to its attention).

Initialisation (our choice; the released code applies kaiming-uniform to the stacked tensors,
which gives other scales): the input layers W1, W1' get PyTorch's usual fan-in scale so their
activations carry signal from the start; the output layers W2, w2 get tiny weights (std 1e-3),
so m ≈ 0 and u ≈ 0, hence g ≈ σ(−3) ≈ 0.047. A fresh adapter therefore scales each attention
output by ≈ 0.953: close to the base model, not equal to it (tests/test_gated_memory.py states
the bound). METHOD.md (in this repository) derives the split of attention that motivates g.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import write_adapter_file
from lora import LoRA, LoRAConfig
from model import ConfigError, Transformer
from options import option


@dataclass
class GatedMemoryConfig:
    memory_mult: int = option(2, "memory MLP hidden width, in multiples of the head dim D (the paper: 2)")
    gate_width: int = option(0, "gate MLP hidden width; 0 means ⌊√D⌋ as in the paper")
    gate_scale: float = option(3.0, "g = σ(gate_scale · (u − gate_shift)); the paper: 3")
    gate_shift: float = option(1.0, "the paper: 1, so a fresh gate (u ≈ 0) is σ(−3) ≈ 0.047")
    init_std: float = option(1e-3, "std of the output layers at initialisation (m ≈ 0, g ≈ σ(−3))")
    memory_reads: str = option("head", "what each head's memory reads: 'head', its own query (the paper); 'layer', "
                                       "the queries of all the layer's heads, i.e. the whole normalised residual stream "
                                       "through the frozen wq, at the same parameter count; 'attention', the head's "
                                       "attention output; 'attention_layer', the attention outputs of all the layer's "
                                       "heads, what LoRA on wo reads, at the same parameter count (our extensions)",
                               choices=("head", "layer", "attention", "attention_layer"))
    memory_mix: str = option("blend", "how a head's output takes the memory: 'blend', (1 − g)·attn + g·m (the paper); "
                                      "'add', attn + g·m, attention never damped (our extension, to measure what the "
                                      "damping costs the reading of a document in context)", choices=("blend", "add"))
    gate_floor: float = option(0.0, "our extension: every g below this is exactly 0, in training and answering, "
                                    "so that a shut head passes the base's attention unchanged (0 = the paper)")
    memory_act: str = option("silu", "the memory's nonlinearity: 'silu' (the paper), or 'none', a linear memory "
                                     "W2·W1·x, which with memory_reads 'attention_layer' is a LoRA on wo's input "
                                     "(our extension, to measure what the nonlinearity costs)", choices=("silu", "none"))
    memory_scale: float = option(1.0, "our extension: the memory's output is multiplied by this, as LoRA's update by "
                                      "alpha/rank (2 in every LoRA run here), so that at one lr Adam moves the memory's "
                                      "output as far as LoRA's (1 = the paper)")
    gate_fixed: float = option(0.0, "our extension: if above 0, there is no gate to learn and g is this constant "
                                    "for every token, in training and answering (to measure what learning the "
                                    "gate costs or buys; 0 = the paper's learned gate)")
    head_lora: int = option(0, "rank of a LoRA on the output head trained beside the memory, alpha = 2·rank "
                               "(the released code: rank 2, alpha 4); 0 = none")

    def __post_init__(self):
        fresh = 1 / (1 + math.exp(self.gate_scale * self.gate_shift))      # g of a fresh adapter, σ(−scale·shift)
        if not 0 <= self.gate_floor < fresh:
            raise ConfigError(f"--gate-floor {self.gate_floor}: must be at least 0 and below the fresh gate "
                              f"{fresh:.4f}, or every gate starts shut and none ever gets a gradient")
        if not self.memory_scale > 0:
            raise ConfigError(f"--memory-scale {self.memory_scale}: must be above 0, or the memory never learns")
        if not 0 <= self.gate_fixed <= 1:
            raise ConfigError(f"--gate-fixed {self.gate_fixed}: a gate is a share, between 0 and 1 (0 = learned)")

    def gate_hidden(self, head_dim: int) -> int:
        return self.gate_width or math.isqrt(head_dim)

    def memory_shape(self, n_heads: int, head_dim: int) -> tuple[int, int]:
        """(input width, hidden width) of one head's memory. Reading the whole layer's queries
        (H·D wide), the hidden width shrinks so that a head keeps the paper's weight count,
        D·2D + 2D·D = 4D² at memory_mult 2 (26 hidden units for SmolLM2's H = 9, D = 64)."""
        hidden = self.memory_mult * head_dim
        if self.memory_reads not in ("layer", "attention_layer"):   # a head's query, or its attention output
            return head_dim, hidden
        wide = n_heads * head_dim
        return wide, max(1, round(hidden * 2 * head_dim / (wide + head_dim)))


class GatedMemory(nn.Module):
    """Memory and gate MLPs for the H query heads of one layer; each head has its own weights,
    stored stacked along a leading H axis so that all heads run as one batched matmul."""

    def __init__(self, n_heads: int, head_dim: int, cfg: GatedMemoryConfig):
        super().__init__()
        H, D, R = n_heads, head_dim, cfg.gate_hidden(head_dim)
        I, W = cfg.memory_shape(H, D)                        # the memory's input and hidden widths
        self.cfg = cfg
        self.mem_in = nn.Parameter(torch.empty(H, I, W))     # W1_h
        self.mem_out = nn.Parameter(torch.empty(H, W, D))    # W2_h
        gated = not cfg.gate_fixed                           # with gate_fixed, no gate to learn
        # (draws in the same order as before gate_fixed existed, so a seed gives the same adapter)
        self.gate_in = nn.Parameter(torch.empty(H, D, R)) if gated else None    # W1'_h
        self.gate_out = nn.Parameter(torch.empty(H, R)) if gated else None      # w2_h
        nn.init.uniform_(self.mem_in, -1 / math.sqrt(I), 1 / math.sqrt(I))
        if gated:
            nn.init.uniform_(self.gate_in, -1 / math.sqrt(D), 1 / math.sqrt(D))
        nn.init.normal_(self.mem_out, std=cfg.init_std)
        if gated:
            nn.init.normal_(self.gate_out, std=cfg.init_std)
        self.gate_floor = cfg.gate_floor                     # sameness.py may change it for answering
        # Diagnostics, not training state: force g to a constant, or record the mean g per head.
        self.force_gate: Optional[float] = None
        self.gate_gain = 1.0                                 # g multiplied by this while answering (gate_gained)
        self.record_gates = False
        self.last_gates: Optional[torch.Tensor] = None       # (T, H) gates of the first sequence in the batch
        self.last_share: Optional[torch.Tensor] = None       # (T, H) the memory's share of the output
        # Answering with --switch (switch.py): thresholds read once, and the last question's decision.
        self.switch_thresholds: dict = {}
        self.switch_last: Optional[dict] = None
        # Training, not diagnostics: gates_collected puts a list here that gathers every g (with its gradient).
        self.gate_log: Optional[list[torch.Tensor]] = None

    def gate(self, q: torch.Tensor) -> torch.Tensor:
        """g(q) in (0, 1). q: (B, T, H, D) -> (B, T, H, 1)."""
        h = F.silu(torch.einsum("bthd,hdr->bthr", q, self.gate_in))         # (B, T, H, R)
        u = torch.einsum("bthr,hr->bth", h, self.gate_out)                   # (B, T, H)
        return torch.sigmoid(self.cfg.gate_scale * (u.float() - self.cfg.gate_shift)).unsqueeze(-1)

    def memory(self, x: torch.Tensor) -> torch.Tensor:
        """m(x). x: what the memory reads, (B, T, H, D): the heads' queries (the paper), or their
        attention outputs with memory_reads 'attention…' (forward passes the right one) -> (B, T, H, D)."""
        if self.cfg.memory_reads in ("layer", "attention_layer"):   # every head reads all H heads, (B, T, H·D)
            h = torch.einsum("bti,hiw->bthw", x.flatten(2), self.mem_in)
        else:                                        # each head its own query (the paper) or attention
            h = torch.einsum("bthd,hdw->bthw", x, self.mem_in)              # (B, T, H, 2D)
        if self.cfg.memory_act == "silu":            # else linear: m = W2·W1·x
            h = F.silu(h)
        m = torch.einsum("bthw,hwd->bthd", h, self.mem_out)                 # (B, T, H, D)
        return m * self.cfg.memory_scale if self.cfg.memory_scale != 1 else m

    def forward(self, q: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """q: queries before rotary embedding (B, T, H, D); attn: per-head attention outputs
        (B, T, H, D). Returns (1 − g)·attn + g·m(q), or attn + g·m(q) if memory_mix is 'add', with m(attn)
        for m(q) if memory_reads is 'attention' or 'attention_layer'; (B, T, H, D)."""
        # g held at a constant (a diagnostic's force_gate, else --gate-fixed), or None: the learned gate
        fixed = self.force_gate if self.force_gate is not None else (self.cfg.gate_fixed or None)
        g = self.gate(q) if fixed is None else torch.full_like(q[..., :1], fixed, dtype=torch.float32)
        if self.gate_gain != 1 and fixed is None:            # a diagnostic: the learned gate louder or quieter
            g = (g * self.gate_gain).clamp(max=1.0)
        if self.gate_floor:          # a head whose g is below the floor passes the base's attention unchanged
            g = torch.where(g < self.gate_floor, 0.0, g)      # (and gets no gradient there: it stays shut
                                                              #  unless its weights move for other tokens)
        if self.record_gates:
            self.last_gates = g[0, :, :, 0].detach().float().cpu()            # (T, H)
        if self.gate_log is not None:
            self.gate_log.append(g)
        if self.force_gate == 0.0:   # exactly the base model: skip m (and its rounding) altogether
            if self.record_gates:
                self.last_share = torch.zeros_like(self.last_gates)
            return attn
        m = self.memory(attn if self.cfg.memory_reads.startswith("attention") else q).to(attn.dtype)
        add = self.cfg.memory_mix == "add"
        if self.record_gates:        # the memory's share of the head's output: |g·m| / (|attention kept| + |g·m|)
            kept = attn.float() if add else (1 - g) * attn.float()                # what is left of attention
            a, b = kept[0].norm(dim=-1), (g * m.float())[0].norm(dim=-1)          # (T, H)
            self.last_share = (b / (a + b + 1e-12)).detach().cpu()
        if add:                      # attention as the base model's, the memory on top
            return attn + g.to(attn.dtype) * m
        return attn + g.to(attn.dtype) * (m - attn)          # (1 − g)·attn + g·m in three elementwise steps


# ----------------------------------------------------------------------------- attaching and freezing
def attach(model: Transformer, cfg: GatedMemoryConfig, seed: Optional[int] = None) -> list[GatedMemory]:
    """Give every attention layer a fresh Gated Memory (fp32, on the model's device); returns them.
    Any adapter already attached is replaced. seed makes the initialisation reproducible."""
    device = model.tok_embeddings.weight.device
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    adapters = []
    for layer in model.layers:
        mem = GatedMemory(model.cfg.n_heads, model.cfg.head_dim, cfg).to(device)
        layer.attention.head_adapter = mem
        adapters.append(mem)
    # The released code's second part, if asked: a LoRA on the output head (tied to the embeddings
    # here, so an added (α/r)·B A x on the final states, not a hook on a module), B = 0 at first.
    model.output_adapter = (LoRA(model.cfg.dim, model.cfg.vocab_size, LoRAConfig(cfg.head_lora, 2.0 * cfg.head_lora))
                            .to(device) if cfg.head_lora else None)
    if seed is not None:
        torch.random.set_rng_state(gen_state)
    mark_only_adapter_trainable(model)
    model.adapter_config = cfg
    return adapters


def adapters(model: Transformer) -> list[GatedMemory]:
    return [l.attention.head_adapter for l in model.layers if l.attention.head_adapter is not None]


@contextmanager
def gates_collected(model: Transformer, on: bool = True):
    """Yields a list that gathers every gate g the memories compute inside the block, with its
    gradient: (B, T, H, 1) per layer and forward pass, in order. Empty if `on` is false or no
    Gated Memory is attached. For training terms on the gate (anchor.py, lift.batch_loss)."""
    log, memories = [], adapters(model) if on else []
    for m in memories:
        m.gate_log = log
    try:
        yield log
    finally:
        for m in memories:
            m.gate_log = None


@contextmanager
def gate_gained(model: Transformer, gain: float):
    """Inside the block, every learned g is multiplied by `gain` (capped at 1). A diagnostic of
    whether the memory's answers want a louder or a quieter gate than the one it learnt (eval.py
    --gate-gain); the gate's own weights are untouched."""
    memories = adapters(model)
    for m in memories:
        m.gate_gain = gain
    try:
        yield
    finally:
        for m in memories:
            m.gate_gain = 1.0


def remove(model: Transformer) -> None:
    for layer in model.layers:
        layer.attention.head_adapter = None
    model.output_adapter, model.adapter_config = None, None


@contextmanager
def disabled(model: Transformer):
    """Run the plain base model for a while (ICL mode), then put the adapters back."""
    saved, head = [l.attention.head_adapter for l in model.layers], model.output_adapter
    for layer in model.layers:
        layer.attention.head_adapter = None
    model.output_adapter = None
    try:
        yield
    finally:
        for layer, a in zip(model.layers, saved):
            layer.attention.head_adapter = a
        model.output_adapter = head


def is_adapter_param(name: str) -> bool:
    return ".head_adapter." in name or name.startswith("output_adapter.")


def mark_only_adapter_trainable(model: Transformer) -> None:
    """Freeze every base weight; train only the Gated Memory MLPs (and the output head's LoRA)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))


def trainable_parameters(model: Transformer) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors, by their names in the model."""
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_param(n)}


# ----------------------------------------------------------------------------- saving and loading
FORMAT = "lift-gated-memory/1"


def save(model: Transformer, path: str, extra: Optional[dict] = None) -> None:
    """Only the adapter's tensors, its config and the base fingerprint (safetensors, atomic)."""
    write_adapter_file(model, path, FORMAT, asdict(model.adapter_config), adapter_state_dict(model), extra)


def restore(model: Transformer, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Attach an adapter with this config and exactly these tensors (from checkpoint.read_adapter_file)."""
    attach(model, GatedMemoryConfig(**config))
    own = adapter_state_dict(model)
    if set(tensors) != set(own):
        raise ConfigError(f"adapter tensors do not match this model (missing {sorted(set(own) - set(tensors))[:3]}, "
                          f"unexpected {sorted(set(tensors) - set(own))[:3]})")
    with torch.no_grad():
        for n, p in own.items():
            if tensors[n].shape != p.shape:
                raise ConfigError(f"{n} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[n])
