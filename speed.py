"""How fast this machine runs the model and LIFT's training step, against what it could do.

    python eval.py bench                  matmul rates, prefill, the LIFT training step, decode
    python eval.py bench --profile DIR    also the top operators of a training step and of the longest prefill (profiling.py)
    python eval.py bench --no-compile     without the torch.compile rows, minutes shorter

Every speed is also a fraction of the machine's matrix-product rate in the compute dtype, measured
in the same run (a 2048³ product). Prefill needs 2 FLOPs per weight per token; a LIFT step on a
frozen base, the forward and the activations' gradients, ≈ 4 (the "4N limit"); each plus causal
attention (the forward's 2·T²·D·H per layer, ≈ 3× that for a step); the adapter's < 2% left out.
"Matrix products alone" rows time just those 2N or 4N FLOPs on the model's own weights: the gap is
theirs or the rest's. "Explicit attention" / "fused attention kernel" rows time model.py's two
paths in turn; "attention of one layer" splits off the softmax, whose one exp per score no product
rate speeds up; "default loop step", a LIFT run's step by part (window, the anchor's KL, optimizer);
"self-study questions", QA examples one at a time and with --qa-batch (compute.SharedPrefix)."""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import cache
import gated_memory
import model as model_module
from anchor import anchor_loss
from compute import autocast, compiled_blocks
from data import DataConfig, qa_example, read_document, truncate_middle, window_examples
from lift import TrainConfig, batch_loss


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 2, trials: int = 3) -> float:
    """FLOP/s of an n×n×n product in dtype here now: the best of a few trials (a shared VM drifts ±20%)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


class RSSSampler:
    """This process's resident MB, (at start, peak), sampled every 5 ms (ru_maxrss has the load's peak)."""

    def _rss_mb(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def start(self) -> "RSSSampler":
        self.first = self.peak = self._rss_mb()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self._rss_mb())
            time.sleep(0.005)

    def stop(self) -> tuple[float, float]:
        self.running = False
        self.thread.join()
        return self.first, max(self.peak, self._rss_mb())


def step_weights(model) -> list:
    """Every weight matrix a token is multiplied by, in the model's order (a tied head first): each block's
    projections and the output head (a tied embedding is the head; an untied one is a lookup, no product)."""
    return [p for name, p in model.named_parameters()
            if p.dim() == 2 and "head_adapter" not in name and "lora" not in name
            and (name != "tok_embeddings.weight" or model.output is None)]


def weight_flops(model) -> int:
    """2 FLOPs per weight per token for one forward pass."""
    return 2 * sum(w.numel() for w in step_weights(model))


def step_products(model, rows: int, dtype: str, reps: int = 3, backward: bool = True) -> float:
    """FLOP/s of the step's own products alone (best of `reps`): each of the model's weights in turn, read from
    memory as in the step, times `rows` tokens forward; then (backward) its input gradient (no weight gradient)."""
    weights = [w.detach().to(getattr(torch, dtype)) for w in step_weights(model)]   # in bf16, copies (as autocast)
    x = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}     # one input per width
    dy = {w.shape[0]: torch.randn(rows, w.shape[0], dtype=w.dtype) for w in weights}
    times = []
    for _ in range(reps + 1):                       # a warm-up, then the best of reps
        t = time.perf_counter()
        for w in weights:
            F.linear(x[w.shape[1]], w)
        for w in reversed(weights) if backward else ():
            dy[w.shape[0]] @ w
        times.append(time.perf_counter() - t)
    return (2 if backward else 1) * rows * weight_flops(model) / min(times[1:])


def attention_flops(model, T: int) -> int:
    """Forward FLOPs of causal attention over T tokens, all layers: QKᵀ and PV, half of T×T each."""
    return 2 * T * T * model.cfg.head_dim * model.cfg.n_heads * model.cfg.n_layers


def windows(tok, T: int, n: int) -> list:
    """n different T-token windows of ordinary text."""
    text = "The history of the valley is written in its mills, its bridges and its orchards. " * (T * n // 8 + 8)
    return window_examples(tok.encode(text)[:T * n], DataConfig(window=T, stride=T))[:n]


def train_step_rate(model, tok, T: int, dtype: str, checkpointing: bool, batch: int = 1, steps: int = 3,
                    compiled: bool = False, paths: tuple = (None,)) -> dict[Optional[bool], tuple[float, float, float]]:
    """Tokens/s of LIFT's training step (forward, loss, backward; not the optimizer, whose cost is the
    adapter's size) on `batch` T-token windows, extra peak MB and first step's seconds, for each
    attention path in `paths` (fused_kernel_on_cpu's flag; None: model.py's choice), step by step in
    turn so that drift hits both alike. compiled: as --compile (the first step pays the compilation)."""
    examples = windows(tok, T, batch)
    cfg = TrainConfig(dtype=dtype, grad_checkpoint=checkpointing, batch=batch)
    gated_memory.attach(model, gated_memory.GatedMemoryConfig(), seed=0)
    if compiled:
        import torch._inductor.config
        torch._inductor.config.force_disable_caches = True   # a cold compile, as on a user's first run
        torch._dynamo.reset()
    model.train()
    first, seconds, peak, base = {}, {f: float("inf") for f in paths}, {f: 0.0 for f in paths}, None
    with compiled_blocks(model, compiled):       # what --compile does in lift.train_adapter
        for turn in range((steps + 1) * len(paths)):     # a warm-up each, then the best of `steps`
            fused = paths[turn % len(paths)]
            with fused_kernel_on_cpu(fused):
                sampler = RSSSampler().start()
                t = time.perf_counter()
                batch_loss(model, examples, cfg)[0].backward()
                t = time.perf_counter() - t
                start, top = sampler.stop()
            if fused not in first:
                first[fused] = t
            else:              # memory above what it was when the measured steps began, the warm-ups' kept
                base = start if base is None else base
                seconds[fused], peak[fused] = min(seconds[fused], t), max(peak[fused], top - base)
    model.eval()
    gated_memory.remove(model)
    return {f: (T * batch / seconds[f], peak[f], first[f]) for f in paths}


@contextmanager
def fused_kernel_on_cpu(on: Optional[bool]):
    """Inside, a CPU takes the fused kernel if `on`, the explicit math if not, model.py's choice if None."""
    saved = model_module.CPU_FUSED
    model_module.CPU_FUSED = on
    try:
        yield
    finally:
        model_module.CPU_FUSED = saved


def attention_paths(model, T: int, dtype: str, reps: int = 5) -> str:
    """Median ms of one layer's attention, forward and backward, over T tokens, by path: explicit by blocks
    (a CPU's in bf16), the fused kernel on copied keys and values (CUDA's, a CPU's in fp32), or sharing them."""
    c, dt = model.cfg, getattr(torch, dtype)
    q = torch.randn(1, c.n_heads, T, c.head_dim, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, c.n_kv_heads, T, c.head_dim, dtype=dt, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, c.n_heads, T, c.head_dim, dtype=dt)
    paths = {"explicit": lambda: model_module.explicit_attention(q, k, v),
             "fused, copies": lambda: F.scaled_dot_product_attention(
                 q, k.repeat_interleave(c.n_rep, 1), v.repeat_interleave(c.n_rep, 1), is_causal=True),
             "fused, enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    out = []
    for name, fn in paths.items():
        times = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            fn().backward(grad)
            times.append(time.perf_counter() - t)
        out.append(f"{name} {1000 * sorted(times[1:])[reps // 2]:.1f} ms")
    return f"| attention of one layer over {T} tokens, forward + backward: {', '.join(out)} | | | |"


def answering_attention(model, T: int, dtype: str, reps: int = 7) -> str:
    """Median ms of one layer's explicit attention forward (answering's branch), and of a softmax and
    of exp alone over scores of the shapes its blocks of queries make, each block's scores in cache as
    after their product: one exp per score is the part no product rate speeds up."""
    c, dt, blk = model.cfg, getattr(torch, dtype), model_module.QUERY_BLOCK
    q, k, v = (torch.randn(1, h, T, c.head_dim, dtype=dt) for h in (c.n_heads, c.n_kv_heads, c.n_kv_heads))
    scores = [torch.randn(c.n_kv_heads, c.n_rep * min(blk, T - s), min(s + blk, T), dtype=dt) for s in range(0, T, blk)]

    def hot(fn, x=None) -> float:        # seconds of fn(x)'s second call: x in cache from the first
        fn(x)
        t = time.perf_counter()
        fn(x)
        return time.perf_counter() - t
    parts = {"all": lambda: hot(lambda _: model_module.explicit_attention(q, k, v)),
             "softmax": lambda: sum(hot(lambda x: F.softmax(x, dim=-1), x) for x in scores),
             "exp": lambda: sum(hot(torch.exp, x) for x in scores)}
    times: dict[str, list[float]] = {n: [] for n in parts}
    with torch.no_grad():
        for _ in range(reps):
            for name, fn in parts.items():
                times[name].append(fn())
    a, sm, ex = (1000 * sorted(times[n])[reps // 2] for n in parts)
    return (f"| attention of one layer over {T} tokens, forward: {a:.1f} ms; a softmax over its "
            f"{sum(x.numel() for x in scores):,} scores {sm:.1f} ms, exp alone {ex:.1f} ms | | | |")


def default_loop_parts(model, tok, dtype: str, compile_too: bool = True, steps: int = 8, warmup: int = 4) -> list[str]:
    """Seconds per step of the default loop on the example document, by part: the window's forward
    and backward, the anchor's KL (the frozen base's forward, the adapted forward and backward on
    an unrelated example, anchor.anchor_loss), the clip and AdamW step; eager, then with
    --compile. The mean over `steps` steps after `warmup` (the compiler works in those)."""
    doc = tok.encode(read_document(str(Path(__file__).parent / "examples" / "orchard_chronicle.txt")))
    wins = window_examples(doc, DataConfig())[:warmup + steps]
    anchors = cache.anchor_set(model, tok, dtype)
    gated_memory.attach(model, gated_memory.GatedMemoryConfig(), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    rows = []
    for comp in (False, True) if compile_too else (False,):
        cfg = TrainConfig(dtype=dtype, compile=comp)
        with compiled_blocks(model, comp):
            parts = torch.zeros(3)
            for i, w in enumerate(wins):
                t0 = time.perf_counter()
                loss, n = batch_loss(model, [w], cfg)
                (loss / n).backward()
                t1 = time.perf_counter()
                anchor_loss(model, anchors[i % len(anchors)], cfg).backward()
                t2 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= warmup:
                    parts += torch.tensor([t1 - t0, t2 - t1, time.perf_counter() - t2]) / steps
        window, anchor, step = parts.tolist()
        rows.append(f"| default loop step{', --compile' if comp else ''}: window {window:.2f} s + anchor "
                    f"{anchor:.2f} s + optimizer {step:.2f} s | {len(wins[0].input_ids) / parts.sum():,.0f} | | |")
    model.eval()
    gated_memory.remove(model)
    return rows


def qa_batch_rates(model, tok, dtype: str, n: int = 8, steps: int = 2) -> list[str]:
    """Forward + backward of n self-study questions about the example document, each in the
    LIFT+ICL prompt (the truncated document first, at the default budget): one at a time, then as
    one batch whose shared document runs once. Rows with the seconds, the example tokens per
    second and the largest difference between the two losses (the sharing is exact)."""
    from study import study_pairs
    text = read_document(str(Path(__file__).parent / "examples" / "orchard_chronicle.txt"))
    cfg_data = DataConfig(distill=n)
    context = truncate_middle(tok.encode(text), cfg_data.context, tok)
    examples = [qa_example(tok, q, r, context) for q, r, _ in study_pairs(text, cfg_data)][:n]
    tokens = sum(len(ex.input_ids) for ex in examples)
    gated_memory.attach(model, gated_memory.GatedMemoryConfig(), seed=0)
    cfg = TrainConfig(dtype=dtype)
    model.train()
    timed = []
    for groups in ([[ex] for ex in examples], [examples]):
        seconds = float("inf")
        for _ in range(steps + 1):                   # the first pass warms up; then the best of `steps`
            t, total = time.perf_counter(), 0.0
            for g in groups:
                loss, _ = batch_loss(model, g, cfg)
                loss.backward()
                total += loss.item()
            seconds = min(seconds, time.perf_counter() - t)
        timed.append((seconds, total))
    model.eval()
    gated_memory.remove(model)
    (alone, want), (shared, got) = timed
    what = f"{n} self-study questions in the LIFT+ICL prompt ({tokens / n:.0f} tokens each)"
    return [f"| {what}, one at a time: {alone:.2f} s | {tokens / alone:,.0f} | | |",
            f"| {what}, --qa-batch {n} (the document once; loss equal to {abs(got - want) / want:.0e}): "
            f"{shared:.2f} s, {alone / shared:.1f}x | {tokens / shared:,.0f} | | |"]


def bench(model_name: str | None, dtype: str, lengths: list[int], train_lengths: list[int], decode_tokens: int,
          compile_too: bool = True):
    """Print the table; return the model and tokenizer (for profiling.py). compile_too=False leaves
    out the torch.compile rows (each compiles for a minute)."""
    from checkpoint import load_model
    torch.manual_seed(0)
    t = time.perf_counter()
    model, tok = load_model(model_name, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t
    dev, peak = torch.device("cpu"), matmul_rate(getattr(torch, dtype))   # only the compute dtype: emulated bf16 takes minutes
    print(f"machine: {torch.get_num_threads()} CPU threads, {torch.backends.cpu.get_cpu_capability()}, torch "
          f"{torch.__version__}; matmul 2048^3 in {dtype}: {peak / 1e9:.1f} GFLOP/s (best of 3)")
    print(f"model: {model.name}, weights {dtype}, loaded in {load_s:.1f}s")
    per_token = weight_flops(model)
    print(f"| what | tokens/s | fraction of the {dtype} matmul rate | extra peak MB |\n|---|---:|---:|---:|")
    for T in lengths:
        ids = torch.randint(100, model.cfg.vocab_size, (1, T))
        best = {False: float("inf"), True: float("inf")}
        for turn in range(8):          # the two paths in turn, so that the machine's drift hits both alike
            fused = bool(turn % 2)
            with torch.no_grad(), autocast(dev, dtype), fused_kernel_on_cpu(fused):
                t = time.perf_counter()
                model(ids)                                                   # all T logits, as in training
                if turn >= 2:                                                # one warm-up each
                    best[fused] = min(best[fused], time.perf_counter() - t)
        flops = T * per_token + attention_flops(model, T)
        for fused, s in best.items():
            path = "fused attention kernel" if fused else "explicit attention"
            print(f"| prefill {T}, {path} (in turn, best of 3) | {T / s:,.0f} | {100 * flops / s / peak:.0f}% | |")
        rate = step_products(model, T, dtype, backward=False)       # the bound without attention and the rest
        print(f"| prefill {T}'s matrix products alone (each weight forward) | {rate / per_token:,.0f} | "
              f"{100 * rate / peak:.0f}% ({rate / 1e9:.0f} GFLOP/s) | |")
        print(answering_attention(model, T, dtype))
    eager, chosen = {}, model_module.fused_kernel(model.cfg, dev, getattr(torch, dtype))
    for T in train_lengths:
        # (batch, checkpointing, compiled, attention paths): the eager step by both paths, step by step in turn
        variants = [(1, False, False, (False, True)), (1, True, False, (None,)), (1, False, True, (None,))]
        if T == train_lengths[0]:                                           # batches: the first length only
            variants += [(4, False, False, (None,)), (4, False, True, (None,))]
        for batch, ckpt, comp, paths in (v for v in variants if compile_too or not v[2]):
            measured = train_step_rate(model, tok, T, dtype, ckpt, batch, compiled=comp, paths=paths)
            for fused, (rate, mb, first) in measured.items():
                flops = 2 * T * per_token + 3 * attention_flops(model, T)   # the 4N rule + attention
                limit = peak / (flops / T)
                path = (", fused attention kernel" if fused else ", explicit attention") + " (in turn)"
                what = (f"ℓ = {T}" + (f", batch {batch}" if batch > 1 else "") + (", checkpointing" if ckpt else "")
                        + (path if len(paths) > 1 else ""))
                if comp:   # compile time, and how many trained tokens it takes to pay it back
                    gain = 1 / eager[T, batch] - 1 / rate   # seconds saved per token, against eager at this batch
                    what += (f", torch.compile (first step {first:.0f} s; pays back after "
                             + (f"{(first - T * batch / rate) / gain:,.0f} tokens)" if gain > 0 else "never)"))
                elif not ckpt and fused in (None, chosen):   # eager, on the path model.py takes
                    eager[T, batch] = rate
                print(f"| LIFT training step, {what} | {rate:,.0f} | "
                      f"{100 * rate / limit:.0f}% (limit {limit:,.0f} tokens/s) | {mb:,.0f} |")
        rate = step_products(model, T, dtype)     # the step's gap: the products' speed here, or the rest
        print(f"| the step's matrix products alone, ℓ = {T} (each weight forward and backward) | "
              f"{rate / (2 * per_token):,.0f} | {100 * rate / peak:.0f}% ({rate / 1e9:.0f} GFLOP/s) | |")
        print(attention_paths(model, T, dtype))
    for row in default_loop_parts(model, tok, dtype, compile_too):   # what a LIFT run's steps cost, anchor included
        print(row)
    for row in qa_batch_rates(model, tok, dtype):       # QA examples, and their shared prompt
        print(row)
    with autocast(dev, dtype):
        t = time.perf_counter()
        out = model_module.generate(model, torch.randint(100, model.cfg.vocab_size, (64,)).tolist(), decode_tokens)
        s = time.perf_counter() - t
    print(f"| decode {len(out)} tokens after 64 | {len(out) / s:,.0f} | | |")
    print(f"matmul 2048^3 again, at the end: {matmul_rate(getattr(torch, dtype)) / 1e9:.1f} GFLOP/s (the fractions above "
          f"use {peak / 1e9:.1f}; if the two differ much, the machine drifted during the run)")
    return model, tok
