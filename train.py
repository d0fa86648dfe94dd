"""The command users type: LIFT on a long document, then answers about it (arXiv 2502.14644).

    python train.py --doc book.txt --ask "Who found the second key?"    absorb (or load from the cache), answer
    python train.py --doc book.txt                                      interactive: question after question
    python train.py sft --out runs/sft                                  pre-LIFT SFT of the initialisation (sft.py)

This file is only the command line. What it runs, the method top to bottom (windows -> fresh
adapter -> the per-document AdamW loop -> answer), is lift.py; cache.py stores adapters so that
asking again about the same document loads the adapter instead of training. Modes: lift+icl
(adapter + truncated document, the default and what the paper reports), lift (adapter only), icl
(base model + truncated document). Every error a user can cause is one line and exit status 2.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from adapters import adapter_config
from cache import absorb_cached
from compute import resolve_dtype
from data import DataConfig, read_document, read_qa_jsonl
from distill import RECIPE_HELP, RECIPES
from gated_memory import GatedMemoryConfig
from lift import TrainConfig, answer, checked_prompt
from options import UserError, add_options, from_args, recipe_defaults
from study import route as route_question, show_study
from switch import load_thresholds, save_thresholds, switch_decision


def parser(argv=None) -> argparse.ArgumentParser:
    """The flags; argv only to read --recipe, whose settings become the defaults."""
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="LIFT: absorb a long document into a Gated Memory adapter, then answer questions about it.\n"
                    "Also: `python train.py sft --help` for pre-LIFT SFT of the adapter's initialisation.",
        epilog="Example: python train.py --doc examples/orchard_chronicle.txt --ask 'Who founded Halvard Mill?'")
    p.add_argument("--doc", required=True, help="the long document (UTF-8 text file)")
    p.add_argument("--ask", action="append", default=[], help="a question (repeatable); without it, an interactive prompt")
    p.add_argument("--model", default=None, help="a .gguf file, a Hugging Face directory or hub id "
                                                 "(default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--mode", choices=["lift+icl", "lift", "icl"], default="lift+icl",
                   help="lift+icl: adapter + truncated document (default); lift: adapter only; "
                        "icl: base model + truncated document")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None, help=RECIPE_HELP)
    add_options(p, DataConfig)
    add_options(p, TrainConfig)
    add_options(p, GatedMemoryConfig, only=("head_lora",))
    p.add_argument("--qa", default=None, help="auxiliary QA pairs: JSONL with {\"question\", \"answer\"} per line")
    p.add_argument("--synth-qa", type=int, default=0, help="let the model write N QA pairs from the document "
                                                           "(kept only if their evidence is verbatim in it)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA of this rank on every linear layer instead of Gated Memory (the paper's "
                        "ablation baseline; with --distill it is what answered facts outside the budget "
                        "at this scale: results/NOTEBOOK.md, \"Each adapter at its best learning rate\"). 0: Gated Memory")
    p.add_argument("--adapter", default=None, help="adapter file: loaded if it exists (and was trained on this "
                                                   "document with these settings), else trained and saved there; "
                                                   "the switch keeps its thresholds beside it (NAME.switch.json)")
    p.add_argument("--init", default=None, help="start LIFT from this initialisation (made by `train.py sft`)")
    p.add_argument("--no-cache", action="store_true", help="always train; do not read or write the adapter cache")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: all cores). Give each of two "
                                                         "jobs on one machine half the cores, or both crawl")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    p.add_argument("--switch", action=argparse.BooleanOptionalAction, default=True,
                   help="Gated Memory answers only the questions that open its gate more than any unrelated prompt of "
                        "the anchor; the base model answers the rest, exactly as without LIFT (our extension, switch.py; "
                        "--no-switch: the paper's answering, always with the adapter)")
    p.add_argument("--route", action="store_true",
                   help="with --distill: a question holding one of the study's rare keys (its names, or with --study "
                        "keys, phrases or clauses its words) is asked as the study asked it, the adapter answering whatever "
                        "the switch says (our extension, study.route; results/NOTEBOOK.md, \"Routing a question to "
                        "its key\")")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--show-study", action="store_true", help="print the self-study questions and replies that "
                   "--distill N (or --recipe study) would train on, and stop: no model, no training")
    p.set_defaults(**recipe_defaults(argv, RECIPES))           # last: it sets the defaults of every flag above
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device (use --device cpu)")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose cpu, cuda or auto")
    return torch.device(name)


def main(doc: str, ask: list[str], model: str | None, mode: str, data_cfg: DataConfig, train_cfg: TrainConfig,
         qa: str | None, synth_qa: int, adapter: str | None, no_cache: bool, device: str, threads: int,
         max_new_tokens: int, quiet: bool, init: str | None = None, lora_rank: int = 0, head_lora: int = 0,
         switch: bool = True, route: bool = False) -> int:
    from checkpoint import load_model
    if max_new_tokens < 1 or synth_qa < 0 or threads < 0 or lora_rank < 0:
        raise UserError("--max-new-tokens must be at least 1; --synth-qa, --threads and --lora-rank cannot be negative")
    if lora_rank and init:
        raise UserError("--init starts a Gated Memory (made by `train.py sft`); it cannot start a LoRA adapter")
    if head_lora < 0 or (head_lora and lora_rank):
        raise UserError(f"--head-lora {head_lora}: a non-negative rank, and part of Gated Memory (not with --lora-rank)")
    if head_lora and init:
        raise UserError("--head-lora: `train.py sft` makes a Gated Memory without the head LoRA; --init cannot start one")
    if route and (not data_cfg.distill or mode == "icl"):
        raise UserError("--route asks the self-study questions of the adapter: give --distill N (or --recipe study), "
                        "and a mode with the adapter")
    if any(not q.strip() for q in ask):
        raise UserError("empty question")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    train_cfg.dtype = resolve_dtype(train_cfg.dtype, dev)        # part of the cache key: resolve first
    text = read_document(doc)
    pairs = read_qa_jsonl(qa) if qa else []
    t0 = time.time()
    base, tok = load_model(model, device=dev, dtype=getattr(torch, train_cfg.dtype))
    print(f"loaded {base.name} in {time.time() - t0:.1f}s on {dev} ({train_cfg.dtype})", file=sys.stderr)
    doc_ids = tok.encode(text)
    for q in ask:                                                # before training, not after
        checked_prompt(base, tok, q, doc_ids, mode, data_cfg.context, max_new_tokens)
    adapter_cfg = adapter_config("lora" if lora_rank else "gated_memory", lora_rank, GatedMemoryConfig(head_lora=head_lora))
    adapter_file = None
    if mode != "icl":
        result = absorb_cached(base, tok, text, data_cfg=data_cfg, adapter_cfg=adapter_cfg,
                               train_cfg=train_cfg, qa=pairs, synth=synth_qa, adapter_path=adapter,
                               use_cache=not no_cache, init=init, progress=not quiet)
        state["saved"] = adapter_file = result.path
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
        print(f"{result.summary()}; peak memory (RSS) {peak_gb:.2f} GB", file=sys.stderr)
        if switch and adapter_file:
            load_thresholds(base, adapter_file)                  # an earlier process's, for this adapter

    def respond(q: str):
        routed = route_question(q, tok.decode(doc_ids), data_cfg) if route else None   # the study's address for q
        print(f"Q: {q}\n" + (f"(asked as the study asked it: {routed})\n" if routed else "") + "A: ", end="", flush=True)
        answer(base, tok, routed or q, doc_ids, mode=mode, context=data_cfg.context, max_new_tokens=max_new_tokens,
               dtype=train_cfg.dtype, switch=switch and not routed, stream=lambda s: print(s, end="", flush=True))
        print()
        if switch and adapter_file:
            save_thresholds(base, adapter_file)                  # the next process skips the 48 passes
        if switch and mode != "icl" and not routed and (decided := switch_decision(base)):
            print(f"(switch: the question's mean gate {decided['gate']:.4f} "
                  + ("> " if decided["adapter_used"] else "≤ ")
                  + f"{decided['threshold']:.4f}, the most open unrelated prompt's: "
                  + ("the adapter answered)" if decided["adapter_used"] else "the base model answered)"), file=sys.stderr)

    for q in ask:
        respond(q)
    if not ask:
        print("Ask about the document (empty line or Ctrl-D to quit).", file=sys.stderr)
        while (q := _read_line()):
            respond(q)
    return 0


def _read_line() -> str:
    try:
        return input("> ").strip()
    except EOFError:
        return ""


state = {"saved": None}     # where the adapter went, for the message of an interruption


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["sft"]:
            from sft import cli as sft_cli
            return sft_cli(argv[1:])
        args = parser(argv).parse_args(argv)
        if args.show_study:
            if not args.distill:
                raise UserError("--show-study shows --distill's questions: give --distill N or --recipe study")
            print(show_study(read_document(args.doc), from_args(DataConfig, args)))
            return 0
        return main(doc=args.doc, ask=args.ask, model=args.model, mode=args.mode, data_cfg=from_args(DataConfig, args),
                    train_cfg=from_args(TrainConfig, args), qa=args.qa, synth_qa=args.synth_qa, adapter=args.adapter,
                    no_cache=args.no_cache, device=args.device, threads=args.threads,
                    max_new_tokens=args.max_new_tokens, quiet=args.quiet, init=args.init,
                    lora_rank=args.lora_rank, head_lora=args.head_lora, switch=args.switch, route=args.route)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (f"the adapter was saved to {state['saved']}" if state["saved"] else
                 "the same command goes on from the last finished epoch (nothing is kept with --no-cache)")
        print(f"\ninterrupted; {where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
