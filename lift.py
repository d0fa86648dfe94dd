"""LIFT, the method (arXiv 2502.14644), top to bottom in one file:

    absorb(model, tok, doc, qa)       windows (+ QA pairs) -> fresh adapter -> AdamW loop
    answer(model, tok, question, doc) icl | lift | lift+icl (§3, "LIFT+ICL" is what the paper reports)

METHOD.md (in this repository) explains the method with the paper's equations and settings; data.py
builds the training examples, gated_memory.py is the adapter, anchor.py our extension's terms on
unrelated text and on the gate. Storing adapters on disk so that a
second question costs no training is plumbing around the method: it lives in cache.py.

The loop is plain on purpose: `batch` examples per forward pass (1, as released, by default),
autocast from a dtype string (CPU and CUDA alike), optional gradient checkpointing of every block,
gradient clipping, a constant learning rate, and one optimizer step every `accumulate` batches
(1 by default; 0 = the whole epoch, as the released code did).
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import gated_memory
import resume
from anchor import anchor_loss, document_gate_term, gate_open_span
from adapters import attach_fresh, attached, load_adapter_file
from compute import SharedPrefix, autocast, bucketed, compiled_blocks, head_loss
from data import (IGNORE, DataConfig, Example, batches, build_epochs, question_messages, shared_prompt, truncate_middle,
                  window_examples)
from model import generate
from options import UserError, option
from switch import gate_opens


class TrainingError(UserError):
    """Training could not finish (for example the loss became NaN); nothing was saved."""


@dataclass
class TrainConfig:
    epochs: int = option(8, "passes over the data (released: 3 on windows only + 5 with QA)")
    lr: float = option(1e-3, "learning rate, constant (the paper's value for Gated Memory)")
    beta1: float = 0.9                # AdamW betas, eps and weight decay as released
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 1e-4
    clip: float = 1.0                 # max global gradient norm
    batch: int = option(1, "examples per forward pass (padded to the longest); released: 1")
    accumulate: int = option(1, "batches per optimizer step; 0 = the whole epoch (released code)")
    qa_batch: int = option(1, "QA and self-study examples per forward pass (and so per step with --accumulate 1): "
                              "the truncated document they all begin with then runs once per batch, exactly (tokens/s "
                              "still counts it once per example); 1 = one at a time, as released")
    dtype: str = option("auto", "compute dtype: auto (bfloat16 on CUDA and on CPUs with fast bf16, "
                                "else float32), bfloat16 or float32", choices=("auto", "bfloat16", "float32"))
    anchor: float = option(1.0, "weight of the KL anchor on unrelated text (our extension; 0 = the paper's "
                                "recipe): keeps the adapted model equal to the base away from the document")
    anchor_every: int = option(1, "the anchor after every N-th batch only, weighted N times (our extension, "
                                  "for speed: each anchor costs ~40%% of a window's step)")
    gate_penalty: float = option(0.0, "weight of the mean gate g on the anchor's text (our extension; needs "
                                      "--anchor > 0, Gated Memory only): asks the gate itself to stay shut there")
    gate_open: float = option(0.0, "weight of −log(mean gate g) on the document's own tokens (our extension, "
                                   "Gated Memory only; anchor.py): asks the gate to open there, so that it cannot "
                                   "shut alike on every input")
    gate_open_on: str = option("document", "where --gate-open counts: every token of the document's examples, or "
                                            "only the prompts of its closed-book questions", choices=("document", "questions"))
    anchor_format: str = option("chat", "how the anchor's general prompts are put: a plain chat turn, or the prompt "
                                        "a question is asked in without the document (\"Answer the question briefly. "
                                        "Question: ...\"), so that they differ from the document's questions only in "
                                        "what they ask (our extension)", choices=("chat", "question"))
    grad_checkpoint: bool = option(False, "recompute each block in the backward pass: less memory, "
                                          "about a third more compute")
    compile: bool = option(False, "torch.compile the model's blocks (needs a C++ compiler; ~20-30 s to compile): "
                                  "a lone window step ~1.2-1.3x faster on a CPU, a LIFT run ~1.08x (README, Speed)")
    seed: int = option(0, "random seed: adapter initialisation, data order")

    def __post_init__(self):
        if self.epochs < 1:
            raise UserError(f"--epochs {self.epochs}: at least one epoch is needed")
        if not self.lr > 0 or self.lr == float("inf"):
            raise UserError(f"--lr {self.lr}: the learning rate must be a positive finite number")
        if self.anchor < 0:
            raise UserError(f"--anchor {self.anchor}: the weight cannot be negative")
        if self.anchor_every < 1:
            raise UserError(f"--anchor-every {self.anchor_every}: at least 1 (every batch)")
        if self.gate_penalty < 0 or (self.gate_penalty and not self.anchor):
            raise UserError(f"--gate-penalty {self.gate_penalty}: needs a non-negative weight and --anchor > 0 "
                            f"(the penalty applies to the anchor's unrelated text)")
        if self.gate_open < 0:
            raise UserError(f"--gate-open {self.gate_open}: the weight cannot be negative")
        if self.batch < 1:
            raise UserError(f"--batch {self.batch}: at least one example per batch")
        if self.qa_batch < 1:
            raise UserError(f"--qa-batch {self.qa_batch}: at least one example per batch")
        if self.accumulate < 0:
            raise UserError(f"--accumulate {self.accumulate}: use a positive count, or 0 for the whole epoch")
        if self.dtype not in ("auto", "bfloat16", "float32"):   # float16 would need a gradient scaler
            raise UserError(f"--dtype {self.dtype}: choose auto, bfloat16 or float32")


# ----------------------------------------------------------------------------- the loss
def batch_loss(model, examples: list[Example], cfg: TrainConfig,
               gate_terms: Optional[list] = None) -> tuple[torch.Tensor, int]:
    """The loss summed over the labelled positions of a batch, and how many there are: next-token
    cross-entropy, or KL(teacher ‖ model) for distill.py's examples. Examples are right-padded
    (causal attention keeps padding away from real tokens). Position t predicts token t+1, so
    logits are computed only before a labelled token: all of a window, a QA example's answer.
    A prompt every example starts with (shared_prompt) runs once, not once per example
    (compute.SharedPrefix); eager only: a compiled block would recompile for every layer's cache.
    gate_terms: with cfg.gate_open, anchor.document_gate_term over the batch is appended to it."""
    device = model.tok_embeddings.weight.device
    P = 0 if cfg.compile else shared_prompt(examples)
    T = bucketed(max(len(ex.input_ids) for ex in examples) - P, cfg.compile)   # the longest, or its bucket
    ids = torch.tensor([ex.input_ids[P:] + [0] * (T + P - len(ex.input_ids)) for ex in examples], device=device)  # (B, T)
    labels = torch.tensor([ex.labels[P:] + [IGNORE] * (T + P - len(ex.labels)) for ex in examples], device=device)  # (B, T)
    targets = labels[:, 1:]                                                  # (B, T-1)
    at = F.pad(targets != IGNORE, (0, 1))                                    # (B, T) predicting positions
    cache = SharedPrefix() if P else None
    hard = targets[at[:, :-1]]                                               # (N,) next tokens
    with autocast(device, cfg.dtype):
        if P:                       # the shared prompt, once: fills the cache, no logits needed
            model(torch.tensor([examples[0].input_ids[:P]], device=device), cache=cache,
                  grad_checkpoint=cfg.grad_checkpoint, head=False)
        with gated_memory.gates_collected(model, on=cfg.gate_open > 0 and gate_terms is not None) as gates:
            x = model(ids, cache=cache, start_pos=P, grad_checkpoint=cfg.grad_checkpoint,
                      logits_at=at, head=False)                              # (N, C) final states, rows in (b, t) order
        if gates:                   # --gate-open: the tokens anchor.gate_open_span counts, not padding
            own = torch.tensor([gate_open_span(ex, cfg.gate_open_on) - P for ex in examples], device=device)
            own = torch.arange(T, device=device)[None] < own[:, None]         # (B, T): before each one's end
            if (term := document_gate_term(gates, own)) is not None:
                gate_terms.append(term)
        if all(ex.teacher is None for ex in examples):   # the usual case: cross-entropy, fp32 softmax over V
            return head_loss(model, x, hard), x.shape[0]
        loss, row = x.new_zeros((), dtype=torch.float32), 0
        for ex in examples:                              # each example's labelled rows are contiguous
            n = sum(l != IGNORE for l in ex.labels[1:])
            if ex.teacher is None:                       # cross-entropy against the next token
                loss = loss + head_loss(model, x[row:row + n], hard[row:row + n])
            else:                                        # distill.py: KL(teacher ‖ model), summed over rows
                teacher = ex.teacher.to(device)                                # (n, V) log-probabilities
                loss = loss + head_loss(model, x[row:row + n], lambda i, j, t=teacher: t[i:j].float())
            row += n
    return loss, x.shape[0]


def example_loss(model, ex: Example, cfg: TrainConfig) -> torch.Tensor:
    """Mean loss over one example's labelled positions."""
    total, n = batch_loss(model, [ex], cfg)
    return total / n


# ----------------------------------------------------------------------------- the AdamW loop
def train_adapter(model, plan: list[list[Example]], cfg: TrainConfig, progress: bool = True,
                  anchors: list[Example] = (), on_step: Optional[Callable[[int], None]] = None,
                  resume_file: Optional[Path] = None) -> dict:
    """Train the model's trainable tensors (the adapter) on plan = [epoch][example]. Returns stats.
    `batch` examples go through the model together; one optimizer step covers `accumulate`
    batches. A step's loss is the mean over all its labelled tokens, so each example weighs by
    its share of them, as in the released code (Hugging Face Trainer). With cfg.anchor > 0 each
    batch (or every cfg.anchor_every-th, weighted that many times) is followed by one of `anchors`
    (in turn) and cfg.anchor · KL(base ‖ adapted) on it; with cfg.gate_open, that weight times
    −log of the mean gate on each batch's document tokens is added too (both: anchor.py). resume_file: the run's state is saved
    there after every epoch, and a run saved there before goes on from its last epoch (resume.py).
    on_step(n) is called after the n-th optimizer step (diagnostics, e.g. gates.GateTrace)."""
    device = model.tok_embeddings.weight.device
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    opt.zero_grad(set_to_none=True)                        # no gradient left over from before
    model.train()
    run = resume.load(resume_file, params, opt)            # counters; a fresh Run unless resuming
    t0, kl_sum = time.time() - run.seconds, torch.tensor(run.kl_sum, device=device)
    base_states = {}                                       # the anchors' base pass, run once each (anchor_loss)
    bar = tqdm(total=sum(len(e) for e in plan), initial=sum(len(e) for e in plan[:run.epochs_done]),
               disable=not progress, unit="ex", dynamic_ncols=True)
    with compiled_blocks(model, cfg.compile):             # plain eager blocks unless --compile
        for epoch, examples in list(enumerate(plan))[run.epochs_done:]:
            groups = batches(examples, cfg.batch, cfg.qa_batch)
            per_step = cfg.accumulate or len(groups)
            loss_sum, labelled_sum = torch.zeros((), device=device), 0   # the loss is read once per step
            for s in range(0, len(groups), per_step):
                step = groups[s:s + per_step]
                labelled = sum(l != IGNORE for b in step for ex in b for l in ex.labels[1:])
                for batch in step:
                    opened = []                                # --gate-open's term, if any (anchor.py)
                    loss, n = batch_loss(model, batch, cfg, opened)
                    (loss / labelled + sum(cfg.gate_open * t / len(step) for t in opened)).backward()
                    if cfg.anchor and anchors and run.batches % cfg.anchor_every == 0:
                        kl = anchor_loss(model, anchors[run.anchors % len(anchors)], cfg, base_states)
                        (cfg.anchor * cfg.anchor_every * kl / len(step)).backward()
                        run.anchors, kl_sum = run.anchors + 1, kl_sum + kl.detach()
                    run.batches += 1
                    loss_sum += loss.detach()
                    run.tokens += sum(len(ex.input_ids) for ex in batch)
                labelled_sum += labelled
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                run.steps += 1
                if on_step is not None:
                    on_step(run.steps)
                mean = loss_sum.item() / labelled_sum
                if mean != mean or mean == float("inf"):
                    raise TrainingError(f"the loss became {mean} in epoch {epoch + 1}; try a lower --lr. "
                                        f"Nothing was saved.")
                bar.set_description(f"epoch {epoch + 1}/{len(plan)}")
                bar.set_postfix(loss=f"{mean:.3f}")
                bar.update(sum(len(b) for b in step))
            run.epoch_losses.append(loss_sum.item() / labelled_sum)
            run.epochs_done, run.kl_sum, run.seconds = epoch + 1, kl_sum.item(), time.time() - t0
            resume.save(resume_file, run, params, opt)
            if progress:
                bar.write(f"epoch {epoch + 1}/{len(plan)}  loss {run.epoch_losses[-1]:.4f}  "
                          f"{run.tokens / run.seconds:.0f} tokens/s  elapsed {run.seconds:.1f}s", file=sys.stderr)
    bar.close()
    model.eval()
    if not all(torch.isfinite(p).all() for p in params):
        raise TrainingError("training diverged (the adapter's weights are not finite); try a lower --lr. "
                            "Nothing was saved.")
    elapsed = time.time() - t0
    return {"tokens": run.tokens, "seconds": elapsed, "tokens_per_s": run.tokens / elapsed,
            "epoch_losses": run.epoch_losses, "mean_anchor_loss": run.kl_sum / run.anchors if run.anchors else None}


# ----------------------------------------------------------------------------- absorbing a document
def check_fits(model, tok, doc: list[int], data_cfg: DataConfig) -> None:
    """Refuse, before any training, settings whose examples or prompts would not fit the model."""
    room = model.cfg.max_seq_len
    if data_cfg.window > room:
        raise UserError(f"--window {data_cfg.window} is larger than the model's context ({room} tokens)")
    if data_cfg.context + 256 > room:
        raise UserError(f"--context {data_cfg.context} leaves no room for the question and answer "
                        f"in the model's {room}-token context")
    if data_cfg.contextualized and data_cfg.ct_prefix + 64 + data_cfg.window > room:
        raise UserError(f"contextualized windows ({data_cfg.ct_prefix}-token prefix + {data_cfg.window}-token "
                        f"window) do not fit the model's {room}-token context; lower --context or --window")
    if len(doc) < 2:
        raise UserError("the document has fewer than 2 tokens: there is nothing to predict")



def absorb(model, tok, doc: list[int], qa: list[dict], *, data_cfg: DataConfig, adapter_cfg,
           train_cfg: TrainConfig, init: Optional[str] = None, progress: bool = True,
           anchors: Optional[list[Example]] = None, on_step: Optional[Callable[[int], None]] = None,
           distilled: list[Example] = (), resume_file: Optional[Path] = None) -> dict:
    """LIFT on one document: build the examples (§3.1 windows, §3.2 QA pairs {"question",
    "answer"}; `distilled`: distill.py's examples), attach a fresh adapter (or the pre-LIFT SFT
    initialisation `init`, §7), train it with a fresh AdamW. Leaves the adapter attached; returns
    the training stats. anchors: the --anchor examples (cache.anchor_set builds them); resume_file:
    train_adapter's, where the run is saved after every epoch and resumed from."""
    check_fits(model, tok, doc, data_cfg)
    plan = build_epochs(doc, qa, train_cfg.epochs, data_cfg, tok, seed=train_cfg.seed, distilled=distilled)
    if train_cfg.anchor and not anchors:
        raise ValueError("--anchor > 0 needs the anchor examples (cache.anchor_set)")
    attach_fresh(model, adapter_cfg, seed=train_cfg.seed)
    if init is not None:
        load_adapter_file(model, init, expect=adapter_cfg)
    stats = train_adapter(model, plan, train_cfg, progress=progress, anchors=anchors or [], on_step=on_step,
                          resume_file=resume_file)
    stats["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return stats


# ----------------------------------------------------------------------------- answering (§3, inference modes)
# The paper's three modes, plus two baselines for eval.py: "closed" (base model, no document)
# and "full" (base model, the whole document in context: the upper bound when it fits).
MODES = ("icl", "lift", "lift+icl", "closed", "full")
BASE_MODES = ("icl", "closed", "full")          # run with any adapter switched off


def prompt_context(tok, doc: list[int], mode: str, context: int) -> Optional[str]:
    """What goes before the question: the truncated document for icl and lift+icl, all of it for
    full, nothing for lift and closed."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if mode in ("lift", "closed"):
        return None
    return tok.decode(doc) if mode == "full" else truncate_middle(doc, context, tok)


def answer_prompt(tok, question: str, doc: list[int], mode: str, context: int) -> list[int]:
    return tok.encode_chat(question_messages(question, prompt_context(tok, doc, mode, context)))


def checked_prompt(model, tok, question: str, doc: list[int], mode: str, context: int,
                   max_new_tokens: int) -> list[int]:
    """The prompt, or a UserError if it and the answer would not fit the model (checked before
    training too, so that a too-long question never throws a finished training away)."""
    if not question.strip():
        raise UserError("empty question")
    prompt = answer_prompt(tok, question, doc, mode, context)
    if len(prompt) + max_new_tokens > model.cfg.max_seq_len:
        raise UserError(f"the prompt ({len(prompt)} tokens) and the answer ({max_new_tokens}) do not fit the "
                        f"model's {model.cfg.max_seq_len}-token context; shorten the question or --context")
    return prompt


def answer(model, tok, question: str, doc: list[int], *, mode: str = "lift+icl", context: int = 512,
           max_new_tokens: int = 64, dtype: str = "float32", switch: bool = False, gate_gain: float = 1.0,
           stream: Optional[Callable[[str], None]] = None) -> str:
    """Greedy answer. icl (and the closed/full baselines) run the base model with any adapter
    switched off; lift and lift+icl need an adapter. switch: Gated Memory answers only if the
    question opens its gate (switch.py, our extension), else the base model does. gate_gain: the
    adapter answers with its gates multiplied by this (a diagnostic; the switch decides unscaled)."""
    kind = attached(model)
    if mode not in BASE_MODES and kind is None:
        raise UserError(f"mode {mode} needs an adapter: absorb the document first")
    prompt = checked_prompt(model, tok, question, doc, mode, context, max_new_tokens)
    device = model.tok_embeddings.weight.device
    printed, out = "", []

    def on_token(t: int):
        nonlocal printed
        out.append(t)
        if stream is not None:   # decode the whole reply each time: multi-byte characters span tokens
            text = tok.decode(out)
            if not text.endswith("\ufffd"):
                stream(text[len(printed):])
                printed = text

    base = mode in BASE_MODES or (switch and not gate_opens(model, tok, question, prompt_context(tok, doc, mode, context), dtype))
    louder = gated_memory.gate_gained(model, gate_gain) if not base and gate_gain != 1 else nullcontext()
    with autocast(device, dtype), (kind.disabled(model) if base and kind else nullcontext()), louder:
        ids = generate(model, prompt, max_new_tokens, stop_ids=tok.stop_ids, on_token=on_token)
    return tok.decode(ids).strip()


@torch.no_grad()
def document_loss(model, doc: list[int], data_cfg: DataConfig, dtype: str = "float32") -> float:
    """Mean next-token loss over the document's windows (how well the model "knows" the text)."""
    cfg = TrainConfig(dtype=dtype)
    losses = [example_loss(model, ex, cfg).item() for ex in window_examples(doc, data_cfg)]
    return sum(losses) / len(losses)
