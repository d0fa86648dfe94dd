"""How the model computes, apart from what: the dtype, autocast, compiled blocks for training, a
batch whose examples share their first tokens, and the output head's loss a chunk of rows at a time.

Plumbing, not part of the method: lift.py's loop and every command line use these so that the
same code runs on a CPU and on CUDA, and so that no work is done twice.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


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
    share one compiled graph per shape: same code), and so does the output head's loss over a chunk
    of rows (rows_loss); on leaving, both run eagerly again, since generation's one-token steps with
    a KV cache would only trigger more compilations. The first call of each shape waits for the
    compiler (tens of seconds on a CPU); later calls fuse the elementwise work between the matrix
    products (norms, rotary embedding, SiLU, the adapter's gate, the head's softmax over the
    vocabulary). Callers pad their inputs with `bucketed` to keep the number of shapes small."""
    global _rows_loss
    if on:
        import torch._dynamo.config
        # a shape is a graph for training, one for the frozen base (no gradient), one for the
        # first block (its input needs no gradient); a few buckets of each fit under 32
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for layer in model.layers:
            layer.compile(dynamic=False)             # nn.Module.compile: wraps this module's __call__
        _rows_loss = torch.compile(rows_loss)        # a chunk's logits read once, not once a line
    try:
        yield
    finally:
        if on:
            for layer in model.layers:
                layer._compiled_call_impl = None     # what nn.Module.compile set: back to eager
            _rows_loss = rows_loss


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


# ----------------------------------------------------------------------------- the loss at the output head
HEAD_CHUNK = 1 << 23    # logits computed at a time, in elements: 8M fp32 = 32 MB (SmolLM2: 170 rows of 49,152)


def rows_loss(z: torch.Tensor, target: torch.Tensor, want_grad: bool):
    """The summed loss of logits z (n, V) against target, in fp32, and (want_grad) its gradient for z
    in z's dtype, else None. target: next tokens (n, 1), for cross-entropy, whose gradient is
    softmax − one-hot; or a teacher's log-probabilities (n, V), for KL(teacher ‖ model), whose
    gradient is softmax·Σp − p (exact even if Σp is not quite 1). In place where it can: eagerly,
    each line is one pass over n·V numbers; compiled_blocks fuses them."""
    logp = z.float().log_softmax(-1)                                           # (n, V)
    if not target.is_floating_point():                                         # next tokens: cross-entropy
        loss = -logp.gather(1, target).sum()
        d = logp.exp_().scatter_add_(1, target, torch.full_like(target, -1, dtype=logp.dtype)) if want_grad else None
    else:                                                                      # KL(teacher ‖ model)
        p = target.exp()
        loss = (p * (target - logp)).sum()
        d = logp.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p) if want_grad else None
    return loss, None if d is None else d.to(z.dtype)


_rows_loss = rows_loss      # what _ChunkedHeadLoss calls: rows_loss, or its compiled form inside compiled_blocks


class _ChunkedHeadLoss(torch.autograd.Function):
    """Σ over rows of the loss of logits x·Wᵀ against `target`, and its gradient for x, a chunk of rows
    at a time, both in the forward pass (the loss is the graph's last node, so its gradient is known
    there; backward only scales it). Why: computed whole, the (N, V) logits, their fp32 copy, their
    softmax and its gradient are four or five tensors of N·V numbers (50 MB each in fp32 for one
    256-token window of SmolLM2, 200 MB at 1,024 rows); here only one chunk's exist. On the CPUs
    measured this saves memory, not time (results/NOTEBOOK.md, "Speed on an AVX-512 bf16 machine
    again"). W is frozen here: no gradient for it."""

    @staticmethod
    def forward(ctx, x, weight, target):
        rows, want_grad = max(1, HEAD_CHUNK // weight.shape[0]), ctx.needs_input_grad[0]
        loss = torch.zeros((), device=x.device)
        grad = torch.empty_like(x) if want_grad else None                         # (N, C)
        for i in range(0, x.shape[0], rows):
            z = F.linear(x[i:i + rows], weight)                                    # (n, V) logits
            t = target[i:i + rows, None] if isinstance(target, torch.Tensor) else target(i, i + rows)
            chunk_loss, d = _rows_loss(z, t, want_grad)
            loss += chunk_loss
            if want_grad:
                grad[i:i + rows] = (d @ weight).to(x.dtype)                        # (n, C): dloss/dx
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None


def head_loss(model, x: torch.Tensor, target) -> torch.Tensor:
    """The loss summed over rows of the model's output head applied to its final states x (N, C):
    cross-entropy against next tokens (target: (N,) ids), or KL(teacher ‖ model) (target: a function
    (i, j) -> the teacher's fp32 log-probabilities for rows i..j, (j − i, V)). The same number as
    computing all logits and then the loss, without the (N, V) tensors (_ChunkedHeadLoss). Call it
    under the autocast of the model's forward pass, so that the head runs in the same dtype. With an
    output adapter (which needs gradients of its own) the logits are computed whole, plainly."""
    weight = model.head_weight
    if model.output_adapter is None and not weight.requires_grad:
        return _ChunkedHeadLoss.apply(x, weight, target)       # autocast reaches inside: same dtype as F.linear
    logits = F.linear(x, weight)                                                     # (N, V)
    if model.output_adapter is not None:
        logits = logits + model.output_adapter(x)
    logp = logits.float().log_softmax(-1)                                            # (N, V)
    if isinstance(target, torch.Tensor):
        return F.nll_loss(logp, target, reduction="sum")
    return F.kl_div(logp, target(0, x.shape[0]), log_target=True, reduction="sum")
