"""What LIFT buys over plain in-context reading, and what it costs (arXiv 2502.14644 §4).

    python eval.py bench                               speed of the base model on this machine
    python eval.py generate --kind facts --lengths 2000 4000 --out b.jsonl   a generated benchmark
    python eval.py run --bench b.jsonl --out runs/x    answer every question in every mode, score, plot
    python eval.py qa --doc D --qa Q.jsonl --out runs/y    the same for one document and its questions
    python eval.py cost --lengths 1000 2000 4000 --out runs/cost    time and memory against input length
    python eval.py gates --doc D --question Q --out runs/g    mean gate per layer and head, as a heatmap

Modes, all on the same questions: closed (base model, no document), icl (base model, document
truncated to the budget), lift (adapter, no document), lift+icl (adapter + truncated document;
what the paper reports) and full (base model, whole document, when it fits the model's window).
Adapters: gated_memory (the paper's) and lora (the ablation's baseline), trained by the same loop.
Scores: "answer contained", exact match and token F1 (SQuAD normalisation), not the paper's GPT-4
judge. A run writes records.jsonl (one line per question, mode and adapter; an interrupted run
resumes where it stopped), summary.md, and PNG plots (plots.py). Benchmark data and metrics: benchmarks.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import benchmarks as bm
import plots
from data import DataConfig
from train import TrainConfig, add_dataclass_args, autocast

ADAPTER_NAMES = ("gated_memory", "lora")


def adapter_config(name: str, lora_rank: int):
    from gated_memory import GatedMemoryConfig
    from lora import LoRAConfig
    return GatedMemoryConfig() if name == "gated_memory" else LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank)


# ----------------------------------------------------------------------------- bench
def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n×n×n matrix product in dtype, on this machine now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def bench(model_name: str | None, dtype: str, lengths: list[int], decode_tokens: int) -> None:
    from checkpoint import load_model
    from model import generate
    torch.manual_seed(0)
    t = time.perf_counter()
    model, tok = load_model(model_name, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t
    dev, c = torch.device("cpu"), model.cfg
    rate_bf16, rate_fp32 = matmul_rate(torch.bfloat16), matmul_rate(torch.float32, reps=3)
    peak = rate_bf16 if dtype == "bfloat16" else rate_fp32
    print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__}; matmul 2048^3: "
          f"bf16 {rate_bf16 / 1e9:.0f} GFLOP/s, fp32 {rate_fp32 / 1e9:.0f} GFLOP/s")
    print(f"model: {model.name}, weights {dtype}, loaded in {load_s:.1f}s")
    # 2 FLOPs per weight per token (embedding lookup excluded, output head included), plus causal
    # attention: 2·T·T·D·H per layer for QKᵀ and PV together (half of the full T×T).
    per_token = 2 * sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    per_token += 2 * model.tok_embeddings.weight.numel()
    print("| what | tokens/s | model FLOPs utilisation |\n|---|---:|---:|")
    for T in lengths:
        ids = torch.randint(100, c.vocab_size, (1, T))
        with torch.no_grad(), autocast(dev, dtype):
            model(ids[:, :64])                                               # warm-up
            t = time.perf_counter()
            model(ids)                                                       # all T logits, as in training
            s = time.perf_counter() - t
        flops = T * per_token + 2 * T * T * c.head_dim * c.n_heads * c.n_layers
        print(f"| prefill {T} | {T / s:,.0f} | {100 * flops / s / peak:.0f}% of the {dtype} matmul rate |")
    with autocast(dev, dtype):
        t = time.perf_counter()
        out = generate(model, torch.randint(100, c.vocab_size, (64,)).tolist(), decode_tokens)
        s = time.perf_counter() - t
    print(f"| decode {len(out)} tokens after 64 | {len(out) / s:,.0f} | |")


# ----------------------------------------------------------------------------- run a benchmark
def in_budget(pos: float | None, n_tokens: int, context: int) -> bool | None:
    """Is evidence at fraction `pos` of the document inside the truncated (head + tail) view?"""
    if pos is None:
        return None
    t = pos * n_tokens
    return n_tokens <= context or t < context // 2 or t >= n_tokens - (context - context // 2)


def run(docs: list[dict], out: Path, modes: list[str], adapters: list[str], model_name, data_cfg: DataConfig,
        train_cfg: TrainConfig, max_new_tokens: int, train_qa: bool, lora_rank: int, init: str | None = None) -> list[dict]:
    """Every (document, question, mode, adapter); records appended as they come, so a rerun resumes.
    init: start Gated Memory from this SFT initialisation; its records say "gated_memory+sft"."""
    import lift
    from checkpoint import load_model
    from tqdm import tqdm
    out.mkdir(parents=True, exist_ok=True)
    rec_path = out / "records.jsonl"
    records = [json.loads(l) for l in rec_path.open()] if rec_path.exists() else []
    done = {(r["doc"], r["q"], r["mode"], r["adapter"]) for r in records}
    model, tok = load_model(model_name, dtype=getattr(torch, train_cfg.dtype))
    todo = [(d, a) for d in docs for a in (adapters if any(m not in lift.BASE_MODES for m in modes) else ["none"])]
    for doc, adapter_kind in tqdm(todo, desc="documents", disable=len(todo) < 2):
        adapter = adapter_kind + ("+sft" if init and adapter_kind == "gated_memory" else "")
        ids = tok.encode(doc["document"])
        wanted = [(i, m) for i, _ in enumerate(doc["questions"]) for m in modes
                  if (doc["id"], i, m, adapter if m not in lift.BASE_MODES else "none") not in done]
        if not wanted:
            continue
        absorb_s = None
        if any(m not in lift.BASE_MODES for _, m in wanted):
            qa_file = None
            if train_qa and doc.get("train_questions"):
                qa_file = out / f"train_qa_{abs(hash(doc['id'])) % 10**8}.jsonl"
                qa_file.write_text("".join(json.dumps({"question": q["question"], "answer": q["answers"][0]}) + "\n"
                                           for q in doc["train_questions"]))
            t = time.perf_counter()
            res = lift.absorb(model, tok, doc["document"], data_cfg=data_cfg, train_cfg=train_cfg,
                              adapter_cfg=adapter_config(adapter_kind, lora_rank), qa_path=str(qa_file) if qa_file else None,
                              init_path=init if adapter_kind == "gated_memory" else None)
            absorb_s = time.perf_counter() - t
            # How well the model knows the document's text before and after LIFT (mean window loss).
            with lift.attached(model).disabled(model):
                before = lift.document_loss(model, ids, data_cfg, train_cfg.dtype)
            after = lift.document_loss(model, ids, data_cfg, train_cfg.dtype)
            with (out / "absorb.jsonl").open("a") as f:
                f.write(json.dumps({"doc": doc["id"], "adapter": adapter, "doc_tokens": len(ids), "trained_now": res.trained,
                                    "absorb_seconds": absorb_s, "doc_loss_before": before, "doc_loss_after": after,
                                    **res.stats}) + "\n")
        with rec_path.open("a") as f:
            for i, mode in tqdm(wanted, desc=f"{doc['id']} {adapter}", leave=False):
                q = doc["questions"][i]
                if mode == "full" and (len(lift.answer_prompt(tok, q["question"], ids, mode, data_cfg.context))
                                       + max_new_tokens > model.cfg.max_seq_len):
                    continue        # the upper bound exists only where the whole document fits
                t = time.perf_counter()
                pred = lift.answer(model, tok, q["question"], ids, mode=mode, context=data_cfg.context,
                                   max_new_tokens=max_new_tokens, dtype=train_cfg.dtype)
                r = {"doc": doc["id"], "q": i, "mode": mode, "adapter": adapter if mode not in lift.BASE_MODES else "none",
                     "question": q["question"], "answers": q["answers"], "prediction": pred, **bm.score(pred, q["answers"]),
                     "evidence_pos": q.get("evidence_pos"), "depth": q.get("depth"), "doc_tokens": len(ids),
                     "in_budget": in_budget(q.get("evidence_pos"), len(ids), data_cfg.context),
                     "seconds": time.perf_counter() - t, "absorb_seconds": absorb_s}
                f.write(json.dumps(r) + "\n")
                f.flush()
                records.append(r)
                done.add((r["doc"], r["q"], r["mode"], r["adapter"]))
    settings = {"data": asdict(data_cfg), "train": asdict(train_cfg), "model": model.name, "train_qa": train_qa,
                "init": init}
    write_summary(records, out, settings)
    return records


def label(r: dict) -> str:
    return r["mode"] if r["adapter"] == "none" else f"{r['mode']} ({r['adapter']})"


def write_summary(records: list[dict], out: Path, settings: dict) -> str:
    """summary.md (a table by mode, and by evidence inside/outside the ICL budget) and the plots."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(label(r), []).append(r)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs) if rs else float("nan")
    lines = [f"Settings: `{json.dumps(settings)}`", "",
             "| mode (adapter) | n | contained | exact match | token F1 | contained, evidence outside budget | contained, evidence inside |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in groups.items():
        outside = [r for r in rs if r.get("in_budget") is False]
        inside = [r for r in rs if r.get("in_budget") is True]
        lines.append(f"| {name} | {len(rs)} | {mean(rs, 'contains'):.2f} | {mean(rs, 'em'):.2f} | {mean(rs, 'f1'):.2f} | "
                     f"{mean(outside, 'contains'):.2f} ({len(outside)}) | {mean(inside, 'contains'):.2f} ({len(inside)}) |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    plots.plot_results(groups, out)
    return text


# ----------------------------------------------------------------------------- cost against length
def cost_point(method: str, length: int, model_name, data_cfg: DataConfig, train_cfg: TrainConfig) -> dict:
    """One measurement, meant to run in a fresh process so that its peak memory is its own."""
    import gated_memory
    import lift
    from checkpoint import load_model
    model, tok = load_model(model_name, dtype=getattr(torch, train_cfg.dtype))
    doc = bm.generate_facts_document(tok, length, 1, seed=0)
    ids = tok.encode(doc["document"])
    q = doc["questions"][0]["question"]
    gc.collect()
    sampler = RSSSampler().start()                          # the load's own peak is not counted
    t = time.perf_counter()
    if method == "icl":     # the whole input in context: prefill all of it, then answer
        prompt = tok.encode_chat(lift.question_messages(q, doc["document"]))
        from model import generate
        with autocast(model.tok_embeddings.weight.device, train_cfg.dtype):
            old = model.cfg.max_seq_len
            model.cfg.max_seq_len = max(old, len(prompt) + 64)   # cost only: positions past the window still compute
            generate(model, prompt, 16)
            model.cfg.max_seq_len = old
    else:
        lift.absorb(model, tok, doc["document"], data_cfg=data_cfg, adapter_cfg=gated_memory.GatedMemoryConfig(),
                    train_cfg=train_cfg, use_cache=False, progress=False)
        lift.answer(model, tok, q, ids, mode="lift+icl", context=data_cfg.context, max_new_tokens=16, dtype=train_cfg.dtype)
    seconds = time.perf_counter() - t
    start_mb, peak_mb = sampler.stop()
    return {"method": method, "tokens": len(ids), "seconds": seconds, "peak_rss_mb": peak_mb,
            "extra_peak_mb": peak_mb - start_mb, "fits_window": len(ids) + 300 <= model.cfg.max_seq_len}


class RSSSampler:
    """Resident memory of this process, sampled every 5 ms in a thread: (at start, peak) in MB.
    (ru_maxrss would include the model load's own peak, higher than anything measured after it.)"""

    def _rss_mb(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def start(self) -> "RSSSampler":
        import threading
        self.first = self.peak = self._rss_mb()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self._rss_mb())
            time.sleep(0.005)

    def stop(self) -> tuple[float, float]:
        self.running = False
        self.thread.join()
        return self.first, max(self.peak, self._rss_mb())


def cost(lengths: list[int], out: Path, argv_common: list[str]) -> None:
    import numpy as np
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in ("icl", "lift"):
        for L in lengths:
            cmd = [sys.executable, __file__, "cost-point", "--method", method, "--length", str(L), *argv_common]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{method} at {L} tokens failed: {p.stderr.strip().splitlines()[-1:]}")
                rows.append({"method": method, "tokens": L, "failed": True})
                continue
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
    (out / "cost.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok = {m: [r for r in rows if r["method"] == m and not r.get("failed")] for m in ("icl", "lift")}
    if min(len(v) for v in ok.values()) < 3:
        raise SystemExit("cost: fewer than three successful measurements per method; nothing to fit")
    fits = {}
    for m, rs in ok.items():
        x, y = np.array([r["tokens"] for r in rs], float), np.array([r["seconds"] for r in rs])
        fits[m] = {"linear": np.polyfit(x, y, 1).tolist(), "quadratic": np.polyfit(x, y, 2).tolist() if len(x) > 2 else None}
    # crossover: where the quadratic ICL fit passes the linear LIFT fit
    a, b, c = np.array(fits["icl"]["quadratic"]) - np.array([0, *fits["lift"]["linear"]])
    roots = sorted(r.real for r in np.roots([a, b, c]) if abs(r.imag) < 1e-9 and r.real > 0)
    cross = roots[-1] if roots else None
    measured_max = max(r["tokens"] for r in rows)
    where = ("none found" if cross is None else
             f"{cross:,.0f} tokens ({'measured range' if cross <= measured_max else 'extrapolated beyond the measured range'})")
    lines = ["| tokens | ICL seconds | ICL extra peak MB | LIFT seconds | LIFT extra peak MB |", "|---:|---:|---:|---:|---:|"]
    for L in lengths:
        i = next((r for r in ok["icl"] if abs(r["tokens"] - L) < 0.2 * L), None)
        l = next((r for r in ok["lift"] if abs(r["tokens"] - L) < 0.2 * L), None)
        fmt = lambda r, k: f"{r[k]:.1f}" if r else "failed"
        lines.append(f"| {i['tokens'] if i else L} {'' if (i and i['fits_window']) else '(past window)'} | {fmt(i, 'seconds')} | "
                     f"{fmt(i, 'extra_peak_mb')} | {fmt(l, 'seconds')} | {fmt(l, 'extra_peak_mb')} |")
    fq, fl = fits["icl"]["quadratic"], fits["lift"]["linear"]
    lines += ["", f"ICL fit: t = {fq[0]:.3g}·L² + {fq[1]:.3g}·L + {fq[2]:.3g} s; LIFT fit: t = {fl[0]:.3g}·L + {fl[1]:.3g} s",
              f"crossover (LIFT faster than ICL beyond): {where}"]
    text = "\n".join(lines) + "\n"
    (out / "cost.md").write_text(text)
    print(text)
    plots.plot_cost(ok, fits, cross, measured_max, out)


# ----------------------------------------------------------------------------- gates
def gates(doc_path: str, question: str, unrelated: str, out: Path, model_name, data_cfg, train_cfg) -> None:
    """Mean gate g per layer and head, for a question about the document and an unrelated one."""
    import gated_memory
    import lift
    from checkpoint import load_model
    model, tok = load_model(model_name, dtype=getattr(torch, train_cfg.dtype))
    text = lift.read_document(doc_path)
    lift.absorb(model, tok, text, data_cfg=data_cfg, adapter_cfg=gated_memory.GatedMemoryConfig(), train_cfg=train_cfg)
    maps = {}
    for name, q in (("about the document", question), ("unrelated", unrelated)):
        # The LIFT-mode prompt (no document); gates are averaged over the question's own tokens,
        # not over the chat template around it, which is the same for both questions.
        text = tok.render_chat(lift.question_messages(q, None))
        start = text.index(q)
        first, last = len(tok.encode(text[:start])), len(tok.encode(text[:start + len(q)]))
        for a in gated_memory.adapters(model):
            a.record_gates = True
        with torch.no_grad(), autocast(model.tok_embeddings.weight.device, train_cfg.dtype):
            model(torch.tensor([tok.encode(text)]))
        maps[name] = torch.stack([a.last_gates[first:last].mean(0) for a in gated_memory.adapters(model)])  # (layers, H)
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_gates(maps, out)
    summary = {k: round(v.mean().item(), 4) for k, v in maps.items()}
    (out / "gates.json").write_text(json.dumps({"question": question, "unrelated": unrelated, "mean_gate": summary,
                                                "per_layer": {k: v.mean(1).tolist() for k, v in maps.items()}}))
    print(json.dumps(summary))


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s, train=True):
        s.add_argument("--model", default=None, help="model (default: built-in SmolLM2-135M-Instruct)")
        add_dataclass_args(s, DataConfig, {"window": "window ℓ", "stride": "stride s (0 = 3ℓ/8)",
                                           "context": "context budget (document tokens in the prompt)",
                                           "contextualized": "contextualized training (CT)",
                                           "qa_start_epoch": "epochs before QA pairs join"})
        add_dataclass_args(s, TrainConfig, {"epochs": "epochs", "lr": "learning rate", "step_every": "example or epoch",
                                            "dtype": "bfloat16 or float32", "seed": "seed"})

    b = sub.add_parser("bench", help="load time, prefill and decode speed, matmul rates of this machine")
    b.add_argument("--model", default=None)
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    b.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="prefill lengths")
    b.add_argument("--decode-tokens", type=int, default=64)

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
        else:
            r.add_argument("--doc", required=True)
            r.add_argument("--qa", required=True, help="questions: JSONL with question and answer")
            r.add_argument("--train-qa-file", default=None, help="QA pairs to train on (AT), JSONL; implies --train-qa")
        r.add_argument("--modes", nargs="+", default=["icl", "lift", "lift+icl"], help="closed icl lift lift+icl full")
        r.add_argument("--adapters", nargs="+", default=["gated_memory"], choices=ADAPTER_NAMES)
        r.add_argument("--lora-rank", type=int, default=16)
        r.add_argument("--init", default=None, help="start Gated Memory from this SFT initialisation (train.py sft)")
        r.add_argument("--train-qa", action="store_true", help="train on the documents' train_questions (AT)")
        r.add_argument("--max-new-tokens", type=int, default=48)
        r.add_argument("--out", required=True, help="output folder (records.jsonl, summary.md, plots)")
        common(r)

    c = sub.add_parser("cost", help="time and peak memory of ICL and LIFT against input length")
    c.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    c.add_argument("--out", required=True)
    common(c)
    cp = sub.add_parser("cost-point", help=argparse.SUPPRESS)
    cp.add_argument("--method", choices=["icl", "lift"], required=True)
    cp.add_argument("--length", type=int, required=True)
    common(cp)

    gt = sub.add_parser("gates", help="heatmap of the mean gate per layer and head for two questions")
    gt.add_argument("--doc", required=True)
    gt.add_argument("--question", required=True, help="a question about the document")
    gt.add_argument("--unrelated", default="What is the capital of France?")
    gt.add_argument("--out", required=True)
    common(gt)

    args = p.parse_args(argv)
    pick = lambda cls: cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__ if hasattr(args, f)})
    if args.cmd == "bench":
        bench(args.model, args.dtype, args.lengths, args.decode_tokens)
    elif args.cmd == "generate":
        from checkpoint import load_model
        _, tok = load_model(args.model)
        if args.kind == "facts":
            docs = [bm.generate_facts_document(tok, L, args.questions, args.seed + k, args.train_questions)
                    for k, L in enumerate(args.lengths)]
        else:
            docs = [bm.generate_needle(tok, L, d, args.seed + k) for k, L in enumerate(args.lengths) for d in args.depths]
        bm.write_benchmark(args.out, docs)
        print(f"wrote {len(docs)} documents to {args.out}")
    elif args.cmd in ("run", "qa"):
        if args.cmd == "run":
            docs = bm.read_benchmark(args.bench)
        else:
            import lift
            from checkpoint import load_model
            text = lift.read_document(args.doc)
            _, tok = load_model(args.model)
            # Where no evidence position is given, take the first verbatim occurrence of an answer.
            qs = [{"question": q["question"], "answers": q["answers"],
                   "evidence_pos": q.get("evidence_pos", bm.locate_answer(tok, text, q["answers"]))}
                  for q in bm.read_questions(args.qa)]
            docs = [{"id": Path(args.doc).stem, "document": text, "questions": qs}]
            if args.train_qa_file:
                docs[0]["train_questions"] = bm.read_questions(args.train_qa_file)
                args.train_qa = True
        run(docs, Path(args.out), args.modes, args.adapters, args.model, pick(DataConfig), pick(TrainConfig),
            args.max_new_tokens, args.train_qa, args.lora_rank, args.init)
    elif args.cmd == "cost":
        # the child processes get the same settings, spelled out as flags
        flags = [] if args.model is None else ["--model", args.model]
        for cfg in (pick(DataConfig), pick(TrainConfig)):
            for k, v in asdict(cfg).items():
                if not hasattr(args, k):
                    continue                          # a field this command has no flag for
                if isinstance(v, bool):
                    flags.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
                else:
                    flags += [f"--{k.replace('_', '-')}", str(v)]
        cost(args.lengths, Path(args.out), flags)
    elif args.cmd == "cost-point":
        print(json.dumps(cost_point(args.method, args.length, args.model, pick(DataConfig), pick(TrainConfig))))
    elif args.cmd == "gates":
        gates(args.doc, args.question, args.unrelated, Path(args.out), args.model, pick(DataConfig), pick(TrainConfig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
