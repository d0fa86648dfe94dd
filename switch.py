"""Our extension (--switch): answer with Gated Memory only for the questions that open its gate.

Why. The paper's gate g is soft. On a question the document does not help, g is small but never
zero, and a head whose output is scaled by (1 − g) = 0.99 still moves near-tied next tokens:
greedy decoding then writes another reply. An adapter that has learnt nothing already changes a
third of the general replies, and only gates that are exactly shut give the base model's reply
back (results/NOTEBOOK.md, "Where the word-for-word measure starts"). Yet read once per question,
as the mean of g over the question's own tokens, a trained gate does tell the document's
questions from unrelated ones (results/NOTEBOOK.md, "The gate as a switch").

How. Before answering, one forward pass over the prompt reads that mean gate. The threshold is
the highest mean gate among the anchor's unrelated prompts (examples/anchor_prompts.txt, the
negatives that --anchor trained the gate to stay shut on), read in the same prompt: alone for
LIFT, after the truncated document for LIFT+ICL. A question whose gate is no higher than that is
answered with the adapter off: LIFT answers as the base model, LIFT+ICL as ICL, token for token.
So the gate still decides, as in the paper, but per question and exactly.

Not in arXiv 2502.14644. It needs no training and changes no adapter; it costs one forward pass
over each prompt, and the threshold's 48 passes once per adapter and prompt form: train.py keeps
the thresholds beside the adapter's file, so a question asked in a new process skips them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

import gated_memory
from checkpoint import tensors_digest
from compute import autocast
from data import anchor_questions, question_messages
from model import KVCache


@torch.no_grad()
def recorded(model, ids: list[int], dtype: str, cache: Optional[KVCache] = None,
             start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate g and the memory's share of the output, per layer, token and head, for one input
    (at positions start_pos.., after the keys and values in `cache` if given):
    -> two (layers, T, H) tensors."""
    adapters = gated_memory.adapters(model)
    for a in adapters:
        a.record_gates = True
    with autocast(model.tok_embeddings.weight.device, dtype):
        model(torch.tensor([ids], device=model.tok_embeddings.weight.device), cache=cache, start_pos=start_pos)
    for a in adapters:
        a.record_gates = False
    return torch.stack([a.last_gates for a in adapters]), torch.stack([a.last_share for a in adapters])


def question_span(tok, question: str, context: Optional[str] = None) -> tuple[list[int], int, int]:
    """The prompt of a question (LIFT's, or LIFT+ICL's after `context`), and where the question's
    own tokens are in it."""
    messages = question_messages(question, context)
    ids, content = tok.encode_chat(messages), messages[0]["content"]
    content_ids, before = tok.encode(content), tok.encode(content[:content.index(question)])
    at = next(i for i in range(len(ids)) if ids[i:i + len(content_ids)] == content_ids)
    # The tokens that the text before the question encodes to alone, as far as the whole text has
    # them too: a byte-level BPE encodes "Question: " with a last token " " that the whole text
    # joins to the question's first word (" Give"), which belongs to the question.
    shared = next((i for i, (a, b) in enumerate(zip(content_ids, before)) if a != b), len(before))
    return ids, at + shared, at + len(content_ids)


def question_gate(model, tok, question: str, context: Optional[str], dtype: str) -> float:
    """Mean g over the question's own tokens, every layer and head."""
    ids, first, last = question_span(tok, question, context)
    return recorded(model, ids, dtype)[0][:, first:last].mean().item()


def threshold_key(context: Optional[str], dtype: str) -> str:
    """The name a threshold is kept under: the prompt form and the dtype (a string, for JSON)."""
    return f"{dtype} " + ("no document" if context is None else hashlib.sha256(context.encode()).hexdigest()[:16])


def threshold(model, tok, context: Optional[str], dtype: str) -> float:
    """The highest question gate among the anchor's unrelated prompts, in this prompt form
    (computed once per adapter, prompt form and dtype, then kept on the adapter). The prompts
    share everything before the question (with LIFT+ICL, the truncated document): that part runs
    once, into a KV cache, and each prompt's own tokens run after it (48 short passes, not 48
    passes over the document)."""
    memo, key = gated_memory.adapters(model)[0].switch_thresholds, threshold_key(context, dtype)
    if key not in memo:
        spans = [question_span(tok, q, context) for q in anchor_questions()]
        common = len(os.path.commonprefix([ids for ids, _, _ in spans]))      # (it compares lists too)
        shared = min([common] + [first for _, first, _ in spans])  # every prompt's tokens agree up to here
        cache = KVCache(model.cfg, 1, max(len(ids) for ids, _, _ in spans), model.tok_embeddings.weight.device,
                        model.tok_embeddings.weight.dtype)
        recorded(model, spans[0][0][:shared], dtype, cache)
        memo[key] = max(recorded(model, ids[shared:], dtype, cache, shared)[0][:, first - shared:last - shared].mean().item()
                        for ids, first, last in spans)
    return memo[key]


def gate_opens(model, tok, question: str, context: Optional[str], dtype: str) -> bool:
    """Should the adapter answer this question? Always yes for an adapter without a gate (LoRA).
    The decision, with its gate and threshold, is kept as `switch_last` on the first memory."""
    memories = gated_memory.adapters(model)
    if not memories:
        return True
    gate, tau = question_gate(model, tok, question, context, dtype), threshold(model, tok, context, dtype)
    memories[0].switch_last = {"gate": gate, "threshold": tau, "adapter_used": gate > tau}
    return gate > tau


def switch_decision(model) -> Optional[dict]:
    """The last answer's decision ({gate, threshold, adapter_used}), if the switch made one."""
    memories = gated_memory.adapters(model)
    return memories[0].switch_last if memories else None


def thresholds_file(adapter_path: str) -> Path:
    return Path(adapter_path).with_suffix(".switch.json")


def load_thresholds(model, adapter_path: str) -> None:
    """Take the thresholds an earlier process computed for this very adapter (the checksum of its
    tensors), if its file has them beside it; anything else there is ignored, and computed again."""
    memories, path = gated_memory.adapters(model), thresholds_file(adapter_path)
    if memories and path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if saved.get("adapter") == tensors_digest(gated_memory.adapter_state_dict(model)):
            memories[0].switch_thresholds.update(saved.get("thresholds", {}))


def save_thresholds(model, adapter_path: str) -> None:
    """Keep the thresholds computed so far beside the adapter's file (written whole, then renamed
    into place); a file that cannot be written only costs the next process the 48 passes."""
    memories, path = gated_memory.adapters(model), thresholds_file(adapter_path)
    if not memories or not memories[0].switch_thresholds:
        return
    saved = {"adapter": tensors_digest(gated_memory.adapter_state_dict(model)),
             "thresholds": memories[0].switch_thresholds}
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".adapter-", suffix=".tmp")   # cache.py clears stale ones
        with os.fdopen(fd, "w") as f:
            json.dump(saved, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
