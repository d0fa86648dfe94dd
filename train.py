"""The command line, and the per-input training loop of LIFT (arXiv 2502.14644, §3 and the
released settings): a fresh Gated Memory and a fresh AdamW for every document.

    python train.py --doc book.txt --ask "Who found the second key?"

absorbs book.txt into an adapter (or loads it from the cache if this document was absorbed before
with the same settings) and answers, by default in LIFT+ICL mode (adapter + truncated document).

The loop is plain on purpose: one example at a time (batch 1, as released), bf16 autocast from a
dtype string (CPU and CUDA alike), optional gradient checkpointing of every block, gradient
clipping, a constant learning rate, one optimizer step per example or, as the released code did,
one per epoch. Departure: the released code stored the frozen base in 4-bit NF4; we keep it in
the --dtype given (bf16 by default), which on a CPU is also the fast path.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE, DataConfig, Example
from gated_memory import GatedMemoryConfig, trainable_parameters


class TrainingError(RuntimeError):
    """Training could not finish (for example the loss became NaN); nothing was saved."""


@dataclass
class TrainConfig:
    epochs: int = 8               # total passes over the data (released: 3 windows-only + 5 with QA)
    lr: float = 1e-3              # constant; the paper's value for Gated Memory
    beta1: float = 0.9            # AdamW betas (0.9, 0.98), eps and weight decay as released
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 1e-4
    clip: float = 1.0             # max global gradient norm
    step_every: str = "example"   # "example": one AdamW step per example; "epoch": accumulate the epoch (released)
    dtype: str = "bfloat16"       # autocast dtype ("bfloat16" or "float32" to disable autocast)
    grad_checkpoint: bool = False # recompute each block in backward: less memory, ~1/3 more compute
    seed: int = 0

    def __post_init__(self):
        from model import ConfigError
        if self.step_every not in ("example", "epoch"):
            raise ConfigError(f"step_every must be 'example' or 'epoch', not {self.step_every!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype must be bfloat16, float16 or float32, not {self.dtype!r}")
        if self.epochs < 1:
            raise ConfigError("epochs must be at least 1")


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CPU or CUDA from a dtype string; a no-op context for float32."""
    return torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def example_loss(model, ex: Example, device, cfg: TrainConfig) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE."""
    ids = torch.tensor([ex.input_ids], device=device)                 # (1, T)
    labels = torch.tensor([ex.labels], device=device)                 # (1, T)
    with autocast(device, cfg.dtype):
        logits = model(ids, grad_checkpoint=cfg.grad_checkpoint)      # (1, T, V)
    # position t predicts token t+1: drop the last logit and the first label
    return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE)


def keep_freed_memory() -> None:
    """CPU only, glibc only: let malloc keep large freed blocks instead of handing them back to
    the OS. Every step allocates and frees the same ~100 MB buffers (logits, activations); without
    this the kernel hands out and zero-fills fresh pages on every step, which shows up as system
    time in a CPU profile. Harmless where it does not apply."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: do not trim the heap below 1 GiB of free space
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap, not mmap
    except (OSError, AttributeError):
        pass


def train_adapter(model, plan: list[list[Example]], cfg: TrainConfig, progress: bool = True) -> dict:
    """Train the model's trainable tensors (the adapter) on plan = [epoch][example]. Returns stats."""
    device = model.tok_embeddings.weight.device
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    model.train()
    tokens, t0, epoch_losses = 0, time.time(), []
    bar = tqdm(total=sum(len(e) for e in plan), disable=not progress, unit="ex", dynamic_ncols=True)
    for epoch, examples in enumerate(plan):
        losses = []
        for i, ex in enumerate(examples):
            loss = example_loss(model, ex, device, cfg)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {loss.item()} at epoch {epoch + 1}, example {i + 1}; "
                                    f"try a lower --lr. Nothing was saved.")
            # "epoch": average the gradients of the whole epoch and step once at its end.
            (loss / len(examples) if cfg.step_every == "epoch" else loss).backward()
            if cfg.step_every == "example" or i == len(examples) - 1:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += len(ex.input_ids)
            bar.set_description(f"epoch {epoch + 1}/{len(plan)} {ex.kind}")
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
        epoch_losses.append(sum(losses) / len(losses))
        elapsed = time.time() - t0
        msg = (f"epoch {epoch + 1}/{len(plan)}  loss {epoch_losses[-1]:.4f}  "
               f"{tokens / elapsed:.0f} tokens/s  elapsed {elapsed:.1f}s")
        if progress:
            bar.write(msg, file=sys.stderr)
    bar.close()
    model.eval()
    elapsed = time.time() - t0
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "epoch_losses": epoch_losses}


# ----------------------------------------------------------------------------- command line
def add_dataclass_args(p: argparse.ArgumentParser, cls, helps: dict[str, str], skip=()):
    """One flag per dataclass field, with the dataclass default (so the two never drift apart)."""
    for f in fields(cls):
        if f.name in skip or f.name not in helps:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=helps[f.name] + f" (default: {f.default})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="LIFT: absorb a long document into a Gated Memory adapter, then answer questions about it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python train.py --doc examples/orchard_chronicle.txt --ask 'Who founded Halvard Mill?'")
    p.add_argument("--doc", required=True, help="the long document (UTF-8 text file)")
    p.add_argument("--ask", action="append", default=[], help="a question (repeatable); without it, an interactive prompt")
    p.add_argument("--model", default=None, help="a .gguf file, a Hugging Face directory or hub id (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--mode", choices=["lift+icl", "lift", "icl"], default="lift+icl",
                   help="lift+icl: adapter + truncated document (default); lift: adapter only; icl: base model + truncated document")
    add_dataclass_args(p, DataConfig, {
        "window": "window length ℓ in tokens", "stride": "stride s between windows; 0 = 3ℓ/8",
        "context": "context budget: document tokens kept in the prompt (first half + last half)",
        "contextualized": "contextualized training: show head/tail spans of the document before each window",
        "qa_start_epoch": "epochs on windows only before QA pairs join"})
    add_dataclass_args(p, TrainConfig, {
        "epochs": "training epochs", "lr": "learning rate (AdamW, constant)",
        "step_every": "'example': one optimizer step per example; 'epoch': one per epoch (released code)",
        "dtype": "compute dtype: bfloat16 (autocast; fast on CPUs with AMX) or float32",
        "grad_checkpoint": "recompute each block in the backward pass to save memory",
        "seed": "random seed (adapter init, data order, sampling)"})
    p.add_argument("--qa", default=None, help="auxiliary QA pairs: JSONL with {\"question\", \"answer\"} per line")
    p.add_argument("--synth-qa", type=int, default=0, help="let the model write N QA pairs from the document (checked against it)")
    p.add_argument("--adapter", default=None, help="adapter file: loaded if it exists, else trained and saved there")
    p.add_argument("--init", default=None, help="start LIFT from this initialisation (made by `train.py sft`) instead of a random one")
    p.add_argument("--no-cache", action="store_true", help="always train; do not read or write the adapter cache")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(doc: str, ask: list[str], model: str | None, mode: str, data_cfg: DataConfig, train_cfg: TrainConfig,
         qa: str | None, synth_qa: int, adapter: str | None, no_cache: bool, device: str,
         max_new_tokens: int, quiet: bool, init: str | None = None) -> int:
    import lift
    from checkpoint import load_model
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    text = lift.read_document(doc)
    questions = [q for q in ask]
    if any(not q.strip() for q in questions):
        raise lift.LiftError("empty question")
    t0 = time.time()
    base, tok = load_model(model, device=dev, dtype=getattr(torch, train_cfg.dtype))
    print(f"loaded {base.name} in {time.time() - t0:.1f}s on {dev}", file=sys.stderr)
    doc_ids = tok.encode(text)
    if mode != "icl":
        result = lift.absorb(base, tok, text, data_cfg=data_cfg, adapter_cfg=GatedMemoryConfig(), train_cfg=train_cfg,
                             qa_path=qa, synth_qa=synth_qa, adapter_path=adapter, use_cache=not no_cache,
                             progress=not quiet, init_path=init)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
        print(f"{result.summary()}; peak memory (RSS) {peak_gb:.2f} GB", file=sys.stderr)

    def respond(q: str):
        print(f"Q: {q}\nA: ", end="", flush=True)
        lift.answer(base, tok, q, doc_ids, mode=mode, context=data_cfg.context, max_new_tokens=max_new_tokens,
                    dtype=train_cfg.dtype, stream=lambda s: print(s, end="", flush=True))
        print()

    for q in questions:
        respond(q)
    if not questions:
        print("Ask about the document (empty line or Ctrl-D to quit).", file=sys.stderr)
        while True:
            try:
                q = input("> ").strip()
            except EOFError:
                break
            if not q:
                break
            respond(q)
    return 0


def sft_cli(argv) -> int:
    """`python train.py sft ...`: pre-LIFT SFT of the adapter's initialisation (sft.py)."""
    from checkpoint import load_model
    from sft import SFTConfig, run_sft
    p = argparse.ArgumentParser(prog="train.py sft", description="Pre-LIFT SFT: train a Gated Memory initialisation "
                                "over many documents (window loss + γ·answer loss); resumable.")
    p.add_argument("--out", required=True, help="folder for checkpoint.pt, heldout.jsonl and init.safetensors")
    p.add_argument("--corpus", default=None, help="folder of benchmark JSONL files (default: generate documents)")
    p.add_argument("--model", default=None, help="base model (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--quiet", action="store_true")
    add_dataclass_args(p, SFTConfig, {"docs": "training documents to generate", "heldout": "held-out documents",
                                      "doc_tokens": "tokens per generated document", "questions": "QA pairs per document",
                                      "gamma": "γ, weight of the answer loss", "docs_per_step": "documents per optimizer step",
                                      "epochs": "passes over the corpus", "seed": "corpus and order seed"})
    add_dataclass_args(p, DataConfig, {"window": "window ℓ", "stride": "stride s (0 = 3ℓ/8)", "context": "context budget in QA prompts"})
    add_dataclass_args(p, TrainConfig, {"lr": "learning rate", "dtype": "bfloat16 or float32"}, skip=("seed", "epochs"))
    args = p.parse_args(argv)
    pick = lambda cls: cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    stats = run_sft(model, tok, Path(args.out), pick(SFTConfig), pick(DataConfig), pick(TrainConfig),
                    corpus_dir=args.corpus, max_steps=args.max_steps, progress=not args.quiet)
    print(f"SFT: {stats['documents']} documents, {stats['steps']} steps, {stats['seconds']:.0f}s; "
          f"output in {args.out}", file=sys.stderr)
    return 0


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from data import DataError
    from lift import LiftError
    from model import ConfigError
    try:
        if argv[:1] == ["sft"]:
            return sft_cli(argv[1:])
        args = parser().parse_args(argv)
        pick = lambda cls: cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
        return main(doc=args.doc, ask=args.ask, model=args.model, mode=args.mode, data_cfg=pick(DataConfig),
                    train_cfg=pick(TrainConfig), qa=args.qa, synth_qa=args.synth_qa, adapter=args.adapter,
                    no_cache=args.no_cache, device=args.device, max_new_tokens=args.max_new_tokens, quiet=args.quiet,
                    init=args.init)
    except (ConfigError, DataError, LiftError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was saved for this run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the importable copy of this file (`import train`), so that lift.py, which imports the
    # loop from train, and this command share one set of classes.
    import train
    sys.exit(train.cli())
