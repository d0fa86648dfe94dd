"""Adapters on disk: the cache that makes a second question about a document free, `--adapter`
files, and the checks that keep a stored adapter from ever answering for the wrong document.

Not part of the method (lift.py is); this is what a tool around it needs. An adapter file holds,
beside its tensors (checkpoint.write_adapter_file): the base model's fingerprint, a checksum, the
document's hash and the key of every setting that changes training. The cache folder is
$LIFT_CACHE, or ~/.cache/lift; an entry is named by that key, so asking again about the same
document with the same settings loads it instead of training. Beside an entry being trained lies
its `.resume.pt` (resume.py), so that a stopped run goes on where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import data
import distill
import lift
import study
import synth_qa
from adapters import ADAPTERS, attached, load_adapter_file
from checkpoint import AdapterFileError, fingerprint
from options import UserError


def cache_dir() -> Path:
    """$LIFT_CACHE (an empty value counts as unset), else ~/.cache/lift."""
    return Path(os.environ.get("LIFT_CACHE") or Path.home() / ".cache" / "lift")


def check_writable(folder: Path) -> None:
    """Fail before training, not after, when the cache cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"the adapter cache {folder} is not writable ({e.strerror}); set LIFT_CACHE to a "
                        f"writable folder, or pass --no-cache") from None


def remove_stale_temporaries(folder: Path, older_than_s: float = 600) -> None:
    """Temporary files of a run that was killed while saving (a live save takes under a second)."""
    for tmp in folder.glob(".adapter-*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass


def doc_hash(doc: list[int]) -> str:
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:20]


LATER = {"anchor_every": 1, "study": "quote", "head_lora": 0, "phrasings": 1, "qa_batch": 1, "closed_book": False, "reply": "quote", "study_unrelated": 0, "gate_fixed": 0.0, "memory_act": "silu", "memory_scale": 1.0, "gate_open": 0.0, "gate_open_on": "document", "anchor_format": "chat"}   # options added after adapters were cached, at their defaults


def learning_settings(cfg) -> dict:
    """The training or data settings as recorded in cache and results keys; an option added later
    (LATER) only when it is not at its default, so that adapters and results of runs from before
    the option keep their keys."""
    return {k: v for k, v in asdict(cfg).items() if LATER.get(k, object()) != v}


def adapter_settings(cfg) -> dict:
    """The adapter's settings as recorded in cache keys: learning_settings, and the probes' options
    (memory_reads, memory_mix, targets) too only when not at their defaults, so that adapters cached before
    them keep their keys."""
    probes = {"memory_reads": "head", "memory_mix": "blend", "targets": "all"}
    return {k: v for k, v in learning_settings(cfg).items() if probes.get(k, object()) != v}


def settings_key(model, tok, data_cfg, adapter_cfg, train_cfg, qa: list[dict], synth: int,
                 init: Optional[str]) -> str:
    """A hash of everything but the document that changes the trained adapter: base model and
    tokenizer, every setting, the QA pairs, the prompt texts, the initialisation file. (Not
    --compile: it changes how fast the loop runs, not what it learns beyond rounding.)"""
    prompts = [data.question_messages("{q}", "{c}"), data.RECITE, synth_qa.SYNTH_PROMPT, data.anchor_texts_hash(),
               distill.ANCHOR_REPLY_TOKENS, study.QUESTION, study.REPLY, distill.REPLY_TOKENS, distill.STUDY_FORMAT]
    prompts += [study.CLOZE] if data_cfg.study in ("cloze", "both") else []
    keyed = data_cfg.study in ("keys", "phrases", "clauses")
    prompts += [study.KEY_QUESTIONS] if keyed or data_cfg.phrasings > 1 else []
    prompts += [sorted(study.FUNCTION_WORDS), study.KEY_SENTENCES, study.KEYS_PER_SENTENCE] if keyed else []
    prompts += [study.PHRASE_WORDS] if data_cfg.study in ("phrases", "clauses") else []
    prompts += [study.CLAUSE_BACK, study.CLAUSE_WORDS] if data_cfg.study == "clauses" else []
    train = {k: v for k, v in learning_settings(train_cfg).items() if k != "compile"}
    blob = json.dumps({"base": fingerprint(model), "tokenizer": tok.fingerprint(), "data": learning_settings(data_cfg),
                       "adapter": [type(adapter_cfg).__name__, adapter_settings(adapter_cfg)], "train": train,
                       "qa": qa, "synth_qa": synth, "prompts": prompts,
                       "init": hashlib.sha256(Path(init).read_bytes()).hexdigest() if init else None},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def anchor_set(model, tok, dtype: str, use_cache: bool = True, form: str = "chat") -> list:
    """The --anchor examples with the base model's replies. Writing the replies costs about a
    minute on a CPU, so they are kept in the cache folder, one small file per base model,
    tokenizer, anchor text, prompt form (--anchor-format) and dtype; an unreadable file is simply
    written again."""
    key = hashlib.sha256(json.dumps([fingerprint(model), tok.fingerprint(), data.anchor_texts_hash(),
                                     distill.ANCHOR_REPLY_TOKENS, dtype] + [form] * (form != "chat")).encode()).hexdigest()[:20]
    path = cache_dir() / f"anchor-replies-{key}.json"
    try:
        replies = json.loads(path.read_text()) if use_cache else None
    except (OSError, ValueError):
        replies = None
    well_formed = (isinstance(replies, list) and len(replies) == len(data.anchor_questions())
                   and all(isinstance(r, list) and all(isinstance(t, int) for t in r) for r in replies))
    if not well_formed:
        replies = distill.base_replies(model, tok, dtype, progress=True, form=form)
        if use_cache:
            check_writable(path.parent)
            tmp = path.with_name(f".adapter-anchor-{os.getpid()}.tmp")   # removed if a kill leaves it
            tmp.write_text(json.dumps(replies))
            os.replace(tmp, path)
    return data.anchor_examples(tok, replies, form=form)


@dataclass
class AbsorbResult:
    path: Optional[str]           # where the adapter is (None when it was not saved)
    trained: bool                 # False when it came from the cache or --adapter
    stats: dict = field(default_factory=dict)
    qa: list = field(default_factory=list)
    note: str = ""                # e.g. why the adapter was not saved

    def summary(self) -> str:
        if not self.trained:
            return f"adapter loaded from {self.path} (no training)"
        s = self.stats
        return (f"LIFT: {s['tokens']} tokens trained in {s['seconds']:.1f}s ({s['tokens_per_s']:.0f} tokens/s), "
                f"{s['trainable_params']:,} trainable parameters, final epoch loss {s['epoch_losses'][-1]:.3f}; "
                f"adapter: {self.path or 'not saved'}{self.note}")


def absorb_cached(model, tok, text: str, *, data_cfg, adapter_cfg, train_cfg, qa: list[dict] = (),
                  synth: int = 0, adapter_path: Optional[str] = None, init: Optional[str] = None,
                  use_cache: bool = True, progress: bool = True, on_step=None) -> AbsorbResult:
    """lift.absorb, unless an adapter for exactly this document and these settings is stored:
    in `adapter_path` (if that file exists) or in the cache. A trained adapter is saved to both.
    With the cache, a run that was stopped goes on from its last finished epoch (resume.py)."""
    doc, qa = tok.encode(text), list(qa)
    lift.check_fits(model, tok, doc, data_cfg)
    if init and not Path(init).is_file():
        raise UserError(f"--init {init}: no such file")
    identity = {"doc": doc_hash(doc), "settings": settings_key(model, tok, data_cfg, adapter_cfg, train_cfg, qa,
                                                               synth, init)}
    if adapter_path and Path(adapter_path).exists():
        extra = load_adapter_file(model, adapter_path)
        for what, name in (("doc", "another document"), ("settings", "other settings")):
            if extra.get(what) != identity[what]:
                raise UserError(f"--adapter {adapter_path} was trained on {name}; remove it or choose another "
                                f"--adapter path to train one for this document")
        return AbsorbResult(adapter_path, False, extra.get("stats", {}), extra.get("qa", []))
    folder = cache_dir()
    cached = folder / f"{identity['doc']}-{identity['settings']}.safetensors"
    if use_cache:
        check_writable(folder)
        remove_stale_temporaries(folder)
        if cached.exists():
            try:
                extra = load_adapter_file(model, str(cached))
                if adapter_path:
                    attached(model).save(model, adapter_path, extra)
                return AbsorbResult(str(cached), False, extra.get("stats", {}), extra.get("qa", []))
            except AdapterFileError as e:
                print(f"warning: cache entry {cached.name} is unusable ({e}); training again in its place",
                      file=sys.stderr)
                cached.unlink(missing_ok=True)

    for kind in ADAPTERS.values():
        kind.remove(model)                               # synthetic pairs come from the base model
    if synth:
        qa += synth_qa.synthesize_qa(model, tok, text, synth, seed=train_cfg.seed, dtype=train_cfg.dtype,
                                     progress=progress)
    anchors = anchor_set(model, tok, train_cfg.dtype, use_cache, train_cfg.anchor_format) if train_cfg.anchor else None
    distilled = distill.distill_examples(model, tok, doc, data_cfg, train_cfg.dtype, progress) if data_cfg.distill else []
    unfinished = cached.with_suffix(".resume.pt") if use_cache else None   # resume.py: the run so far
    try:
        stats = lift.absorb(model, tok, doc, qa, data_cfg=data_cfg, adapter_cfg=adapter_cfg, train_cfg=train_cfg,
                            init=init, progress=progress, anchors=anchors, on_step=on_step, distilled=distilled,
                            resume_file=unfinished)
    except lift.TrainingError:          # a run that diverged would diverge again from its saved state
        if unfinished:
            unfinished.unlink(missing_ok=True)
        raise
    extra = {**identity, "stats": stats, "qa": qa, "doc_tokens": len(doc)}
    result = AbsorbResult(None, True, stats, qa)
    kind = attached(model)
    for path in [p for p in (adapter_path, str(cached) if use_cache else None) if p]:
        try:
            kind.save(model, path, extra)
            result.path = result.path or path
        except OSError as e:        # the answer still comes; only the saving is lost
            result.note += f" (could not save {path}: {e.strerror})"
    if unfinished and result.path:
        unfinished.unlink(missing_ok=True)
    return result
