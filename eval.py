"""What LIFT buys over plain in-context reading, and what it costs (arXiv 2502.14644 §4).

    python eval.py bench                               speed of this machine (speed.py)
    python eval.py generate --kind facts --lengths 2000 4000 --out b.jsonl   a generated benchmark
    python eval.py run --bench b.jsonl --out runs/x    answer every question in every mode, score, plot
    python eval.py qa --doc D --qa Q.jsonl --out runs/y    the same for one document and its questions
    python eval.py cost --lengths 1000 2000 4000 --out runs/cost    time and memory against length (cost.py)
    python eval.py gates --doc D --question Q --out runs/g    mean gate per layer and head (gates.py)

Modes, all on the same questions: closed (base model, no document), icl (base model, document
truncated to the budget), lift (adapter, no document), lift+icl (adapter + truncated document;
what the paper reports) and full (base model, whole document, when it fits the model's window);
and two reading modes, evidence and lift+evidence: the base model or the adapter given, in place
of the truncated document, a budget-sized passage that holds the question's evidence. They say
what the model makes of the evidence when it is in front of it, and whether an adapter keeps
that reading or talks over it. One probe, lift+studied (with --distill): LIFT+ICL asked, in place
of the user's question, the self-study question whose reply holds the question's evidence, in
the study's own wording: whether the adapter holds the fact that the user's wording misses. And
lift+routed (with --distill), which a user could run: LIFT+ICL asked the study's question on the
longest studied key that the user's question holds (study.route), with the adapter on whatever
--switch would say (the route says the question is about the document); else the user's question.
Adapters: gated_memory (the paper's) and lora (the ablation's baseline), trained by the same loop.
Scores: "answer contained", exact match and token F1 (SQuAD normalisation), not the paper's GPT-4
judge. A run writes records.jsonl (one line per question, mode and adapter; an interrupted run
resumes where it stopped, and only with the same settings), summary.md, and PNG plots (plots.py).
Benchmark files and metrics: benchmarks.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

import benchmarks as bm
import lift
import plots
from adapters import adapter_config, attached
from cache import absorb_cached, learning_settings
from compute import resolve_dtype
from data import DataConfig, DataError
from gated_memory import GatedMemoryConfig
import distill
import study
from lift import TrainConfig
from lora import TARGETS
from options import UserError, add_options, from_args, recipe_defaults
from sameness import general_ability
from summary import write_summary
from switch import switch_decision

ADAPTER_NAMES = ("gated_memory", "lora")
READING = {"evidence": "icl", "lift+evidence": "lift+icl"}   # a reading mode → the mode it answers in
ANSWERED_AS = {**READING, "lift+studied": "lift+icl", "lift+routed": "lift+icl"}   # → the mode it answers in
MODES = lift.MODES + tuple(ANSWERED_AS)
BASE_MODES = lift.BASE_MODES + ("evidence",)                  # answered with any adapter switched off


# ----------------------------------------------------------------------------- run a benchmark


def run(docs: list[dict], out: Path, modes: list[str], adapters: list[str], model_name, data_cfg: DataConfig,
        train_cfg: TrainConfig, max_new_tokens: int, train_qa: bool, lora_rank: int, init: str | None = None,
        general: list[dict] = (), gate_trace: int = 0, gm_cfg: GatedMemoryConfig = GatedMemoryConfig(),
        switch: bool = False, recall: bool = True, lora_targets: str = "all", gate_gain: float = 1.0) -> list[dict]:
    """Every (document, question, mode, adapter); records appended as they come, so a rerun resumes.
    init: start Gated Memory from this SFT initialisation; its records say "gated_memory+sft".
    gate_trace N: record Gated Memory's gates every N steps of training (gates.GateTrace).
    switch: Gated Memory answers only the questions that open its gate (switch.py); the records
    of lift and lift+icl then say whether it did, with the gate and the threshold.
    recall: with --distill, also ask the adapter its own self-study questions (minutes per document).
    lora_targets: LoRA on every projection, or on some of them only (lora.TARGETS: where it writes).
    gate_gain: Gated Memory answers with every gate multiplied by this (a diagnostic, lift.answer).
    Every record carries the key of the settings that change an answer; a folder holding records
    of other settings is refused rather than mixed into one table."""
    from checkpoint import load_model
    from tqdm import tqdm
    if {"lift+studied", "lift+routed"} & set(modes) and not data_cfg.distill:
        raise DataError("lift+studied and lift+routed ask self-study questions: give --distill N (or --recipe study)")
    ids_seen = [d["id"] for d in docs]
    if len(set(ids_seen)) != len(ids_seen):
        raise DataError(f"document ids repeat ({sorted({i for i in ids_seen if ids_seen.count(i) > 1})[:3]}): "
                        f"each document needs its own id")
    settings = {"data": learning_settings(data_cfg), "train": learning_settings(train_cfg), "model": model_name,
                "max_new_tokens": max_new_tokens, "train_qa": train_qa, "lora_rank": lora_rank}
    optional = {"gated_memory": learning_settings(gm_cfg) if gm_cfg != GatedMemoryConfig() else None,
                "switch": switch or None, "lora_targets": None if lora_targets == "all" else lora_targets,
                "gate_gain": None if gate_gain == 1 else gate_gain}
    settings |= {k: v for k, v in optional.items() if v is not None}   # only when set: earlier folders keep their key
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / "records.jsonl"
    records = [json.loads(l) for l in rec_path.open()] if rec_path.exists() else []
    if any(r.get("settings_key") != key for r in records):
        raise UserError(f"{out} holds records made with other settings; choose another --out (or delete it)")
    done = {(r["doc"], r["q"], r["mode"], r["adapter"]) for r in records}
    model, tok = load_model(model_name, dtype=getattr(torch, train_cfg.dtype))
    reached = {}                      # (doc, question) → whether a self-study reply holds its fact, early enough
    asked_as = {}                     # (doc, question, mode) → what lift+studied or lift+routed asks in its place
    for doc in docs:                  # every question must fit before any training starts
        ids = tok.encode(doc["document"])
        for q in doc["questions"]:
            for m in set(modes) - {"full"}:
                lift.checked_prompt(model, tok, q["question"], ids, ANSWERED_AS.get(m, m), data_cfg.context, max_new_tokens)
        if data_cfg.distill:
            text = tok.decode(ids)            # the document as the study reads it
            hits = study.studied(text, data_cfg, doc["questions"], tok, max_new_tokens)
            reached |= {(doc["id"], i): hit for i, hit in enumerate(hits)}
            if "lift+studied" in modes:      # the study's own question for each question's evidence, if any
                pairs = [(sq, " ".join(reply.split())) for sq, reply, _ in study.study_pairs(text, data_cfg)]
                asked_as |= {(doc["id"], i, "lift+studied"): next((sq for sq, reply in pairs if study.evidence(q) in reply),
                                                                  None) for i, q in enumerate(doc["questions"])}
            if "lift+routed" in modes:       # the study's question on a key the user's holds, else the user's own
                asked_as |= {(doc["id"], i, "lift+routed"): study.route(q["question"], text, data_cfg)
                             or q["question"] for i, q in enumerate(doc["questions"])}
    todo = [(d, a) for d in docs for a in (adapters if any(m not in BASE_MODES for m in modes) else ["none"])]
    for doc, adapter_kind in tqdm(todo, desc="documents", disable=len(todo) < 2):
        adapter = adapter_kind + ("+sft" if init and adapter_kind == "gated_memory" else "")
        ids = tok.encode(doc["document"])
        wanted = [(i, m) for i, _ in enumerate(doc["questions"]) for m in modes
                  if (doc["id"], i, m, adapter if m not in BASE_MODES else "none") not in done]
        if not wanted:
            continue
        absorb_s = None
        if any(m not in BASE_MODES for _, m in wanted):
            qa = [{"question": q["question"], "answer": q["answers"][0]}
                  for q in (doc.get("train_questions") or []) if train_qa]
            trace = None
            if gate_trace and adapter_kind == "gated_memory":
                from gates import GateTrace
                trace = GateTrace(model, tok, ids, data_cfg.window, [q["question"] for q in doc["questions"]][:8],
                                  [q["question"] for q in general][:8] or ["What is the capital of France?"],
                                  train_cfg.dtype, every=gate_trace)
            t = time.perf_counter()
            res = absorb_cached(model, tok, doc["document"], data_cfg=data_cfg, train_cfg=train_cfg,
                                adapter_cfg=adapter_config(adapter_kind, lora_rank, gm_cfg, lora_targets), qa=qa,
                                init=init if adapter_kind == "gated_memory" else None, on_step=trace)
            absorb_s = time.perf_counter() - t
            if trace is not None and trace.steps:
                traced = trace.result()
                (out / f"gate_trace_{doc['id']}.json").write_text(json.dumps(traced))
                plots.plot_gate_trace(traced, out / f"gate_trace_{doc['id']}.png")
            # How well the model knows the document's text before and after LIFT (mean window loss).
            with attached(model).disabled(model):
                before = lift.document_loss(model, ids, data_cfg, train_cfg.dtype)
            after = lift.document_loss(model, ids, data_cfg, train_cfg.dtype)
            extra = general_ability(model, tok, doc, ids, general, data_cfg.context, train_cfg.dtype, out / "general.jsonl",
                                    adapter, switch) if general else {}
            if general and "lift+routed" in modes:   # general questions a route would take to the document
                extra["general_routed"] = sum(bool(study.route(g["question"], tok.decode(ids), data_cfg)) for g in general)
            if data_cfg.distill and recall:       # how many of its own self-study questions the adapter answers
                hits = distill.recalled(model, tok, ids, data_cfg, train_cfg.dtype)
                extra["study_recall"] = sum(hit for _, hit in hits) / max(1, len(hits))
                extra["study_missed"] = [q for q, hit in hits if not hit]
                extra["study_recalled"] = [q for q, hit in hits if hit]     # with the missed: every question studied
            with (out / "absorb.jsonl").open("a") as f:
                f.write(json.dumps({"doc": doc["id"], "adapter": adapter, "doc_tokens": len(ids), "trained_now": res.trained,
                                    "absorb_seconds": absorb_s, "doc_loss_before": before, "doc_loss_after": after,
                                    **extra, **res.stats}) + "\n")
        with rec_path.open("a") as f:
            for i, mode in tqdm(wanted, desc=f"{doc['id']} {adapter}", leave=False):
                q = doc["questions"][i]
                if mode == "full" and (len(lift.answer_prompt(tok, q["question"], ids, mode, data_cfg.context))
                                       + max_new_tokens > model.cfg.max_seq_len):
                    continue        # the upper bound exists only where the whole document fits
                if mode in READING and q.get("evidence_pos") is None:
                    continue        # a reading mode needs to know where the evidence is
                question = asked_as.get((doc["id"], i, mode)) if mode in ("lift+studied", "lift+routed") else q["question"]
                if question is None:
                    continue        # the probe asks only what the study asked
                seen = bm.evidence_window(ids, q["evidence_pos"], data_cfg.context) if mode in READING else ids
                routed = mode == "lift+routed" and question != q["question"]   # a route says "about the document":
                gated = switch and mode not in BASE_MODES and not routed       # the adapter answers, whatever the gate
                t = time.perf_counter()
                pred = lift.answer(model, tok, question, seen, mode=ANSWERED_AS.get(mode, mode), context=data_cfg.context,
                                   max_new_tokens=max_new_tokens, dtype=train_cfg.dtype, switch=gated, gate_gain=gate_gain)
                r = {"doc": doc["id"], "q": i, "mode": mode, "adapter": adapter if mode not in BASE_MODES else "none",
                     "question": question, "answers": q["answers"], "prediction": pred, **bm.score(pred, q["answers"]),
                     "evidence_pos": q.get("evidence_pos"), "depth": q.get("depth"), "doc_tokens": len(ids),
                     "in_budget": bm.in_budget(q.get("evidence_pos"), len(ids), data_cfg.context),
                     "seconds": time.perf_counter() - t, "absorb_seconds": absorb_s, "settings_key": key,
                     **({"switch": d} if gated and (d := switch_decision(model)) else {}),   # its decision
                     **({"routed": True} if routed else {})}
                f.write(json.dumps(r) + "\n")
                f.flush()
                records.append(r)
                done.add((r["doc"], r["q"], r["mode"], r["adapter"]))
    write_summary(records, out, {**settings, "init": init}, reached)
    return records


# ----------------------------------------------------------------------------- command line
def parser(argv=None) -> argparse.ArgumentParser:
    """The subcommands and their flags; argv only to read --recipe, whose settings become the defaults."""
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s):
        s.add_argument("--model", default=None, help="model (default: built-in SmolLM2-135M-Instruct)")
        s.add_argument("--recipe", choices=sorted(distill.RECIPES), default=None, help=distill.RECIPE_HELP)
        add_options(s, DataConfig)
        add_options(s, TrainConfig)
        s.set_defaults(**recipe_defaults(argv, distill.RECIPES))

    b = sub.add_parser("bench", help="matmul rates, prefill, LIFT training step and decode speed of this machine")
    b.add_argument("--model", default=None)
    b.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    b.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="prefill lengths")
    b.add_argument("--train-lengths", type=int, nargs="+", default=[256, 1024], help="training window lengths ℓ")
    b.add_argument("--decode-tokens", type=int, default=64)
    b.add_argument("--profile", default=None, help="folder for profiles (top operators) of one training step "
                   "and of the longest prefill, by attention path")
    b.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (each compiles for a minute)")

    g = sub.add_parser("generate", help="write a generated benchmark (invented facts, or needles)")
    g.add_argument("--kind", choices=["facts", "needle"], default="facts")
    g.add_argument("--lengths", type=int, nargs="+", default=[3000], help="document lengths in tokens")
    g.add_argument("--questions", type=int, default=10, help="facts: questions per document")
    g.add_argument("--train-questions", type=int, default=0, help="facts: extra facts given as training QA (AT)")
    g.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="needle depths")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model", default=None, help="whose tokenizer measures the length")
    g.add_argument("--out", required=True)

    for name, helptext in (("run", "answer a benchmark file in several modes and score it"),
                           ("qa", "the same for one document and a JSONL of its questions")):
        r = sub.add_parser(name, help=helptext)
        if name == "run":
            r.add_argument("--bench", required=True, help="benchmark JSONL (ours or LongBench's)")
            r.add_argument("--docs", nargs="+", default=None, metavar="ID", help="only these documents of the benchmark")
        else:
            r.add_argument("--doc", required=True)
            r.add_argument("--qa", required=True, help="questions: JSONL with question and answer")
            r.add_argument("--train-qa-file", default=None, help="QA pairs to train on (AT), JSONL; implies --train-qa")
        r.add_argument("--modes", nargs="+", default=["icl", "lift", "lift+icl"], choices=MODES)
        r.add_argument("--adapters", nargs="+", default=["gated_memory"], choices=ADAPTER_NAMES)
        r.add_argument("--lora-rank", type=int, default=16)
        r.add_argument("--lora-targets", choices=tuple(TARGETS), default="all", help="the projections LoRA updates")
        r.add_argument("--init", default=None, help="start Gated Memory from this SFT initialisation (train.py sft)")
        r.add_argument("--train-qa", action="store_true", help="train on the documents' train_questions (AT)")
        r.add_argument("--max-new-tokens", type=int, default=48)
        r.add_argument("--general", default=None, help="JSONL of general questions: after LIFT, how often the "
                                                       "adapted model answers them as the base model does")
        r.add_argument("--gate-trace", type=int, default=0, metavar="N",
                       help="record Gated Memory's gates on fixed probes every N optimizer steps (a figure per document)")
        r.add_argument("--switch", action=argparse.BooleanOptionalAction, default=False,
                       help="Gated Memory answers only the questions that open its gate more than any of the anchor's "
                            "unrelated prompts; the base model answers the rest (our extension, switch.py)")
        r.add_argument("--gate-gain", type=float, default=1.0, metavar="K", help="a diagnostic: Gated Memory "
                       "answers with every gate multiplied by K (capped at 1), after --switch has decided")
        r.add_argument("--recall", action=argparse.BooleanOptionalAction, default=True, help="with --distill: "
                       "how many of its own self-study questions the adapter answers (asks them all: minutes per document)")
        r.add_argument("--out", required=True, help="output folder (records.jsonl, summary.md, plots)")
        common(r)
        add_options(r, GatedMemoryConfig)

    c = sub.add_parser("cost", help="time and peak memory of ICL and LIFT against input length")
    c.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    c.add_argument("--out", required=True)
    common(c)

    gt = sub.add_parser("gates", help="heatmap of the mean gate per layer and head for two questions")
    gt.add_argument("--doc", required=True)
    gt.add_argument("--question", required=True, help="a question about the document")
    gt.add_argument("--unrelated", default="What is the capital of France?")
    gt.add_argument("--questions", default=None, help="JSONL of questions about the document: their mean gate")
    gt.add_argument("--general", default=None, help="JSONL of unrelated questions: their mean gate")
    gt.add_argument("--texts", nargs="+", default=[], metavar="FILE", help="texts: the mean gate on their windows")
    gt.add_argument("--out", required=True)
    common(gt)
    add_options(gt, GatedMemoryConfig)
    return p


def load_qa_benchmark(args, tok) -> list[dict]:
    """`eval.py qa`: one document and its questions, as a one-document benchmark."""
    from data import read_document
    text = read_document(args.doc)
    # Where no evidence position is given, take the first verbatim occurrence of an answer.
    qs = [{**q, "evidence_pos": q.get("evidence_pos", bm.locate_answer(tok, text, q["answers"]))}
          for q in bm.read_questions(args.qa)]
    doc = {"id": Path(args.doc).stem, "document": text, "questions": qs}
    if args.train_qa_file:
        doc["train_questions"] = bm.read_questions(args.train_qa_file)
        args.train_qa = True
    return [doc]


def main(argv=None) -> int:
    args = parser(argv).parse_args(argv)
    try:
        dtype = resolve_dtype(args.dtype, torch.device("cpu")) if hasattr(args, "dtype") else None
        if args.cmd == "bench":
            from speed import bench
            model, tok = bench(args.model, dtype, args.lengths, args.train_lengths, args.decode_tokens,
                               compile_too=not args.no_compile)
            if args.profile:
                from profiling import write_profiles
                write_profiles(model, tok, args.train_lengths[0], args.lengths[-1], dtype, Path(args.profile), not args.no_compile)
            return 0
        if args.cmd == "generate":
            return generate_cmd(args)
        data_cfg, train_cfg = from_args(DataConfig, args), from_args(TrainConfig, args)
        train_cfg.dtype = dtype
        if args.cmd in ("run", "qa"):
            if args.max_new_tokens < 1 or not args.gate_gain > 0:
                raise UserError("--max-new-tokens must be at least 1" if args.max_new_tokens < 1 else
                                "--gate-gain must be above 0")
            if args.cmd == "run":
                docs = bm.read_benchmark(args.bench)
                if args.docs and (unknown := set(args.docs) - {d["id"] for d in docs}):
                    raise UserError(f"--docs: no document {sorted(unknown)[0]!r} in {args.bench}")
                docs = [d for d in docs if d["id"] in args.docs] if args.docs else docs
            else:
                from checkpoint import load_model
                docs = load_qa_benchmark(args, load_model(args.model)[1])
            general = bm.read_questions(args.general) if args.general else []
            run(docs, Path(args.out), args.modes, args.adapters, args.model, data_cfg, train_cfg,
                args.max_new_tokens, args.train_qa, args.lora_rank, args.init, general, args.gate_trace,
                from_args(GatedMemoryConfig, args), args.switch, args.recall, args.lora_targets, args.gate_gain)
        elif args.cmd == "cost":
            import cost
            cost.cost(args.lengths, Path(args.out), cost.settings_flags(args.model, data_cfg, train_cfg))
        elif args.cmd == "gates":
            from gates import gates
            gates(args.doc, args.question, args.unrelated, Path(args.out), args.model, data_cfg, train_cfg,
                  {"questions": args.questions, "general": args.general}, from_args(GatedMemoryConfig, args), args.texts)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def generate_cmd(args) -> int:
    from checkpoint import load_model
    _, tok = load_model(args.model)
    docs = ([bm.generate_facts_document(tok, L, args.questions, args.seed + k, args.train_questions)
             for k, L in enumerate(args.lengths)] if args.kind == "facts" else
            [bm.generate_needle(tok, L, d, args.seed + k) for k, L in enumerate(args.lengths) for d in args.depths])
    bm.write_benchmark(args.out, docs)
    print(f"wrote {len(docs)} documents to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
