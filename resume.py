"""An interrupted LIFT run goes on where it stopped instead of starting over.

Absorbing a long document takes minutes to hours on a CPU, and a run can be killed (Ctrl-C, a
closed terminal, a machine that goes away). So at the end of every epoch lift.train_adapter saves
three things to one file: the adapter's tensors, AdamW's state (its moments and step counts) and
the loop's own counters (`Run`). cache.py names that file after the document and every setting
that changes training, so only the very same run can pick it up; it is deleted once the finished
adapter is saved. Given the file, train_adapter restores all three and starts the next epoch: the
same examples in the same order from the same optimizer state, so the adapter it finishes is the
one an uninterrupted run makes (tests/test_resume.py). Plumbing, not part of the method.
"""
from __future__ import annotations

import os
import pickle
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch


@dataclass
class Run:
    """What train_adapter has done so far."""
    epochs_done: int = 0
    tokens: int = 0                  # tokens trained on
    steps: int = 0                   # optimizer steps
    batches: int = 0                 # forward passes (the anchor follows every N-th)
    anchors: int = 0                 # anchor examples shown (they are taken in turn)
    kl_sum: float = 0.0              # sum of the anchor's KL, for the mean in the stats
    epoch_losses: list = field(default_factory=list)
    seconds: float = 0.0             # training time before this process


def save(path: Optional[Path], run: Run, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """Write the run's state atomically (a temporary file renamed over the old one): a kill while
    saving leaves the previous epoch's state, never half of one."""
    if path is None:
        return
    state = {"run": asdict(run), "params": [p.detach().cpu() for p in params],
             "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    tmp = path.with_name(f".adapter-resume-{os.getpid()}.tmp")   # cache.py removes it if a kill leaves it
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Optional[Path], params: list[torch.Tensor], opt: torch.optim.Optimizer) -> Run:
    """The saved run, with `params` and `opt` put back as they were; a fresh Run when there is no
    file. A file that cannot be read, or holds tensors of other shapes, is ignored with a warning
    (the run starts over); nothing is changed before the whole file has been checked."""
    if path is None or not path.exists():
        return Run()
    try:
        state = torch.load(path, weights_only=True)   # tensors, numbers and lists only: no code runs
        saved, run = state["params"], Run(**state["run"])
        if [s.shape for s in saved] != [p.shape for p in params]:
            raise ValueError("its tensors have other shapes")
        opt.load_state_dict(state["optimizer"])       # checks the parameter groups before changing anything
    except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        print(f"warning: cannot resume from {path.name} ({e}); training from the start", file=sys.stderr)
        return Run()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    torch.set_rng_state(state["rng"])
    print(f"resuming after epoch {run.epochs_done} ({run.seconds:.0f}s of training already done)", file=sys.stderr)
    return run
