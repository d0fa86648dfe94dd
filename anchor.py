"""Our extension's training terms on the gate and away from the document (none is in the paper).

    anchor_loss        KL(base ‖ adapted) on unrelated text (--anchor), plus the mean gate there
                       (--gate-penalty): the adapted model should change nothing where the
                       document does not help, and its gate should stay shut there
    document_gate_term −log of the mean gate on the document's own tokens (--gate-open): the gate
                       should open where the document is; gate_open_span says which tokens count
                       (--gate-open-on: all of the document's examples, or its questions' prompts)

Why the last one. The first two push the gate down where the document is not; nothing rewards it
for being open where the document is. A prediction only ever sees the product g · m, so when the
memory learns fast (a large --memory-scale) the gate falls alike on every input, with the penalty
or without it, and m grows to make up: a volume knob that does not choose (results/NOTEBOOK.md).
−log of the document's mean gate grows by the same amount at every halving of g there, so a gate
shut alike everywhere pays for it; in principle the cheaper way is to open on the document and
shut elsewhere. Measured once, it is not what happened: the gate opened on every input alike (1.11×)
and the answers with the document in context broke (notebook, "A push to open the gate on the
document"). Counted on the closed-book questions' prompts only (--gate-open-on questions), it
opened the gate on every question in LIFT's prompt alike (0.92×), its own training questions
included, and left it shut on the anchor's prompts and replies in a plain chat turn (0.012 and
0.011 against 0.287): the push and the penalty saw their questions in two different prompts
(notebook, "The gate on the anchor's prompts and replies"). With the anchor's prompts asked in
that same prompt (--anchor-format question, data.anchor_prompts), the gate told the licence's
questions from general ones 4.16× and 4.00× (two seeds, one licence), yet answered fewer of them
than the same memory trained without the penalty. Both options are off by default.

lift.train_adapter adds these to the loss of each batch; they are here so that lift.py keeps the
paper's method and its loop.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import gated_memory
from adapters import attached
from compute import autocast, bucketed, head_loss
from data import IGNORE, Example


def anchor_loss(model, ex: Example, cfg, base_states: Optional[dict] = None) -> torch.Tensor:
    """KL(base ‖ adapted), mean over the positions of an unrelated example: how far the adapter
    moves the next-token distribution where it should change nothing. With cfg.gate_penalty, plus
    that weight times the mean gate g over the example's tokens, every layer and head: the gate
    itself is asked to stay shut there (Gated Memory only). The anchor runs without checkpointing:
    it is short, and the gates collected must keep their gradient. cfg: a lift.TrainConfig.
    base_states: a dict kept for a run, where the frozen base's final states for each example are
    stored on first use: the base never changes, so its pass is not run again (exact)."""
    device = model.tok_embeddings.weight.device
    T = len(ex.input_ids)
    pad = [0] * (bucketed(T, cfg.compile) - T)                               # causal: padding after T changes nothing
    ids = torch.tensor([ex.input_ids + pad], device=device)                 # (1, T + padding)
    base = None if base_states is None else base_states.get(id(ex))
    if base is None:
        with torch.no_grad(), attached(model).disabled(model), autocast(device, cfg.dtype):
            base = model(ids, head=False)[0, :T]                            # (T, C), the frozen base's final states
        if base_states is not None:
            base_states[id(ex)] = base

    def base_logp(i: int, j: int) -> torch.Tensor:                          # (j − i, V), the teacher: the base
        return F.linear(base[i:j], model.head_weight).float().log_softmax(-1)

    with gated_memory.gates_collected(model, on=cfg.gate_penalty > 0) as gates, autocast(device, cfg.dtype):
        adapted = model(ids, head=False)[0, :T]                             # (T, C)
        loss = head_loss(model, adapted, base_logp) / T                     # Σ p_base·(log p_base − log p_adapted) / T
    if gates:                                                               # the real tokens, not the padding
        loss = loss + cfg.gate_penalty * mean_gate(gates, torch.arange(ids.shape[1], device=device)[None] < T)
    return loss


def mean_gate(gates: list[torch.Tensor], own: torch.Tensor) -> torch.Tensor:
    """The mean gate over the tokens marked in `own`, every layer and head. gates:
    gated_memory.gates_collected's list for one forward pass, (B, T, H, 1) per layer; own: (B, T)."""
    g = torch.stack([x[..., 0] for x in gates])                             # (L, B, T, H)
    return g[:, own].float().mean()                                         # g[:, own]: (L, N, H)


def gate_open_span(ex: Example, on: str) -> int:
    """How many of an example's first tokens --gate-open counts as the document's. on "document":
    all of them, unless it is an unrelated (KL) example. on "questions": only the prompt of a
    question asked without the document (distill's closed-book kind, LIFT alone's prompt), the
    tokens a user's question is read in at answer time; windows and replies are left to the loss."""
    if on == "questions":
        return next(i for i, label in enumerate(ex.labels) if label != IGNORE) if ex.kind == "closed" else 0
    return len(ex.input_ids) if ex.teacher is None else 0


def document_gate_term(gates: list[torch.Tensor], own: torch.Tensor) -> Optional[torch.Tensor]:
    """−log of the mean gate over the document's own tokens: 0 when every gate there is open
    (g = 1), log 1/g when all are g. own: (B, T) True at the tokens that are the document's (not
    padding, not an unrelated question's). None if there are none."""
    if not gates or not own.any():
        return None
    return -mean_gate(gates, own).log()
