"""How much an adapter raises the likelihood of the reference answers, with and without the
document's opening in context: a diagnostic of LIFT+ICL, forward passes only, no generation.

    python answer_gain.py --bench examples/real_docs.jsonl RUN_FOLDER ADAPTER.safetensors [...]

For every question a finished `eval.py run` asked (RUN_FOLDER's records.jsonl says which document,
and whether its evidence lay inside the ICL budget), the reply is taken to be the first reference
answer, and its mean log-probability per token is read under the base model and under the adapter,
in LIFT's prompt (the question alone) and in LIFT+ICL's (the document truncated to the budget, then
the question). The gain is adapter minus base. An adapter whose memory works alongside the text in
context keeps its gain when the opening is there; one that loses its answers in LIFT+ICL (README,
"What this teaches") should show a smaller gain there, question by question, before any sampling.
Adapter files are the ones `eval.py run` caches (~/.cache/lift/<doc>-<settings>.safetensors).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters import attached, load_adapter_file
from benchmarks import read_benchmark
from compute import autocast, resolve_dtype
from lift import answer_prompt
from options import UserError
from storage import write_json


@torch.no_grad()
def answer_logprob(model, prompt: list[int], answer: list[int], dtype: str) -> float:
    """Mean log-probability per token of `answer` as the reply that follows `prompt`."""
    ids = torch.tensor([prompt + answer], device=model.tok_embeddings.weight.device)
    with autocast(ids.device, dtype):
        logits = model(ids)[0, len(prompt) - 1:-1].float()          # the positions that predict the answer
    return F.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).mean().item()


def gains(model, tok, questions: list[dict], documents: dict[str, list[int]], context: int, dtype: str,
          base: dict | None = None) -> list[dict]:
    """Per question: the answer's log-probability under base and adapter, in lift and lift+icl.
    `base`, if given, keeps the base model's figures across calls: they are the same for every adapter."""
    kind, rows, base = attached(model), [], {} if base is None else base
    for q in questions:
        answer = tok.encode(q["answers"][0])
        row = {"question": q["question"], "in_budget": q["in_budget"]}
        for mode in ("lift", "lift+icl"):
            prompt = answer_prompt(tok, q["question"], documents[q["doc"]], mode, context)
            if (q["doc"], q["question"], mode) not in base:
                with kind.disabled(model):
                    base[q["doc"], q["question"], mode] = answer_logprob(model, prompt, answer, dtype)
            row[f"base {mode}"] = base[q["doc"], q["question"], mode]
            row[f"adapter {mode}"] = answer_logprob(model, prompt, answer, dtype)
            row[f"gain {mode}"] = row[f"adapter {mode}"] - row[f"base {mode}"]
        rows.append(row)
    return rows


def report(name: str, rows: list[dict]) -> str:
    """One Markdown row per evidence place: mean gain without and with the opening in context, and on
    how many questions the gain with it is the smaller."""
    lines = []
    for inside in (False, True):
        rs = [r for r in rows if r["in_budget"] is inside]
        if not rs:
            continue
        mean = lambda k: sum(r[k] for r in rs) / len(rs)
        shrinks = sum(r["gain lift+icl"] < r["gain lift"] for r in rs)
        lines.append(f"| {name} | {'inside' if inside else 'outside'} ({len(rs)}) | {mean('gain lift'):+.2f} | "
                     f"{mean('gain lift+icl'):+.2f} | {shrinks}/{len(rs)} | {mean('base lift'):.2f} / {mean('base lift+icl'):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("run", help="a finished `eval.py run` folder: its records.jsonl names the questions")
    cli.add_argument("adapters", nargs="+", help="adapter files (.safetensors) to compare on those questions")
    cli.add_argument("--bench", required=True, help="the benchmark the run answered (its documents' text)")
    cli.add_argument("--context", type=int, default=512, help="the ICL budget in tokens (the run's --context)")
    cli.add_argument("--model", default=None, help="the base model (default: the built-in one)")
    cli.add_argument("--dtype", default="auto", help="float32, bfloat16, or auto (this device's fast one)")
    cli.add_argument("--out", help="also write every question's figures here, as JSON")
    args = cli.parse_args(argv)
    try:
        from checkpoint import load_model
        records = Path(args.run) / "records.jsonl"
        if not records.is_file():
            raise UserError(f"{args.run}: no records.jsonl (not a finished `eval.py run` folder)")
        seen, questions = set(), []
        for r in map(json.loads, records.open()):
            if r["mode"] == "icl" and (r["doc"], r["question"]) not in seen:   # each question once
                seen.add((r["doc"], r["question"]))
                questions.append(r)
        model, tok = load_model(args.model)
        dtype = resolve_dtype(args.dtype, model.tok_embeddings.weight.device)
        documents = {d["id"]: tok.encode(d["document"]) for d in read_benchmark(args.bench)}
        print("| adapter | evidence | gain, lift | gain, lift+icl | smaller with the opening | base log-prob, lift / lift+icl |\n"
              "|---|---|---:|---:|---:|---:|")
        everything, base = {}, {}
        for path in args.adapters:
            load_adapter_file(model, path)
            everything[path] = rows = gains(model, tok, questions, documents, args.context, dtype, base)
            print(report(Path(path).stem, rows), flush=True)
        if args.out:
            write_json(Path(args.out), everything)     # written whole, then renamed
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
