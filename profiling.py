"""Where a training step and a prefill spend their time: the top operators by self CPU time,
from torch.profiler, written as tables to a folder (`python eval.py bench --profile DIR`).
"""
from __future__ import annotations

from pathlib import Path

import torch

import gated_memory
from compute import autocast, compiled_blocks
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


def profile_step(model, tok, T: int, dtype: str, out: Path, batch: int = 1, compiled: bool = False) -> str:
    """The top operators of one training step with Gated Memory attached, on `batch` windows, its
    blocks and the head's loss compiled or not (compiled: the warm-up pays the compilation; the
    compiled graphs then show as "CompiledFxGraph" rows, their matrix products as aten::mm)."""
    examples = windows(tok, T, batch)
    cfg = TrainConfig(dtype=dtype, batch=batch, compile=compiled)
    gated_memory.attach(model, gated_memory.GatedMemoryConfig(), seed=0)
    model.train()
    name = f"profile_train_step_{T}" + (f"_batch{batch}" if batch > 1 else "") + ("_compiled" if compiled else "")
    with compiled_blocks(model, compiled):
        table = top_operators(lambda: batch_loss(model, examples, cfg)[0].backward(), out / f"{name}.txt")
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


def write_profiles(model, tok, train_length: int, prefill_length: int, dtype: str, out: Path,
                   compiled: bool = True) -> None:
    """Print and write the profiles: a training step of train_length tokens (and, if compiled, the
    bench's fastest step, batch 4 compiled), a prefill of prefill_length."""
    print(profile_step(model, tok, train_length, dtype, out))
    if compiled:
        print(profile_step(model, tok, train_length, dtype, out, batch=4, compiled=True))
    print(profile_prefill(model, prefill_length, dtype, out))
