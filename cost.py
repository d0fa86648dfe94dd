"""Cost against input length: time and peak memory of ICL and of LIFT (arXiv 2502.14644 §4.4).

    python eval.py cost --lengths 1000 2000 4000 8000 --out runs/cost

ICL = prefill of the whole input + a 16-token answer; LIFT = absorb (the given epochs) + a
16-token LIFT+ICL answer. Each point runs in a fresh process (`python cost.py --point ...`) so
that its peak memory is its own; the memory is sampled during the measurement, above the loaded
model. The fits (ICL quadratic, LIFT linear) give the length where LIFT becomes the cheaper one.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import benchmarks as bm
import gated_memory
import lift
from compute import autocast
from data import DataConfig, question_messages
from lift import TrainConfig
from model import generate
from options import add_options, from_args
from speed import RSSSampler


def cost_point(method: str, length: int, model_name, data_cfg: DataConfig, train_cfg: TrainConfig) -> dict:
    """One measurement, meant to run in a fresh process so that its peak memory is its own."""
    from checkpoint import load_model
    model, tok = load_model(model_name, dtype=getattr(torch, train_cfg.dtype))
    doc = bm.generate_facts_document(tok, length, 1, seed=0)
    ids = tok.encode(doc["document"])
    q = doc["questions"][0]["question"]
    from cache import anchor_set      # the anchor's base replies are written once per model, not per document
    anchors = anchor_set(model, tok, train_cfg.dtype, form=train_cfg.anchor_format) if train_cfg.anchor and method == "lift" else None
    gc.collect()
    sampler = RSSSampler().start()                          # the load's own peak is not counted
    t = time.perf_counter()
    if method == "icl":     # the whole input in context: prefill all of it, then answer
        prompt = tok.encode_chat(question_messages(q, doc["document"]))
        with autocast(model.tok_embeddings.weight.device, train_cfg.dtype):
            old = model.cfg.max_seq_len
            model.cfg.max_seq_len = max(old, len(prompt) + 64)   # cost only: positions past the window still compute
            generate(model, prompt, 16)
            model.cfg.max_seq_len = old
    else:
        lift.absorb(model, tok, ids, [], data_cfg=data_cfg, adapter_cfg=gated_memory.GatedMemoryConfig(),
                    train_cfg=train_cfg, progress=False, anchors=anchors)
        lift.answer(model, tok, q, ids, mode="lift+icl", context=data_cfg.context, max_new_tokens=16, dtype=train_cfg.dtype)
    seconds = time.perf_counter() - t
    start_mb, peak_mb = sampler.stop()
    return {"method": method, "tokens": len(ids), "seconds": seconds, "peak_rss_mb": peak_mb,
            "extra_peak_mb": peak_mb - start_mb, "fits_window": len(ids) + 300 <= model.cfg.max_seq_len}


def settings_flags(model: str | None, data_cfg: DataConfig, train_cfg: TrainConfig) -> list[str]:
    """The same settings spelled out as flags, for the child processes."""
    flags = [] if model is None else ["--model", model]
    for k, v in {**asdict(data_cfg), **asdict(train_cfg)}.items():
        if k not in POINT_FLAGS:
            continue
        flags += [f"--{'' if v else 'no-'}{k.replace('_', '-')}"] if isinstance(v, bool) else [f"--{k.replace('_', '-')}", str(v)]
    return flags


POINT_FLAGS = ("window", "stride", "context", "epochs", "lr", "dtype", "seed")


def cost(lengths: list[int], out: Path, argv_common: list[str]) -> None:
    import numpy as np
    import plots       # here, not at the top: each point's fresh process would import matplotlib for nothing
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in ("icl", "lift"):
        for L in lengths:
            cmd = [sys.executable, __file__, "--method", method, "--length", str(L), *argv_common]
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


def point_main(argv=None) -> None:
    """One measurement in this fresh process; prints its JSON record as the last line."""
    p = argparse.ArgumentParser(description="one point of the cost sweep (run by cost())")
    p.add_argument("--method", choices=["icl", "lift"], required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--model", default=None)
    add_options(p, DataConfig, only=POINT_FLAGS)
    add_options(p, TrainConfig, only=POINT_FLAGS)
    args = p.parse_args(argv)
    print(json.dumps(cost_point(args.method, args.length, args.model, from_args(DataConfig, args),
                                from_args(TrainConfig, args))))


if __name__ == "__main__":
    point_main()
