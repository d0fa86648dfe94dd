"""How the model computes, apart from what: the dtype, autocast, compiled blocks for training, and
a batch whose examples share their first tokens.

Plumbing, not part of the method: lift.py's loop and every command line use these so that the
same code runs on a CPU and on CUDA, and so that no work is done twice.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """"auto" -> the fast dtype of this device. bf16 runs at tensor-core speed on CUDA and at up to
    ~2.5x the fp32 rate on CPUs with AVX-512 bf16 or AMX, but is *emulated*, tens of times slower
    than fp32, on CPUs without them (such as AVX2-only machines)."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        fast_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return "bfloat16" if fast_bf16 else "float32"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CPU or CUDA from a dtype string; a no-op context for float32."""
    return torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


BUCKET = 64     # under --compile, sequences are right-padded to a multiple of this many tokens


def bucketed(T: int, compiled: bool) -> int:
    """The length to pad a T-token sequence to. Eager: T itself. Compiled: the next multiple of
    BUCKET, so that a run meets a handful of shapes (windows, anchors, QA examples), each compiled
    once for its exact size, rather than one graph per length or a slower size-generic graph."""
    return -(-T // BUCKET) * BUCKET if compiled else T


@contextmanager
def compiled_blocks(model, on: bool = True):
    """Inside the block, every transformer block of `model` runs through torch.compile (all blocks
    share one compiled graph per shape: same code); on leaving, they run eagerly again, since
    generation's one-token steps with a KV cache would only trigger more compilations. The first
    call of each shape waits for the compiler (tens of seconds on a CPU); later calls fuse the
    elementwise work between the matrix products (norms, rotary embedding, SiLU, the adapter's
    gate). Callers pad their inputs with `bucketed` to keep the number of shapes small."""
    if on:
        import torch._dynamo.config
        # a shape is a graph for training, one for the frozen base (no gradient), one for the
        # first block (its input needs no gradient); a few buckets of each fit under 32
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for layer in model.layers:
            layer.compile(dynamic=False)             # nn.Module.compile: wraps this module's __call__
    try:
        yield
    finally:
        if on:
            for layer in model.layers:
                layer._compiled_call_impl = None     # what nn.Module.compile set: back to eager


class SharedPrefix:
    """Keys and values of a prefix that every example of a batch begins with, kept with their
    autograd graph, for training. Every QA and self-study example of a LIFT+ICL run starts with the
    same prompt, the truncated document (§3.2), and is mostly that prompt (~500 of ~560 tokens at
    the default budget). lift.batch_loss runs the prefix once, as a batch of one that fills this
    cache; then each example's own tokens run as a batch at positions P.., attending to the
    prefix's keys and values through `update` (the method model.Attention calls on any cache).
    Exact, not an approximation: a token's keys and values depend only on the tokens before it,
    so every logit, hence every gradient, is what the examples give when run whole (the
    prefix's gradient is the sum of what each example sends back to it; tests/test_lift.py).
    model.KVCache writes into preallocated tensors, which is right for decoding but cannot be
    differentiated; this one only keeps references."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, H_kv, T, D). The prefix's own pass (start 0, B = 1) is kept as it is; a later
        pass gets the prefix in front of its own: (B, H_kv, P + T, D)."""
        if start == 0:
            self.k[layer], self.v[layer] = k, v
            return k, v
        assert start == self.k[layer].shape[2], "the examples' tokens must follow the prefix directly"
        B = k.shape[0]
        return (torch.cat([self.k[layer].expand(B, -1, -1, -1), k], dim=2),    # (B, H_kv, P + T, D)
                torch.cat([self.v[layer].expand(B, -1, -1, -1), v], dim=2))
