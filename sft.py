"""Pre-LIFT SFT: learn the Gated Memory's *starting point* across many documents (METHOD.md in
this repository, §7; the blog version of arXiv 2502.14644).

    python train.py sft --out runs/sft            (generated corpus; resumable; writes init.safetensors)
    python train.py --doc book.txt --init runs/sft/init.safetensors --ask ...

Per-document LIFT starts from a small random adapter. SFT trains one adapter over a corpus, with
    L_SFT = mean over documents d of ( L_input(d) + γ · L_AT(d) ),
where L_input is the window loss and L_AT the answer loss of d's QA pairs, both built by data.py
exactly as per-document LIFT builds them, so the initialisation learns to store a document *and*
to answer from what it stored. Departure: both terms are means (over windows, over answers), not
the paper's sums, so γ weighs them independently of document length.

The corpus is generated (benchmarks.py: invented facts, each fact a QA pair) or read from a folder
of benchmark JSONL files. A held-out split, written to heldout.jsonl, is never trained on. The
data order depends only on the seed and the epoch, and a checkpoint (adapter + optimizer + step)
is written atomically after every step, so an interrupted run resumes to the same result.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import benchmarks as bm
import gated_memory
from compute import resolve_dtype
from data import DataConfig, DataError, qa_example, truncate_middle, window_examples
from lift import TrainConfig, example_loss
from options import add_options, from_args, option


@dataclass
class SFTConfig:
    docs: int = option(24, "training documents to generate (ignored with --corpus)")
    heldout: int = option(6, "documents kept out of training, for evaluation")
    doc_tokens: int = option(1200, "tokens per generated document")
    questions: int = option(6, "QA pairs per generated document")
    gamma: float = option(1.0, "γ, weight of the answer loss")
    docs_per_step: int = option(2, "documents averaged into one optimizer step")
    epochs: int = option(2, "passes over the training documents")
    seed: int = option(0, "corpus and order seed")

    def __post_init__(self):
        if min(self.docs, self.docs_per_step, self.epochs, self.questions) < 1 or self.heldout < 0:
            raise DataError("--docs, --docs-per-step, --epochs and --questions must be at least 1; "
                            "--heldout cannot be negative")


def make_corpus(tok, cfg: SFTConfig, corpus_dir: str | None) -> tuple[list[dict], list[dict]]:
    """-> (training documents, held-out documents). Generated seeds never overlap between the two."""
    if corpus_dir:
        docs = [d for f in sorted(Path(corpus_dir).glob("*.jsonl")) for d in bm.read_benchmark(str(f))]
        if len(docs) <= cfg.heldout:
            raise DataError(f"{corpus_dir} has {len(docs)} documents; need more than --heldout {cfg.heldout}")
        random.Random(cfg.seed).shuffle(docs)
        return docs[cfg.heldout:], docs[:cfg.heldout]
    make = lambda s: bm.generate_facts_document(tok, cfg.doc_tokens, cfg.questions, seed=s)
    train = [make(cfg.seed * 100_000 + k) for k in range(cfg.docs)]
    heldout = [make(cfg.seed * 100_000 + 50_000 + k) for k in range(cfg.heldout)]
    return train, heldout


def document_examples(tok, doc: dict, data_cfg: DataConfig):
    """The windows and QA examples of one document, as per-document LIFT would build them."""
    ids = tok.encode(doc["document"])
    context = truncate_middle(ids, data_cfg.context, tok)
    qa = [qa_example(tok, q["question"], q["answers"][0], context) for q in doc["questions"]]
    return window_examples(ids, data_cfg), qa


def document_loss_terms(model, windows, qa, train_cfg: TrainConfig, scale: float = 0.0, gamma: float = 1.0):
    """(mean window loss, mean answer loss) of one document. With scale > 0, also accumulates the
    gradient of scale · (window term + γ · answer term), one example at a time (little memory)."""
    terms = []
    for examples, weight in ((windows, 1.0), (qa, gamma)):
        total = 0.0
        for ex in examples:
            loss = example_loss(model, ex, train_cfg)
            if scale:
                (loss * scale * weight / len(examples)).backward()
            total += loss.item()
        terms.append(total / max(1, len(examples)))
    return terms[0], terms[1]


def save_checkpoint(path: Path, model, opt, step: int, cfg: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"adapter": gated_memory.adapter_state_dict(model), "optimizer": opt.state_dict(),
                "step": step, "config": cfg}, tmp)
    os.replace(tmp, path)


def run_sft(model, tok, out: Path, sft_cfg: SFTConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
            corpus_dir: str | None = None, max_steps: int | None = None, progress: bool = True) -> dict:
    """Train the initialisation; resume from out/checkpoint.pt if present. max_steps stops early
    (as an interruption would). Returns stats; writes out/init.safetensors when finished."""
    out.mkdir(parents=True, exist_ok=True)
    train_docs, heldout = make_corpus(tok, sft_cfg, corpus_dir)
    bm.write_benchmark(str(out / "heldout.jsonl"), heldout)
    settings = {"sft": asdict(sft_cfg), "data": asdict(data_cfg), "train": asdict(train_cfg), "corpus": corpus_dir}
    gated_memory.attach(model, gated_memory.GatedMemoryConfig(), seed=train_cfg.seed)
    params = list(gated_memory.trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
                            weight_decay=train_cfg.weight_decay)
    # The whole schedule is fixed up front: epoch e visits the documents in Random(seed + e) order.
    steps = []
    for epoch in range(sft_cfg.epochs):
        order = list(range(len(train_docs)))
        random.Random(sft_cfg.seed + epoch).shuffle(order)
        steps += [(epoch, order[i:i + sft_cfg.docs_per_step]) for i in range(0, len(order), sft_cfg.docs_per_step)]
    ckpt, start = out / "checkpoint.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)      # tensors, numbers, strings: no code runs
        if state["config"] != settings:
            raise DataError(f"{ckpt} was made with other settings; use another --out or delete it")
        with torch.no_grad():
            for n, p in gated_memory.adapter_state_dict(model).items():
                p.copy_(state["adapter"][n])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    examples = {}                                   # document index -> (windows, qa), built once
    log = []
    t0 = time.time()
    model.train()
    bar = tqdm(total=len(steps), initial=start, desc="SFT", disable=not progress)
    for step in range(start, len(steps) if max_steps is None else min(len(steps), max_steps)):
        epoch, batch = steps[step]
        losses = []
        for d in batch:
            if d not in examples:
                examples[d] = document_examples(tok, train_docs[d], data_cfg)
            w, a = document_loss_terms(model, *examples[d], train_cfg, scale=1 / len(batch), gamma=sft_cfg.gamma)
            losses.append(w + sft_cfg.gamma * a)
        torch.nn.utils.clip_grad_norm_(params, train_cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        save_checkpoint(ckpt, model, opt, step + 1, settings)
        log.append({"step": step + 1, "epoch": epoch + 1, "loss": sum(losses) / len(losses)})
        bar.set_postfix(epoch=epoch + 1, loss=f"{log[-1]['loss']:.3f}")
        bar.update()
        if step + 1 == len(steps) or steps[step + 1][0] != epoch:
            ep = [r["loss"] for r in log if r["epoch"] == epoch + 1]
            bar.write(f"epoch {epoch + 1}: mean SFT loss {sum(ep) / max(1, len(ep)):.4f} ({time.time() - t0:.0f}s)")
    bar.close()
    model.eval()
    done = (max_steps is None or max_steps >= len(steps))
    stats = {"steps": len(steps), "documents": len(train_docs), "seconds": time.time() - t0, "log": log}
    if done:
        gated_memory.save(model, str(out / "init.safetensors"), {"sft": settings, "seconds": stats["seconds"]})
    return stats


def cli(argv) -> int:
    """`python train.py sft ...`. Errors propagate to train.py's one-line handler."""
    from checkpoint import load_model
    p = argparse.ArgumentParser(prog="train.py sft", description="Pre-LIFT SFT: train a Gated Memory "
                                "initialisation over many documents (window loss + γ·answer loss); resumable.")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt, heldout.jsonl and init.safetensors")
    p.add_argument("--corpus", default=None, help="folder of benchmark JSONL files (default: generate documents)")
    p.add_argument("--model", default=None, help="base model (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--quiet", action="store_true")
    add_options(p, SFTConfig)
    add_options(p, DataConfig, only=("window", "stride", "context"))
    add_options(p, TrainConfig, only=("lr", "dtype"))
    args = p.parse_args(argv)
    train_cfg = from_args(TrainConfig, args)
    train_cfg.dtype = resolve_dtype(train_cfg.dtype, torch.device("cpu"))
    sft_cfg, data_cfg = from_args(SFTConfig, args), from_args(DataConfig, args)   # bad settings fail before the load
    model, tok = load_model(args.model, dtype=getattr(torch, train_cfg.dtype))
    stats = run_sft(model, tok, Path(args.out), sft_cfg, data_cfg, train_cfg,
                    corpus_dir=args.corpus, max_steps=args.max_steps, progress=not args.quiet)
    print(f"SFT: {stats['documents']} documents, {stats['steps']} steps, {stats['seconds']:.0f}s; "
          f"output in {args.out}", file=sys.stderr)
    return 0
