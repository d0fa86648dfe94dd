"""What the gate g of Gated Memory does after LIFT: its mean per layer and head, on the tokens of
a question about the document and of an unrelated question (arXiv 2502.14644 §3.3).

    python eval.py gates --doc D --question Q --out runs/g     heatmaps and gates.json

The paper reads g as the share of attention a query would put on the absorbed document: high for
queries the document answers, low elsewhere. This measures whether a trained adapter behaves so.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import gated_memory
import plots
from cache import absorb_cached
from data import question_messages, read_document
from lift import autocast


@torch.no_grad()
def mean_gates(model, tok, question: str, dtype: str) -> torch.Tensor:
    """Mean g per layer and head over the question's own tokens in the LIFT-mode prompt (not over
    the chat template around it, the same for every question). -> (layers, H)"""
    messages = question_messages(question, None)
    ids, content = tok.encode_chat(messages), messages[0]["content"]
    content_ids = tok.encode(content)
    at = next(i for i in range(len(ids)) if ids[i:i + len(content_ids)] == content_ids)
    first, last = at + len(tok.encode(content[:content.index(question)])), at + len(content_ids)
    adapters = gated_memory.adapters(model)
    for a in adapters:
        a.record_gates = True
    with autocast(model.tok_embeddings.weight.device, dtype):
        model(torch.tensor([ids]))
    for a in adapters:
        a.record_gates = False
    return torch.stack([a.last_gates[first:last].mean(0) for a in adapters])


def gates(doc_path: str, question: str, unrelated: str, out: Path, model_name, data_cfg, train_cfg) -> dict:
    """Absorb the document (or load it from the cache), then map the gates for both questions."""
    from checkpoint import load_model
    model, tok = load_model(model_name, dtype=getattr(torch, train_cfg.dtype))
    absorb_cached(model, tok, read_document(doc_path), data_cfg=data_cfg,
                  adapter_cfg=gated_memory.GatedMemoryConfig(), train_cfg=train_cfg)
    maps = {name: mean_gates(model, tok, q, train_cfg.dtype)
            for name, q in (("about the document", question), ("unrelated", unrelated))}
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_gates(maps, out)
    summary = {k: round(v.mean().item(), 4) for k, v in maps.items()}
    result = {"question": question, "unrelated": unrelated, "mean_gate": summary,
              "per_layer": {k: v.mean(1).tolist() for k, v in maps.items()}}
    (out / "gates.json").write_text(json.dumps(result))
    print(json.dumps(summary))
    return result
