"""LIFT, the method (arXiv 2502.14644): absorb a long document into a Gated Memory adapter, then
answer questions about it.

    absorb(model, tok, text, ...)   tokenize -> windows (+ QA) -> fresh adapter -> train -> cache
    answer(model, tok, question, doc_ids, mode=...)   icl | lift | lift+icl (§3, "LIFT+ICL")

Adapters are cached on disk, keyed by the document's hash, the base model's fingerprint and every
setting that changes training, so asking again about the same document loads the adapter instead
of training. The cache lives in $LIFT_CACHE, or ~/.cache/lift.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import gated_memory
import lora
from data import DataConfig, build_epochs, question_messages, read_qa_jsonl, sentences, truncate_middle, window_spans
from checkpoint import fingerprint
from model import generate
from train import TrainConfig, autocast, example_loss, train_adapter


# The two adapters LIFT can train: the paper's Gated Memory and a LoRA baseline (same interface).
ADAPTERS = {gated_memory.GatedMemoryConfig: gated_memory, lora.LoRAConfig: lora}
FORMATS = {gated_memory.FORMAT: gated_memory, lora.FORMAT: lora}


def attached(model):
    """The adapter module (gated_memory or lora) attached to model, or None."""
    return next((m for m in ADAPTERS.values() if m.adapters(model)), None)


def detach_all(model):
    for m in ADAPTERS.values():
        m.remove(model)


def load_adapter(model, path: str) -> dict:
    """Load an adapter file of either kind; its own header says which."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as e:
        raise LiftError(f"cannot read adapter {path}: {e}") from None
    if fmt not in FORMATS:
        raise LiftError(f"{path} is not an adapter saved by this project")
    detach_all(model)
    return FORMATS[fmt].load(model, path)


class LiftError(RuntimeError):
    """A user-facing problem with a LIFT run (bad document, bad question, settings too large)."""


def read_document(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise LiftError(f"{path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LiftError(f"{path} is not UTF-8 text (byte {e.start}); convert it first, e.g. with iconv") from None
    if not text.strip():
        raise LiftError(f"{path} is empty")
    return text


def cache_dir() -> Path:
    return Path(os.environ.get("LIFT_CACHE", Path.home() / ".cache" / "lift"))


@dataclass
class AbsorbResult:
    path: Optional[str]           # where the adapter is (None with --no-cache and no --adapter)
    trained: bool                 # False when it came from the cache or --adapter
    stats: dict = field(default_factory=dict)
    qa: list = field(default_factory=list)

    def summary(self) -> str:
        if not self.trained:
            return f"adapter loaded from {self.path} (no training)"
        s = self.stats
        return (f"LIFT: {s['tokens']} tokens trained in {s['seconds']:.1f}s ({s['tokens_per_s']:.0f} tokens/s), "
                f"{s['trainable_params']:,} trainable parameters, final epoch loss {s['epoch_losses'][-1]:.3f}; "
                f"adapter: {self.path or 'not saved (--no-cache)'}")


def cache_key(doc_ids: list[int], base_fp: str, data_cfg: DataConfig, adapter_cfg, train_cfg: TrainConfig,
              qa: list[dict], synth_qa: int, init_hash: Optional[str] = None) -> str:
    """Everything that changes the trained adapter, hashed."""
    blob = json.dumps({"doc": hashlib.sha256(json.dumps(doc_ids).encode()).hexdigest(), "base": base_fp,
                       "data": asdict(data_cfg), "adapter": [type(adapter_cfg).__name__, asdict(adapter_cfg)],
                       "train": asdict(train_cfg),
                       "qa": qa, "synth_qa": synth_qa, "init": init_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def check_fits(model, data_cfg: DataConfig):
    if data_cfg.window > model.cfg.max_seq_len:
        raise LiftError(f"window {data_cfg.window} is larger than the model's context ({model.cfg.max_seq_len} tokens)")
    if data_cfg.context + 256 > model.cfg.max_seq_len:
        raise LiftError(f"context budget {data_cfg.context} leaves no room for the question and answer "
                        f"in the model's {model.cfg.max_seq_len}-token window")


def absorb(model, tok, text: str, *, data_cfg: DataConfig, adapter_cfg, train_cfg: TrainConfig,
           qa_path: Optional[str] = None, synth_qa: int = 0, adapter_path: Optional[str] = None,
           use_cache: bool = True, progress: bool = True, init_path: Optional[str] = None) -> AbsorbResult:
    """Leave `model` with an adapter holding `text`: loaded from adapter_path or the cache when
    possible, otherwise trained from a fresh initialisation and then saved. adapter_cfg is a
    GatedMemoryConfig (the paper's adapter) or a LoRAConfig (the baseline). init_path: start from a
    pre-LIFT SFT initialisation (sft.py) instead of a fresh random adapter."""
    kind = ADAPTERS[type(adapter_cfg)]
    check_fits(model, data_cfg)
    doc = tok.encode(text)
    if not doc:
        raise LiftError("the document has no tokens")
    window_spans(len(doc), data_cfg.window, data_cfg.step)   # validates window/stride early
    if init_path and not Path(init_path).is_file():
        raise LiftError(f"--init {init_path}: no such file")
    if adapter_path and Path(adapter_path).exists():
        extra = load_adapter(model, adapter_path)
        return AbsorbResult(adapter_path, False, extra.get("stats", {}), extra.get("qa", []))
    qa = read_qa_jsonl(qa_path) if qa_path else []
    base_fp = fingerprint(model)
    init_hash = hashlib.sha256(Path(init_path).read_bytes()).hexdigest() if init_path else None
    key = cache_key(doc, base_fp, data_cfg, adapter_cfg, train_cfg, qa, synth_qa, init_hash)
    cached = cache_dir() / f"{key}.safetensors"
    if use_cache and cached.exists():
        extra = load_adapter(model, str(cached))
        if adapter_path:
            kind.save(model, adapter_path, extra)
        return AbsorbResult(str(cached), False, extra.get("stats", {}), extra.get("qa", []))

    detach_all(model)
    if synth_qa:
        qa = qa + synthesize_qa(model, tok, text, synth_qa, seed=train_cfg.seed, dtype=train_cfg.dtype, progress=progress)
    plan = build_epochs(doc, qa, train_cfg.epochs, data_cfg, tok, seed=train_cfg.seed)
    if init_path:
        from sft import load_init
        load_init(model, init_path, adapter_cfg)
    else:
        kind.attach(model, adapter_cfg, seed=train_cfg.seed)
    stats = train_adapter(model, plan, train_cfg, progress=progress)
    stats["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = {"stats": stats, "qa": qa, "doc_tokens": len(doc)}
    path = None
    if adapter_path:
        kind.save(model, adapter_path, extra)
        path = adapter_path
    if use_cache:
        kind.save(model, str(cached), extra)
        path = path or str(cached)
    return AbsorbResult(path, True, stats, qa)


# The paper's three modes (§6), plus two baselines for eval.py: "closed" (base model, no document)
# and "full" (base model, the whole document in context: the upper bound when it fits).
MODES = ("icl", "lift", "lift+icl", "closed", "full")
BASE_MODES = ("icl", "closed", "full")          # run with any adapter switched off


def answer_prompt(tok, question: str, doc: list[int], mode: str, context: int) -> list[int]:
    """The prompt of §6: the truncated document in context for icl and lift+icl, none for lift."""
    if mode not in MODES:
        raise LiftError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if mode in ("lift", "closed"):
        context_text = None
    else:
        context_text = tok.decode(doc) if mode == "full" else truncate_middle(doc, context, tok)
    return tok.encode_chat(question_messages(question, context_text))


def answer(model, tok, question: str, doc: list[int], *, mode: str = "lift+icl", context: int = 512,
           max_new_tokens: int = 64, dtype: str = "bfloat16",
           stream: Optional[Callable[[str], None]] = None) -> str:
    """Greedy answer. icl (and the closed/full baselines) run the base model with any adapter
    switched off; lift and lift+icl need an adapter."""
    if not question.strip():
        raise LiftError("empty question")
    kind = attached(model)
    if mode not in BASE_MODES and kind is None:
        raise LiftError(f"mode {mode} needs an adapter: absorb the document first")
    prompt = answer_prompt(tok, question, doc, mode, context)
    device = model.tok_embeddings.weight.device
    printed = ""
    out: list[int] = []

    def on_token(t: int):
        nonlocal printed
        out.append(t)
        if stream is not None:   # decode the whole reply each time: multi-byte characters span tokens
            text = tok.decode(out)
            if not text.endswith("\ufffd"):
                stream(text[len(printed):])
                printed = text

    with autocast(device, dtype):
        if mode in BASE_MODES and kind is not None:
            with kind.disabled(model):
                ids = generate(model, prompt, max_new_tokens, stop_ids=tok.stop_ids, on_token=on_token)
        else:
            ids = generate(model, prompt, max_new_tokens, stop_ids=tok.stop_ids, on_token=on_token)
    return tok.decode(ids).strip()


@torch.no_grad()
def document_loss(model, doc: list[int], data_cfg: DataConfig, dtype: str = "bfloat16") -> float:
    """Mean next-token loss over the document's windows (how well the model "knows" the text)."""
    from data import window_examples
    device = model.tok_embeddings.weight.device
    cfg = TrainConfig(dtype=dtype)
    losses = [example_loss(model, ex, device, cfg).item() for ex in window_examples(doc, data_cfg)]
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- synthetic QA (§3.2)
SYNTH_PROMPT = ("Read the passage and write one question that it answers.\n\nPassage:\n{passage}\n\n"
                "Reply in exactly this format:\nQuestion: <question>\nAnswer: <short answer>\n"
                "Evidence: <a sentence copied exactly from the passage>")


def parse_qa(reply: str) -> Optional[dict]:
    m = re.search(r"Question:\s*(.+?)\s*Answer:\s*(.+?)\s*Evidence:\s*(.+)", reply, re.S)
    if not m:
        return None
    q, a, e = (s.strip().strip('"') for s in m.groups())
    return {"question": q, "answer": a, "evidence": e} if q and a and e else None


def synthesize_qa(model, tok, text: str, n: int, *, seed: int = 0, retries: int = 5, passage_sentences: int = 16,
                  dtype: str = "bfloat16", progress: bool = False) -> list[dict]:
    """The released recipe: for each of n random passages of ~16 sentences, ask the model for a
    Question / Answer / Evidence triple; keep it only if the evidence appears verbatim in the
    passage (up to `retries` sampled attempts). Returns the kept triples (possibly fewer than n)."""
    from tqdm import tqdm
    sents = sentences(text)
    rng = random.Random(seed)
    device = model.tok_embeddings.weight.device
    norm = lambda s: " ".join(s.split()).lower()
    kept = []
    for i in tqdm(range(n), desc="synthesising QA", disable=not progress):
        start = rng.randrange(max(1, len(sents) - passage_sentences + 1))
        passage = " ".join(sents[start:start + passage_sentences])
        prompt = tok.encode_chat([{"role": "user", "content": SYNTH_PROMPT.format(passage=passage)}])
        for attempt in range(retries):
            with autocast(device, dtype):   # called before an adapter is attached: the base model
                reply = tok.decode(generate(model, prompt, 96, stop_ids=tok.stop_ids, temperature=0.7,
                                            seed=seed * 1000 + i * retries + attempt))
            triple = parse_qa(reply)
            if triple and norm(triple["evidence"]) in norm(passage):
                kept.append(triple)
                break
    return kept
