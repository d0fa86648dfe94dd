"""How many of a document's facts an adapter can store when it is shown them directly.

    python storage.py --bench results/facts_at.jsonl --doc facts-2000-1 --adapter gated_memory --lr 3e-3

LIFT asks an adapter to store a document's facts (its *bindings*: which name goes with which
maker, year, place) and to give them back when a question asks. On generated facts Gated Memory
answers far fewer questions than LoRA of the same size (results/NOTEBOOK.md, "The method's quality"). Two
explanations predict different things here: either the questions never reach what the memory
stored (then shown the questions themselves it should learn them like LoRA), or the memory
stores bindings slowly whatever it is shown (then it lags here too).

So this trains a fresh adapter on nothing but the document's self-study questions (distill.py's
"What does the text say about <name>?" answered by the document's own sentence) about the facts
whose sentence lies outside the truncated context, and after every epoch counts the questions it
has *stored*: every token of the answer is the model's most likely next token, so greedy decoding
writes the sentence exactly. Teacher-forced, one forward pass per question: cheap enough to follow
the whole learning curve. Each question is asked in two forms, without the document (LIFT) and
after its truncated copy (LIFT+ICL); one is trained, both are measured.
With --phrasings K each fact is trained under K phrasings of the question (study.KEY_QUESTIONS,
the first being the usual one), and a third form is measured: the same facts asked in a phrasing
never trained (REWORDED), without the document. Stored in the trained phrasings but not reached
in the new one is what the notebook's "keyed on the form of the prompt" describes; the probe measures
whether more phrasings close that gap, for either adapter.
`--keys` looks at why, without training: at the position where an answer starts, how alike the
queries (the keys a Gated Memory reads) are for two facts asked in one wording, and for one fact
asked in two wordings.
No windows and, by default, no anchor: storage alone. Gated Memory's own settings (--gate-shift,
--memory-mult, ...) are flags too, so that the gate's part in it can be measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import benchmarks as bm
import gated_memory
import lift
import lora
from adapters import ADAPTERS, adapter_config, attach_fresh
from cache import anchor_set
from checkpoint import load_model
from compute import autocast, resolve_dtype
from data import IGNORE, Example, batches, qa_example, truncate_middle
from lift import TrainConfig
from options import UserError, add_options, from_args
from study import KEY_QUESTIONS, QUESTION, REPLY, statements


REWORDED = "What do you know about {}?"      # a phrasing no study question uses: the held-out form
assert REWORDED not in KEY_QUESTIONS + (QUESTION,)


def facts_outside(text: str, n: int, context: str) -> list[tuple[str, str]]:
    """(name, sentence) for up to n names of `text` (study.statements) whose sentence is *not* in
    the truncated `context`: facts that only what the adapter stored can give back."""
    return [(name, s) for name, s in statements(text, n) if s not in context]


def fact_examples(tok, facts: list[tuple[str, str]], context: str | None = None,
                  phrasing: str = QUESTION) -> list[Example]:
    """A self-study question per fact, answered by quoting its sentence; asked with `context` in
    the prompt (None: no document, LIFT alone), in `phrasing`."""
    return [qa_example(tok, phrasing.format(name), REPLY.format(s), context) for name, s in facts]


class _KeyRecorder(torch.nn.Module):
    """A stand-in head adapter that changes nothing and keeps the queries Gated Memory would read."""
    def forward(self, q, attn):
        self.q = q.detach()                                  # (B, T, H, D), before rotary embedding
        return attn


@torch.no_grad()
def answer_keys(model, examples: list[Example]) -> list[torch.Tensor]:
    """Per layer, (F, H, D): each example's queries at the position that predicts its answer's first
    token, the key a Gated Memory there would read to choose what to say. Base model only."""
    recorders = [_KeyRecorder() for _ in model.layers]
    for layer, r in zip(model.layers, recorders):
        layer.attention.head_adapter = r
    keys = [[] for _ in model.layers]
    try:
        for ex in examples:
            first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)   # the answer's first token
            model(torch.tensor([ex.input_ids], device=model.tok_embeddings.weight.device))
            for k, r in zip(keys, recorders):
                k.append(r.q[0, first - 1].float().cpu())  # (H, D) at the position predicting it
    finally:
        for layer in model.layers:
            layer.attention.head_adapter = None
    return [torch.stack(k) for k in keys]


def key_similarity(model, tok, facts: list[tuple[str, str]]) -> list[dict]:
    """Per layer, mean cosines (over heads) between the keys of answer_keys: of two facts asked in
    the same wording, of one fact asked in two wordings (QUESTION and REWORDED), and of the facts'
    own parts of their keys (each wording's mean over facts taken away) across the two wordings.
    The first two say whether a key tells facts apart more than it tells wordings apart."""
    a, b = (answer_keys(model, fact_examples(tok, facts, phrasing=p)) for p in (QUESTION, REWORDED))
    cos = torch.nn.functional.cosine_similarity
    rows = []
    for layer, (x, y) in enumerate(zip(a, b)):                          # (F, H, D) each
        n = x.shape[0]
        pairs = cos(x[:, None], x[None], dim=-1).mean(-1)                # (F, F) over heads
        rows.append({"layer": layer, "other_fact_same_wording": ((pairs.sum() - pairs.diag().sum()) / (n * (n - 1))).item(),
                     "same_fact_other_wording": cos(x, y, dim=-1).mean().item(),
                     "fact_parts_across_wordings": cos(x - x.mean(0), y - y.mean(0), dim=-1).mean().item()})
    return rows


@torch.no_grad()
def stored(model, examples: list[Example], dtype: str) -> tuple[float, float]:
    """(share of examples whose answer the model would write greedily, word for word; mean gate
    of Gated Memory over the positions that predict the answer, every layer and head, or nan)."""
    device = model.tok_embeddings.weight.device
    memories = gated_memory.adapters(model)
    hits, gates = 0, []
    for m in memories:
        m.record_gates = True
    for ex in examples:
        ids = torch.tensor([ex.input_ids], device=device)                            # (1, T)
        with autocast(device, dtype):
            predicted = model(ids)[0, :-1].argmax(-1)                               # (T-1,) next token at each position
        targets = torch.tensor(ex.labels[1:], device=device)                       # (T-1,)
        at = targets != IGNORE                                                      # positions predicting the answer
        hits += bool((predicted[at] == targets[at]).all())
        if memories:                                                                # last_gates: (T, H) per layer
            gates.append(torch.stack([m.last_gates[:-1][at.cpu()] for m in memories]).mean().item())
    for m in memories:
        m.record_gates = False
    return hits / len(examples), (sum(gates) / len(gates) if gates else float("nan"))


def curve(model, forms: dict[str, list[Example]], train_on: str, adapter_cfg, train_cfg: TrainConfig,
          anchors=(), every: int = 5, extra: list[Example] = ()) -> list[dict]:
    """Attach a fresh adapter, train it on forms[train_on] for train_cfg.epochs epochs (one step per
    example, or per --qa-batch examples; seeded order) and return the learning curve: after every
    epoch, the share stored and the gate on the answers in the trained form; every `every` epochs
    (and the last), in every form (the same questions asked without and with the document, or
    reworded: does what is stored one way transfer?). `extra`: more training examples beside
    forms[train_on] (other phrasings)."""
    attach_fresh(model, adapter_cfg, seed=train_cfg.seed)
    examples = forms[train_on] + list(extra)
    g = torch.Generator().manual_seed(train_cfg.seed)
    plan = [[examples[i] for i in torch.randperm(len(examples), generator=g).tolist()]
            for _ in range(train_cfg.epochs)]
    points, t0 = [], time.time()

    def measure(epoch: int):
        point = {"epoch": epoch}
        for name, exs in forms.items():
            if name == train_on or epoch % every == 0 or epoch == train_cfg.epochs:
                point[name], point[f"{name}_gate"] = stored(model, exs, train_cfg.dtype)
        points.append({**point, "seconds": round(time.time() - t0, 1)})
        print(f"epoch {epoch:3d}  " + "  ".join(f"{k} {v:.3f}" for k, v in point.items() if k != "epoch"),
              file=sys.stderr)

    measure(0)
    steps = len(batches(plan[0], train_cfg.batch, train_cfg.qa_batch))      # optimizer steps per epoch
    lift.train_adapter(model, plan, train_cfg, progress=False, anchors=list(anchors),
                       on_step=lambda n: measure(n // steps) if n % steps == 0 else None)
    return points


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Storage probe: train an adapter on a document's self-study questions "
                                            "only and follow how many it can answer, epoch by epoch.")
    p.add_argument("--bench", help="a benchmark .jsonl (eval.py generate writes one)")
    p.add_argument("--doc", help="the id of one document in it")
    p.add_argument("--keys", action="store_true", help="instead of training: how alike the base model's queries "
                                                         "are at each answer's start, fact against wording (JSON)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="instead of training: draw the curves of these "
                                                              "records into --out (a .png)")
    p.add_argument("--facts", type=int, default=32, help="how many names of the document to ask about")
    p.add_argument("--adapter", choices=sorted(ADAPTERS), default="gated_memory")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA's rank (alpha 2·rank)")
    p.add_argument("--lora-targets", choices=tuple(lora.TARGETS), default="all",
                   help="the projections LoRA updates (all; attention: wq wk wv wo; feed_forward: w1 w2 w3)")
    p.add_argument("--train-on", choices=("alone", "in_context"), default="alone",
                   help="ask the training questions without the document (LIFT) or after its truncated copy "
                        "(LIFT+ICL); both forms are measured")
    p.add_argument("--context", type=int, default=512, help="the truncated document's length (in_context form)")
    p.add_argument("--every", type=int, default=5, help="measure the forms not trained on every N epochs")
    p.add_argument("--phrasings", type=int, default=1, choices=range(1, len(KEY_QUESTIONS) + 1), metavar="K",
                   help=f"train each fact under K phrasings of the question (1-{len(KEY_QUESTIONS)}, "
                        f"study.KEY_QUESTIONS), in the --train-on form; the held-out phrasing "
                        f"{REWORDED!r} is measured too")
    p.add_argument("--model", default=None, help="GGUF file, HF directory or hub id (default: built-in)")
    p.add_argument("--out", required=True, help="write the curve here (JSON), or the figure with --plot")
    add_options(p, TrainConfig, only=("epochs", "lr", "anchor", "gate_penalty", "gate_open", "dtype", "seed", "qa_batch"))
    add_options(p, gated_memory.GatedMemoryConfig)
    p.set_defaults(epochs=20, anchor=0.0)
    return p


def write_json(out: Path, record: dict) -> None:
    """Whole or not at all: a temporary file, then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.plot:
        from plots import plot_storage
        plot_storage({Path(f).stem: json.loads(Path(f).read_text()) for f in args.plot}, Path(args.out))
        return 0
    if not (args.bench and args.doc):
        print("error: --bench and --doc are needed (or --plot)", file=sys.stderr)
        return 2
    try:
        doc = next((d for d in bm.read_benchmark(args.bench) if d["id"] == args.doc), None)
        if doc is None:
            raise UserError(f"{args.bench} has no document {args.doc!r}")
        train_cfg = from_args(TrainConfig, args)
        train_cfg.dtype = resolve_dtype(train_cfg.dtype, torch.device("cpu"))
        model, tok = load_model(args.model, dtype=getattr(torch, train_cfg.dtype))
        context = truncate_middle(tok.encode(doc["document"]), args.context, tok)
        facts = facts_outside(doc["document"], args.facts, context)
        if not facts:
            raise UserError(f"{args.doc}: no name's sentence lies outside the {args.context}-token context")
        if args.keys:
            rows = key_similarity(model, tok, facts)
            for r in rows:
                print(f"layer {r['layer']:2d}  other fact, same wording {r['other_fact_same_wording']:.3f}  same fact, "
                      f"other wording {r['same_fact_other_wording']:.3f}  the facts' own parts across wordings "
                      f"{r['fact_parts_across_wordings']:.3f}")
            write_json(Path(args.out), {"doc": args.doc, "facts": len(facts), "wordings": [QUESTION, REWORDED],
                                        "layers": rows})
            return 0
        forms = {"alone": fact_examples(tok, facts), "in_context": fact_examples(tok, facts, context),
                 "reworded": fact_examples(tok, facts, phrasing=REWORDED)}
        where = None if args.train_on == "alone" else context
        extra = [ex for q in KEY_QUESTIONS[1:args.phrasings] for ex in fact_examples(tok, facts, where, phrasing=q)]
        adapter_cfg = (from_args(gated_memory.GatedMemoryConfig, args) if args.adapter == "gated_memory"
                       else adapter_config("lora", args.lora_rank, lora_targets=args.lora_targets))
        anchors = anchor_set(model, tok, train_cfg.dtype, form=train_cfg.anchor_format) if train_cfg.anchor else ()
        points = curve(model, forms, args.train_on, adapter_cfg, train_cfg, anchors, args.every, extra)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    record = {"doc": args.doc, "facts": len(forms["alone"]), "adapter": args.adapter, "train_on": args.train_on,
              "phrasings": args.phrasings,
              "train": asdict(train_cfg), "adapter_config": asdict(adapter_cfg),
              "curve": points}
    write_json(out, record)
    last = points[-1]
    print(f"{record['facts']} facts; stored after {last['epoch']} epochs: alone {last['alone']:.2f}, "
          f"in context {last['in_context']:.2f}, reworded {last['reworded']:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
