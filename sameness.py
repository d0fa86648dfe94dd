"""How far an adapter moves the answers to questions that have nothing to do with the document.

    python sameness.py --bench results/facts_at.jsonl --doc facts-2000-1 --general examples/general_questions.jsonl --out results/sameness/fresh.jsonl
    python sameness.py ... --adapter-file A.safetensors --floors 0 0.01 0.02 --out results/sameness/floor.jsonl
    python sameness.py ... --dtype bfloat16 --versus-dtype float32 --out results/sameness/precision.jsonl

The measure (eval.py run --general uses it too): after LIFT, how often the adapted model's greedy
reply to a general question ("What is the capital of France?") is the base model's reply,
character for character — lift against the base without the document, lift+icl against the base
with the same truncated document — and how often it contains a right answer.

Without --adapter-file it measures a Gated Memory that was never trained, as attach() leaves it:
the memory adds ≈ 0 and every gate sits at its start σ(−scale · shift), so each head's attention
is only scaled by (1 − g). That is where the measure starts before LIFT has taught anything;
--gate-shift moves the start (the paper's 1 gives g ≈ 0.047).
With --floors τ ... every g below τ is set to exactly 0 at answer time, so those heads pass the
base model's attention unchanged (Gated Memory's --gate-floor, applied here only when answering).
Every setting also answers the document's own questions in both modes, to show what it costs there.
With --versus-dtype D no adapter is involved: the base model computed in --dtype is compared with
the same base model loaded and computed in D (closed against closed, icl against icl), the floor
that numerical precision alone sets under a word-for-word measure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import benchmarks as bm
import gated_memory
import lift
from adapters import attach_fresh, attached, load_adapter_file
from checkpoint import load_model
from compute import resolve_dtype
from gates import probe_means
from options import UserError, add_options, from_args
from switch import question_span, switch_decision

BASE_ANSWERS: dict = {}   # the base model's general answers, computed once per process (they do not change)


def general_ability(model, tok, doc: dict, ids: list[int], general: list[dict], context: int, dtype: str,
                    path: Path, adapter: str, switch: bool = False) -> dict:
    """How often the adapted model answers questions unrelated to `doc` exactly as the base model
    does (lift against closed, lift+icl against icl, the same prompts) and how often rightly; for
    Gated Memory also the mean gate, and the memory's share of each head's output (what the gate
    lets through), on document questions against general ones (the paper expects the first to be
    much higher). One record per question and mode is appended to `path`; with switch (switch.py),
    whether the adapter answered, and how often it did."""
    ask = lambda q, m, s=False: lift.answer(model, tok, q, ids, mode=m, context=context, max_new_tokens=24, dtype=dtype,
                                            switch=s)

    def base_answer(q: str, m: str) -> str:
        key = (m, q, tuple(ids) if m == "icl" else None)
        if key not in BASE_ANSWERS:
            BASE_ANSWERS[key] = ask(q, m)
        return BASE_ANSWERS[key]

    same, right, used = {"lift": [], "lift+icl": []}, {"lift": [], "lift+icl": []}, {"lift": [], "lift+icl": []}
    with path.open("a") as f:
        for q in general:
            for mode, base_mode in (("lift", "closed"), ("lift+icl", "icl")):
                base, adapted = base_answer(q["question"], base_mode), ask(q["question"], mode, switch)
                same[mode].append(base == adapted)
                right[mode].append(bm.contains(adapted, q["answers"]))
                decided = switch_decision(model) if switch else None       # what the switch did, if it decided
                used[mode] += [decided["adapter_used"]] if decided else []
                decision = {"switch": decided} if decided else {}
                f.write(json.dumps({"doc": doc["id"], "adapter": adapter, "mode": mode, "question": q["question"],
                                    "base": base, "adapted": adapted, "same": base == adapted, **decision}) + "\n")
    out = {f"general_same_{m}": sum(v) / len(v) for m, v in same.items()}
    out.update({f"general_adapter_used_{m}": sum(v) / len(v) for m, v in used.items() if v})
    out.update({f"general_contained_{m}": sum(v) / len(v) for m, v in right.items()})
    if attached(model) is gated_memory:      # the gate, and what it lets through: the memory's share of the output
        for name, qs in (("document", doc["questions"]), ("general", general)):
            gate, share = probe_means(model, [question_span(tok, q["question"]) for q in qs], dtype)
            out[f"gate_{name}"], out[f"share_{name}"] = sum(gate) / len(gate), sum(share) / len(share)
    print(json.dumps({"doc": doc["id"], "adapter": adapter, **out}), file=sys.stderr)
    return out


def document_answers(model, tok, doc: dict, ids: list[int], context: int, dtype: str, max_new_tokens: int) -> dict:
    """The document's own questions in lift and lift+icl: how many answers contain the truth,
    for evidence inside and outside the truncated context."""
    counts = {}
    for q in doc["questions"]:
        where = {True: "inside", False: "outside", None: "unknown"}[bm.in_budget(q.get("evidence_pos"), len(ids), context)]
        for mode in ("lift", "lift+icl"):
            reply = lift.answer(model, tok, q["question"], ids, mode=mode, context=context,
                                max_new_tokens=max_new_tokens, dtype=dtype)
            right, asked = counts.get(f"{mode} {where}", (0, 0))
            counts[f"{mode} {where}"] = (right + int(bm.contains(reply, q["answers"])), asked + 1)
    return {k: f"{right}/{asked}" for k, (right, asked) in sorted(counts.items())}


def precision_agreement(first: tuple, second: tuple, tok, ids: list[int], general: list[dict], context: int,
                        path: Path) -> dict:
    """How often two copies of the base model, each a (model, dtype) pair that differ only in
    precision, give the same greedy reply to each general question (closed and icl, the prompts
    of general_ability). No adapter anywhere: what the word-for-word measure calls a change when
    nothing but rounding changed."""
    same = {"closed": [], "icl": []}
    with path.open("a") as f:
        for q in general:
            for mode in same:
                a, b = (lift.answer(m, tok, q["question"], ids, mode=mode, context=context, max_new_tokens=24, dtype=d)
                        for m, d in (first, second))
                same[mode].append(a == b)
                f.write(json.dumps({"mode": mode, "question": q["question"], first[1]: a, second[1]: b,
                                    "same": a == b}) + "\n")
    return {f"general_same_{m}": sum(v) / len(v) for m, v in same.items()}


def set_gate_floor(model, floor: float) -> None:
    for m in gated_memory.adapters(model):
        m.gate_floor = floor


def emit(out: Path, row: dict) -> None:
    """One summary line per setting, appended as it is measured, and shown."""
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sameness.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="a benchmark .jsonl (eval.py generate writes one)")
    p.add_argument("--doc", required=True, help="the id of one document in it")
    p.add_argument("--general", required=True, help="JSONL of general questions (examples/general_questions.jsonl)")
    p.add_argument("--adapter-file", default=None, help="a trained Gated Memory (.safetensors); default: a fresh one")
    p.add_argument("--floors", type=float, nargs="+", default=[None], metavar="TAU",
                   help="at answer time set every gate below TAU to exactly 0; one measurement per value "
                        "(default: the adapter's own --gate-floor)")
    p.add_argument("--context", type=int, default=512, help="the truncated document's length (lift+icl, icl)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="for the document's questions")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--model", default=None, help="GGUF file, HF directory or hub id (default: built-in)")
    p.add_argument("--versus-dtype", default=None, choices=["bfloat16", "float32"],
                   help="no adapter: compare the base model in --dtype with the base model in this dtype")
    p.add_argument("--seed", type=int, default=0, help="the fresh adapter's initialisation")
    p.add_argument("--out", required=True, help="JSONL: one summary line per setting (answers beside it)")
    add_options(p, gated_memory.GatedMemoryConfig, skip=("gate_floor",))
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        doc = next((d for d in bm.read_benchmark(args.bench) if d["id"] == args.doc), None)
        if doc is None:
            raise UserError(f"{args.bench} has no document {args.doc!r}")
        general = bm.read_questions(args.general)
        dtype = resolve_dtype(args.dtype, torch.device("cpu"))
        model, tok = load_model(args.model, dtype=getattr(torch, dtype))
        ids = tok.encode(doc["document"])
        if args.versus_dtype:
            if args.versus_dtype == dtype:
                raise UserError(f"--versus-dtype {dtype} is the dtype already compared against")
            other, _ = load_model(args.model, dtype=getattr(torch, args.versus_dtype))
        elif args.adapter_file:
            load_adapter_file(model, args.adapter_file)
            if attached(model) is not gated_memory:
                raise UserError(f"{args.adapter_file} is not a Gated Memory adapter")
        else:
            attach_fresh(model, from_args(gated_memory.GatedMemoryConfig, args), seed=args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    answers = out.with_name(out.stem + "_answers.jsonl")
    if args.versus_dtype:
        emit(out, {"doc": doc["id"], "base": dtype, "versus": args.versus_dtype,
                   **precision_agreement((model, dtype), (other, args.versus_dtype), tok, ids, general, args.context,
                                         answers)})
        return 0
    for tau in args.floors:
        if tau is not None:
            set_gate_floor(model, tau)
        tau = gated_memory.adapters(model)[0].gate_floor
        row = {"doc": doc["id"], "adapter": args.adapter_file or f"fresh, gate_shift {args.gate_shift}",
               "gate_floor": tau, **general_ability(model, tok, doc, ids, general, args.context, dtype, answers,
                                                    f"floor {tau}"),
               **document_answers(model, tok, doc, ids, args.context, dtype, args.max_new_tokens)}
        emit(out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
