"""How the model computes, apart from what: the dtype, autocast, and compiled blocks for training.

Plumbing, not part of the method: lift.py's loop and every command line use these three so that
the same code runs on a CPU and on CUDA.
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


@contextmanager
def compiled_blocks(model, on: bool = True):
    """Inside the block, every transformer block of `model` runs through torch.compile (all blocks
    share one compiled graph: same code, same shapes); on leaving, they run eagerly again, since
    generation's one-token steps with a KV cache would only trigger more compilations. The first
    call waits for the compiler (tens of seconds on a CPU); later calls fuse the elementwise work
    between the matrix products (norms, rotary embedding, SiLU, the adapter's gate)."""
    if on:
        for layer in model.layers:
            layer.compile()                          # nn.Module.compile: wraps this module's __call__
    try:
        yield
    finally:
        if on:
            for layer in model.layers:
                layer._compiled_call_impl = None     # what nn.Module.compile set: back to eager
