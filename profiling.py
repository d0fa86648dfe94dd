"""Where a training step and a prefill spend their time: the top operators by self CPU time,
from torch.profiler, written as tables to a folder (`python eval.py bench --profile DIR`).
"""
from __future__ import annotations

from pathlib import Path

import torch

import gated_memory
from compute import autocast
from lift import TrainConfig, batch_loss
from speed import fused_kernel_on_cpu, windows


def top_operators(run, path: Path, rows: int = 20) -> str:
    """Call run() once to warm up, then once under the profiler: the top operators by self CPU
    time, as a table (also written to path)."""
    from torch.profiler import ProfilerActivity, profile
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    return table


def profile_step(model, tok, T: int, dtype: str, out: Path) -> str:
    """The top operators of one training step with Gated Memory attached."""
    examples = windows(tok, T, 1)
    cfg = TrainConfig(dtype=dtype)
    gated_memory.attach(model, gated_memory.GatedMemoryConfig(), seed=0)
    model.train()
    table = top_operators(lambda: batch_loss(model, examples, cfg)[0].backward(), out / f"profile_train_step_{T}.txt")
    model.eval()
    gated_memory.remove(model)
    return table


def profile_prefill(model, T: int, dtype: str, out: Path) -> str:
    """The top operators of a T-token prefill, by each attention path."""
    ids = torch.randint(100, model.cfg.vocab_size, (1, T))
    tables = []
    for fused in (False, True):
        with torch.no_grad(), autocast(torch.device("cpu"), dtype), fused_kernel_on_cpu(fused):
            name = f"profile_prefill_{T}" + ("_fused" if fused else "") + ".txt"
            tables.append(f"prefill {T}, {'fused kernel' if fused else 'explicit by blocks'} ({name}):\n"
                          + top_operators(lambda: model(ids), out / name, rows=10))
    return "\n".join(tables)


def write_profiles(model, tok, train_length: int, prefill_length: int, dtype: str, out: Path) -> None:
    """Print and write both profiles: a training step of train_length tokens, a prefill of prefill_length."""
    print(profile_step(model, tok, train_length, dtype, out))
    print(profile_prefill(model, prefill_length, dtype, out))
