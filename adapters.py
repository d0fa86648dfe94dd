"""The two adapters LIFT can train, behind one interface: the paper's Gated Memory
(gated_memory.py) and the LoRA baseline of its ablation (lora.py). Each module has attach, remove,
disabled, adapters, save and restore; this file picks the module for a config, a model or a file.
"""
from __future__ import annotations

import gated_memory
import lora
from checkpoint import AdapterFileError, read_adapter_file
from options import UserError

ADAPTERS = {"gated_memory": gated_memory, "lora": lora}
CONFIGS = {gated_memory.GatedMemoryConfig: gated_memory, lora.LoRAConfig: lora}


def adapter_config(name: str, lora_rank: int = 16, gm=None, lora_targets: str = "all"):
    """An adapter's settings by name (Gated Memory: the GatedMemoryConfig `gm` or the defaults);
    LoRA with alpha = 2·rank, as in every run reported here."""
    return ((gm or gated_memory.GatedMemoryConfig()) if name == "gated_memory"
            else lora.LoRAConfig(lora_rank, 2.0 * lora_rank, lora_targets))


def attach_fresh(model, adapter_cfg, seed: int) -> None:
    """Replace whatever adapter is attached by a fresh one of this config (either kind)."""
    for kind in ADAPTERS.values():
        kind.remove(model)
    CONFIGS[type(adapter_cfg)].attach(model, adapter_cfg, seed=seed)


def attached(model):
    """The adapter module (gated_memory or lora) attached to model, or None."""
    return next((m for m in ADAPTERS.values() if m.adapters(model)), None)


def load_adapter_file(model, path: str, expect=None) -> dict:
    """Attach the adapter saved at `path` (either kind: the file says which) and return what its
    writer stored beside it. `expect`: refuse a file whose adapter config is not this one."""
    f = read_adapter_file(model, path)
    kind = next((m for m in ADAPTERS.values() if m.FORMAT == f.format), None)
    if kind is None:
        raise AdapterFileError(f"{path} is not an adapter saved by this project (format {f.format!r})")
    if expect is not None and (CONFIGS[type(expect)] is not kind or type(expect)(**f.config) != expect):
        raise UserError(f"{path} holds another adapter shape ({f.format} {f.config}), not {expect}")
    for other in ADAPTERS.values():
        other.remove(model)
    kind.restore(model, f.config, f.tensors)
    return f.extra

