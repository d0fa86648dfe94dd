"""A compact Llama, written out so that it can be read: the base model LIFT adapts.

This file is the plain decoder of Llama 2/3 and its relatives (SmolLM2 is one): RMSNorm,
rotary position embedding, grouped-query attention, a SwiGLU feed-forward, a KV cache and
`generate`. It holds no LIFT code. The place where LIFT's Gated Memory (arXiv 2502.14644 §3.3, see
gated_memory.py) plugs in is `Attention.head_adapter`: a module that may replace each head's
attention output by a mix of that output and something computed from the head's query *before*
rotary embedding; `Transformer.output_adapter` may add to the logits (the released code's small
LoRA on the output head). With no adapter attached the model is a vanilla Llama.

checkpoint.py loads checkpoints (Hugging Face folders, hub ids, GGUF files) and the tokenizer.

Shape legend, used in the trailing comments:
    B  batch size              T  new tokens in this call     S  keys attended to (cache + T)
    C  model width (dim)       H  query heads                 H_kv  key/value heads
    D  head dim                F  feed-forward width          V  vocabulary size
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from options import UserError


class ConfigError(UserError):
    """A checkpoint or setting we refuse, with a message meant for the user."""


@dataclass
class ModelConfig:
    dim: int = 576                      # C, hidden_size
    n_layers: int = 30                  # num_hidden_layers
    n_heads: int = 9                    # H, num_attention_heads
    n_kv_heads: int = 3                 # H_kv, num_key_value_heads (H_kv < H is grouped-query attention)
    head_dim: int = 64                  # D; Hugging Face lets it differ from C // H
    ffn_dim: int = 1536                 # F, intermediate_size
    vocab_size: int = 49152             # V
    norm_eps: float = 1e-5              # rms_norm_eps
    rope_theta: float = 10000.0         # base of the rotary frequencies
    rope_scaling: Optional[dict] = None # {"rope_type": "llama3", "factor": ..., ...} or None
    tie_embeddings: bool = True         # output head shares the token embedding matrix
    max_seq_len: int = 8192             # max_position_embeddings: the context the model was trained for
    fused_attention: bool = True        # the fused kernel where it is the faster path (fused_kernel); False: never

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", "freq_factors"):
                raise ConfigError(f"rope_scaling of type {kind!r} is not supported (only 'llama3')")

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True)


# ----------------------------------------------------------------------------- rotary embedding
# We use the "rotate-half" layout that Hugging Face checkpoints expect: dimension i of a head is
# paired with dimension i + D/2. Meta's original code and llama.cpp pair (2i, 2i+1) instead; a
# checkpoint written in that layout (GGUF) needs its wq/wk rows permuted on load (checkpoint.py).

def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies θ_i = theta^(-2i/D), with Llama 3's long-context rescaling if set. -> (D/2,)"""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    rs = cfg.rope_scaling
    if rs is None or rs.get("rope_type", rs.get("type")) == "default":
        return inv_freq.float()
    if rs["rope_type"] == "freq_factors":   # GGUF stores llama3 rescaling as one divisor per frequency
        return (inv_freq / torch.tensor(rs["factors"], dtype=torch.float64)).float()
    # Llama 3.1: keep high frequencies (short wavelengths), divide low ones by `factor`,
    # and interpolate smoothly between the two bands.
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0 in the low band, 1 in the high band
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return scaled.float()


def rope_table(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for the given absolute positions (T,) -> two (T, D) fp32 tensors."""
    inv_freq = rope_frequencies(cfg).to(positions.device)
    angles = positions.float()[:, None] * inv_freq[None, :]   # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)              # (T, D): rotate-half pairs i with i + D/2
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair by its angle. x: (B, heads, T, D); cos, sin: (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)                               # (B, heads, T, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)                    # (B, heads, T, D)
    # In x's dtype, as Hugging Face does: the tables are exact in fp32, the product rounds once.
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ----------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 has too few mantissa bits for a mean of squares), scale after.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class KVCache:
    """Keys and values of past positions, one preallocated pair of tensors per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)  # (B, H_kv, S_max, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H_kv, T, D) at positions start..start+T; return all keys/values so far."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]   # (B, H_kv, S, D)


# On a CPU in bf16 the explicit math below beat the fused kernel or tied; in fp32 it tied or lost; with
# AMX it lost forward, 1.16x at 512 tokens and 1.5x at 2,048 (NOTEBOOK.md, "The attention path by
# dtype", "Speed on a CPU with AMX"). So bf16 on a CPU trains on it, and answers on it without AMX.
CPU_FUSED: Optional[bool] = None     # None: the choice above; the bench forces one path (True/False)
CPU_AMX = torch.cpu.get_capabilities().get("amx_bf16", False)   # bf16 matrix tiles (Sapphire Rapids on)
QUERY_BLOCK = 128    # a tuning: faster than 256 or 512 (its scores stay in cache)


def fused_kernel(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """F.scaled_dot_product_attention (True) or explicit_attention (False), for q of this dtype."""
    if cfg.fused_attention and device.type == "cpu":
        fastest = dtype == torch.float32 or (CPU_AMX and not torch.is_grad_enabled())
        return fastest if CPU_FUSED is None else CPU_FUSED
    return cfg.fused_attention


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """What the fused kernel computes, written out. q: (B, H, T, D) at positions start_pos..;
    k, v: (B, H_kv, S, D) at positions 0..S-1. -> (B, H, T, D). The R = H / H_kv query heads of a
    key/value head are stacked along time: one product per key/value head serves them all, with no
    copy of the keys and values. The queries go QUERY_BLOCK at a time, each block against only the
    keys it may see: no work on the masked triangle beyond the block (almost half of a long
    prompt's scores), and only (R·QUERY_BLOCK, S) scores in memory at once."""
    (B, H, T, D), (H_kv, S) = q.shape, k.shape[1:3]
    R = H // H_kv
    q, k, v = q.reshape(B * H_kv, R, T, D), k.reshape(B * H_kv, S, D), v.reshape(B * H_kv, S, D)
    out = []
    for s in range(0, T, QUERY_BLOCK):
        b = min(QUERY_BLOCK, T - s)                                # the block's queries: s..s+b-1
        seen = start_pos + s + b                                   # its last query sees keys 0..seen-1
        qb, kt = q[:, :, s:s + b].reshape(B * H_kv, R * b, D), k[:, :seen].transpose(1, 2)
        triangle = causal_mask(b, b, 0, q.device, q.dtype)        # its own keys (those before it: all seen)
        if torch.is_grad_enabled():    # training: mask + QKᵀ/√D in one product (in place was no faster there)
            mask = q.new_zeros(R, b, seen)
            mask[:, :, seen - b:] = triangle
            scores = torch.baddbmm(mask.view(R * b, seen), qb, kt, alpha=1 / math.sqrt(D))   # (B·H_kv, R·b, seen)
        else:                          # answering: QKᵀ/√D, then the triangle added in place: no mask copied
            scores = torch.bmm(qb * (1 / math.sqrt(D)), kt)
            scores.view(B * H_kv, R, b, seen)[..., seen - b:] += triangle
        probs = F.softmax(scores, dim=-1)        # computed in fp32 whatever its input, then rounded once
        out.append((probs @ v[:, :seen]).view(B * H_kv, R, b, D))
    return (out[0] if len(out) == 1 else torch.cat(out, dim=2)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        H, H_kv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * D, bias=False)
        self.wk = nn.Linear(cfg.dim, H_kv * D, bias=False)
        self.wv = nn.Linear(cfg.dim, H_kv * D, bias=False)
        self.wo = nn.Linear(H * D, cfg.dim, bias=False)
        # The extension point. If set, called as head_adapter(q, y) with the queries before
        # rotary embedding q: (B, T, H, D) and the per-head attention outputs y: (B, T, H, D);
        # it returns the per-head outputs (B, T, H, D) that go on to wo. Gated Memory uses it.
        self.head_adapter: Optional[nn.Module] = None

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None, start_pos: int = 0):
        """x: (B, T, C); cos, sin: (T, D); mask: additive (T, S) for the fused kernel after a cache,
        else None (the explicit path builds its own, block by block, and ignores it). -> (B, T, C)"""
        B, T, _ = x.shape
        H, H_kv, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q = self.wq(x).view(B, T, H, D)                          # (B, T, H, D), before rotary embedding
        k = self.wk(x).view(B, T, H_kv, D).transpose(1, 2)       # (B, H_kv, T, D)
        v = self.wv(x).view(B, T, H_kv, D).transpose(1, 2)       # (B, H_kv, T, D)
        q_rot = apply_rope(q.transpose(1, 2), cos, sin)          # (B, H, T, D)
        k = apply_rope(k, cos, sin)                              # (B, H_kv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, H_kv, S, D)
        # Grouped-query attention: each key/value head serves n_rep consecutive query heads.
        if fused_kernel(self.cfg, q_rot.device, q_rot.dtype):    # the dtype attention computes in
            # Copies: on a CPU the kernel's own sharing (enable_gqa=True) was as fast at 256 tokens
            # and slower at 1,024, forward + backward (eval.py bench).
            k = k.repeat_interleave(self.cfg.n_rep, dim=1)       # (B, H, S, D)
            v = v.repeat_interleave(self.cfg.n_rep, dim=1)       # (B, H, S, D)
            attn_mask = None if mask is None else mask.to(q_rot.dtype)     # the kernel wants q's dtype
            y = F.scaled_dot_product_attention(q_rot, k, v, attn_mask=attn_mask, is_causal=mask is None)  # (B, H, T, D)
        else:
            y = explicit_attention(q_rot, k, v, start_pos)       # (B, H, T, D)
        y = y.transpose(1, 2)                                    # (B, T, H, D)
        if self.head_adapter is not None:
            y = self.head_adapter(q, y)                          # (B, T, H, D)
        return self.wo(y.reshape(B, T, H * D))                   # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)   # gate_proj
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)   # up_proj
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)   # down_proj

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start_pos=0):  # (B, T, C) -> (B, T, C)
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


def causal_mask(T: int, S: int, start_pos: int, device, dtype) -> torch.Tensor:
    """Additive mask (T, S): query i (absolute position start_pos + i) sees keys 0..start_pos + i."""
    q_pos = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    return torch.zeros(T, S, device=device, dtype=dtype).masked_fill(k_pos > q_pos, float("-inf"))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # A second extension point: if set, output_adapter(x) for the normed final states x (..., C)
        # is added to the logits (..., V). The released Gated Memory trains a rank-2 LoRA there.
        self.output_adapter: Optional[nn.Module] = None

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None, start_pos: int = 0,
                last_only: bool = False, grad_checkpoint: bool = False,
                logits_at: Optional[torch.Tensor] = None, head: bool = True) -> torch.Tensor:
        """tokens (B, T) at positions start_pos.. -> logits (B, T, V), or (B, 1, V) if last_only,
        or (N, V) where the (B, T) boolean mask `logits_at` is True (the output head is a fifth
        of the model's FLOPs: a loss over a few answer tokens should not pay for every position).
        head=False: the normed final states instead, (..., C), for a loss that applies the output
        head itself (`head_weight`, then `output_adapter`) a few rows at a time.

        grad_checkpoint: keep only each block's input during the forward pass and recompute the
        block in the backward pass (memory for compute, as LIFT's released code does)."""
        B, T = tokens.shape
        x = self.tok_embeddings(tokens)                                      # (B, T, C)
        cos, sin = rope_table(self.cfg, torch.arange(start_pos, start_pos + T, device=tokens.device))
        # The fused kernel's is_causal serves a plain prefix; after a cache it needs a mask, built once
        # for all layers (0 and -inf are exact in bf16). The explicit path makes its own and ignores it.
        mask = causal_mask(T, start_pos + T, start_pos, tokens.device, x.dtype) if start_pos > 0 else None  # (T, S)
        for layer in self.layers:
            if grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, start_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, start_pos)
        if last_only:
            x = x[:, -1:]                                                    # (B, 1, C)
        elif logits_at is not None:
            x = x[logits_at]                                                 # (N, C)
        x = self.norm(x)
        if not head:
            return x                                                         # (B, T, C) or (N, C)
        logits = F.linear(x, self.head_weight)                               # (B, T, V)
        return logits if self.output_adapter is None else logits + self.output_adapter(x)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head (V, C): the token embedding matrix when the two are tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 256, *,
             stop_ids: tuple[int, ...] = (), temperature: float = 0.0, top_p: float = 1.0,
             seed: Optional[int] = None, on_token: Optional[Callable[[int], None]] = None) -> list[int]:
    """Continue `prompt` (token ids). Greedy when temperature == 0, else temperature + nucleus
    sampling with a private generator seeded by `seed`. Stops after any id in stop_ids (which is
    not returned) or after max_new_tokens. on_token(id) is called for each new token as it comes."""
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    total = len(prompt) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ConfigError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the model's "
                          f"context of {model.cfg.max_seq_len} tokens")
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    cache = KVCache(model.cfg, 1, total, device, dtype)
    tokens = torch.tensor([prompt], device=device)                           # (1, T)
    out, pos = [], 0
    for _ in range(max_new_tokens):
        logits = model(tokens, cache=cache, start_pos=pos, last_only=True)[0, -1].float()  # (V,)
        pos += tokens.shape[1]
        nxt = sample(logits, temperature, top_p, gen)
        if nxt in stop_ids:
            break
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        tokens = torch.tensor([[nxt]], device=device)                        # (1, 1)
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Pick one id from logits (V,): argmax, or a draw from the smallest set of most likely ids
    whose probability mass reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = F.softmax(logits.cpu() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p        # the first id is always kept
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])
