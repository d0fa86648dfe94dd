"""What the gate g of Gated Memory does after LIFT: its mean per layer and head, on the tokens of
a question about the document and of an unrelated question (arXiv 2502.14644 §3.3).

    python eval.py gates --doc D --question Q --out runs/g     heatmaps and gates.json
    ... --questions Q.jsonl --general G.jsonl                   and each set's mean gate
    ... --texts other.txt                                      and on windows of texts (the document's first)
    (always)                                                   and on the anchor's chat prompts against their replies
    ... --memory-scale 40 ...                                  an adapter trained with other Gated Memory settings

The paper reads g as the share of attention a query would put on the absorbed document: high for
queries the document answers, low elsewhere. This measures whether a trained adapter behaves so.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import gated_memory
import plots
from benchmarks import read_questions
from cache import absorb_cached, anchor_set
from compute import autocast
from data import IGNORE, read_document, truncate_middle
from switch import question_span, recorded


def probe_means(model, inputs: list[tuple[list[int], int, int]], dtype: str) -> tuple[list[float], list[float]]:
    """Per layer: the mean gate and the memory's share of the output over tokens a..b of each input
    (ids, a, b), averaged over the inputs."""
    g, m = zip(*[(g[:, a:b].mean((1, 2)), m[:, a:b].mean((1, 2)))
                 for ids, a, b in inputs for g, m in [recorded(model, ids, dtype)]])
    return torch.stack(g).mean(0).tolist(), torch.stack(m).mean(0).tolist()


class GateTrace:
    """Called after every optimizer step (lift.train_adapter's on_step): every `every` steps it
    records the mean gate and the memory's share of the output, per layer, on three probes that
    never change during training: a window of the document (the middle one), the questions about
    the document and unrelated general questions (each over the question's own tokens).
    The paper's reading predicts a gate high on the first two and low on the third."""

    def __init__(self, model, tok, doc: list[int], window: int, doc_questions: list[str],
                 general_questions: list[str], dtype: str, every: int = 10):
        mid = max(0, len(doc) // 2 - window // 2)
        self.model, self.dtype, self.every = model, dtype, every
        self.probes = {"document window": [(doc[mid:mid + window], 0, min(window, len(doc)))],
                       "document questions": [question_span(tok, q) for q in doc_questions],
                       "general questions": [question_span(tok, q) for q in general_questions]}
        self.steps: list[int] = []
        self.gate = {name: [] for name in self.probes}     # per recorded step: per-layer mean
        self.share = {name: [] for name in self.probes}

    def __call__(self, step: int) -> None:
        if step != 1 and step % self.every:
            return
        self.steps.append(step)
        for name, inputs in self.probes.items():
            gate, share = probe_means(self.model, inputs, self.dtype)
            self.gate[name].append(gate)
            self.share[name].append(share)

    def result(self) -> dict:
        return {"steps": self.steps, "gate_per_layer": self.gate, "memory_share_per_layer": self.share}


@torch.no_grad()
def mean_gates(model, tok, question: str, dtype: str) -> torch.Tensor:
    """Mean g per layer and head over the question's own tokens in the LIFT-mode prompt (not over
    the chat template around it, the same for every question). -> (layers, H)"""
    ids, first, last = question_span(tok, question)
    return recorded(model, ids, dtype)[0][:, first:last].mean(1)


def prompt_and_reply(model, chats: list, dtype: str) -> dict:
    """The mean gate and memory share on the anchor's chat prompts (after the chat template's head,
    the same in all) and, apart, on the base model's replies to them: --gate-penalty counts both.
    Does the gate tell a question from an answer?"""
    head = next(i for i in range(len(chats[0].input_ids)) if len({tuple(ex.input_ids[:i + 1]) for ex in chats}) > 1)
    reply = [next(i for i, label in enumerate(ex.labels) if label != IGNORE) for ex in chats]
    entry = {}
    for where, spans in (("prompt", [(ex.input_ids, head, r) for ex, r in zip(chats, reply)]),
                         ("reply", [(ex.input_ids, r, len(ex.input_ids)) for ex, r in zip(chats, reply)])):
        gate, share = probe_means(model, spans, dtype)
        entry[f"gate on the {where}"] = round(sum(gate) / len(gate), 4)
        entry[f"memory share on the {where}"] = round(sum(share) / len(share), 4)
    return entry


def text_windows(tok, text: str, window: int, count: int = 4) -> list[tuple[list[int], int, int]]:
    """`count` windows of a text, evenly spaced from its start to its end, as probe inputs."""
    ids = tok.encode(text)
    starts = sorted({round(k * max(0, len(ids) - window) / max(1, count - 1)) for k in range(count)})
    return [(ids[s:s + window], 0, len(ids[s:s + window])) for s in starts]


def gates(doc_path: str, question: str, unrelated: str, out: Path, model_name, data_cfg, train_cfg,
          question_files: dict[str, str | None] | None = None, gm_cfg=None, texts: list[str] = ()) -> dict:
    """Absorb the document (or load it from the cache), then map the gates for both questions.
    question_files (name -> JSONL of questions) adds each group's mean gate and memory share, on the
    question alone (LIFT's prompt) and after the truncated document (LIFT+ICL's); with --distill
    the adapter's own self-study questions are one more group: does the gate open for the questions
    it was trained on, for the user's questions about the same facts, or for neither? texts: the
    same on windows of each text, the document's own first: does the gate know the document's text
    from another text? gm_cfg: the adapter's settings (default: the paper's)."""
    from checkpoint import load_model
    from study import study_pairs
    model, tok = load_model(model_name, dtype=getattr(torch, train_cfg.dtype))
    chats = [ex for ex in anchor_set(model, tok, train_cfg.dtype, form=train_cfg.anchor_format)
             if ex.labels[0] == IGNORE]                                           # before the adapter
    text = read_document(doc_path)
    absorb_cached(model, tok, text, data_cfg=data_cfg, adapter_cfg=gm_cfg or gated_memory.GatedMemoryConfig(),
                  train_cfg=train_cfg)
    maps = {name: mean_gates(model, tok, q, train_cfg.dtype)
            for name, q in (("about the document", question), ("unrelated", unrelated))}
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_gates(maps, out)
    summary = {k: round(v.mean().item(), 4) for k, v in maps.items()}
    groups = {name: [q["question"] for q in read_questions(path)] for name, path in (question_files or {}).items() if path}
    if groups and data_cfg.distill:
        groups["self-study questions"] = [q for q, _, _ in study_pairs(text, data_cfg)]
    context = truncate_middle(tok.encode(text), data_cfg.context, tok)     # what LIFT+ICL puts before the question
    for name, qs in ((n, qs) for n, qs in groups.items() if qs):
        summary[f"{name} ({len(qs)})"] = entry = {}
        for where, ctx in (("", None), (" after the document", context)):
            gate, share = probe_means(model, [question_span(tok, q, ctx) for q in qs], train_cfg.dtype)
            entry[f"gate{where}"] = round(sum(gate) / len(gate), 4)
            entry[f"memory share{where}"] = round(sum(share) / len(share), 4)
    summary[f"anchor's chat prompts ({len(chats)}), and the base's replies"] = prompt_and_reply(model, chats, train_cfg.dtype)
    for name, body in [(f"{Path(doc_path).name} (the document)", text)] + [(Path(p).name, read_document(p)) for p in texts]:
        gate, share = probe_means(model, text_windows(tok, body, data_cfg.window), train_cfg.dtype)
        summary[f"windows of {name}"] = {"gate": round(sum(gate) / len(gate), 4), "memory share": round(sum(share) / len(share), 4)}
    result = {"question": question, "unrelated": unrelated, "mean_gate": summary,
              "per_layer": {k: v.mean(1).tolist() for k, v in maps.items()}}
    tmp = out / "gates.json.tmp"                        # written whole, then renamed: never half a file
    tmp.write_text(json.dumps(result))
    tmp.replace(out / "gates.json")
    print(json.dumps(summary))
    return result
