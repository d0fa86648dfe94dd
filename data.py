"""The training data of LIFT (arXiv 2502.14644, §3.1–3.2 and the contextualized variant of v2).

  * Windows (§3.1): overlapping segments of the document's tokens, length ℓ, stride s = 3ℓ/8 by
    default; next-token loss on every token of every window.
  * Auxiliary QA (§3.2): question/answer pairs about the document in the chat format, with the
    truncated document (head + "..." + tail) in context exactly as at answer time; loss on the
    answer tokens and the end-of-turn token only.
  * Contextualized windows (v2, "CT"): a window preceded by a head and a tail span of the document
    and an instruction to recite the segment; loss on the window only.
  * The schedule: epochs on windows only, then windows + QA, each epoch shuffled by a seeded RNG.

Departures from the paper: the last window is shifted back to end at L (so every window is ℓ
long). METHOD.md (in this repository) explains each part with the paper's equations.
An Example holds token ids and labels; label −100 means "no loss here", as in PyTorch's
cross_entropy(ignore_index=-100).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from options import UserError, option

IGNORE = -100
STUDIES = ("quote", "sentences", "cloze", "both", "keys", "phrases", "clauses")      # what --distill's self-study questions ask (study.study_pairs)
REPLIES = ("quote", "plain", "restate")                    # how a quoting self-study question is answered


class DataError(UserError):
    """Bad input data (document, QA file, settings), with a message meant for the user."""


@dataclass
class DataConfig:
    window: int = option(256, "window length ℓ in tokens (the paper: 2048; small for a CPU)")
    stride: int = option(0, "stride s between windows; 0 means 3ℓ/8, as in the paper")
    context: int = option(512, "ICL budget: document tokens kept in the prompt, first half + last half "
                               "(the paper: 7800)")
    contextualized: bool = option(False, "contextualized training (CT): show a head + tail prefix of the "
                                         "document and a recite instruction before each window")
    qa_start_epoch: int = option(3, "epochs on windows only before QA pairs join the mix (released: 3)")
    distill: int = option(0, "self-study questions (our extension, distill.py): up to N questions about the "
                             "document's names (as --study says), plus N/2 unrelated questions "
                             "answered as the base model does with the document in context. 0 = off")
    study: str = option("quote", "what --distill's questions ask: quote (a name → the document's sentence naming "
                                 "it), sentences (as quote, each sentence under one name only), cloze (a sentence "
                                 "with a name or number blanked → that name or number) "
                                 "both (each fact asked both ways) or keys (each sentence quoted under its names, "
                                 "numbers and rare words, in several phrasings) or phrases (as keys, each key "
                                 "with its neighbouring words) or clauses (as phrases, each answered from the "
                                 "start of the key's clause, not of its sentence)", choices=STUDIES)
    phrasings: int = option(1, "each quoting self-study question (--study quote, sentences, keys, both) asked in K phrasings "
                               "(study.KEY_QUESTIONS), so that a fact is reached by questions worded otherwise")
    study_unrelated: int = option(0, "unrelated questions asked with the document in context, answered as the "
                                     "base model answers them (KL; our extension, with --distill): 0 means N/2 "
                                     "(at least 1); the anchor has 48 such prompts")
    reply: str = option("quote", "how a quoting self-study question is answered: quote ('The text says: \"<the "
                                 "sentence>\"') or plain (the sentence alone, as a user's answer reads) or restate "
                                 "(the sentence from the question's key on)", choices=REPLIES)
    closed_book: bool = option(False, "each self-study question also asked without the document, as LIFT alone is "
                                      "asked (our extension; the released QA prompt always holds the document)")

    def __post_init__(self):
        if not 1 <= self.phrasings <= 6:
            raise DataError(f"--phrasings {self.phrasings}: from 1 to 6 (the phrasings study.KEY_QUESTIONS has)")
        if self.window < 2:
            raise DataError(f"--window {self.window}: a window needs at least 2 tokens (one to predict)")
        if min(self.context, self.stride, self.qa_start_epoch, self.distill, self.study_unrelated) < 0:
            raise DataError("--context, --stride, --qa-start-epoch, --distill and --study-unrelated cannot be negative")
        if self.study not in STUDIES:
            raise DataError(f"--study {self.study}: choose one of {', '.join(STUDIES)}")
        if self.reply not in REPLIES:
            raise DataError(f"--reply {self.reply}: choose one of {', '.join(REPLIES)}")
        if self.study_unrelated and not self.distill:
            raise DataError("--study-unrelated sets the general questions beside --distill's study set: "
                            "it needs --distill N")
        if self.closed_book and not self.distill:
            raise DataError("--closed-book asks the self-study questions again: it needs --distill N")

    @property
    def step(self) -> int:
        return self.stride or max(1, (3 * self.window) // 8)

    @property
    def ct_prefix(self) -> int:
        """Tokens of document head + tail before a contextualized window: half the ICL budget,
        so that prefix + window stay well inside the model (released geometry, METHOD.md §3)."""
        return self.context // 2


def read_document(path: str) -> str:
    """A UTF-8 text file with some visible text in it, or a one-line DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it first, e.g. with iconv") from None
    if not text.replace("\x00", "").strip():
        raise DataError(f"{path} is empty (no visible text)")
    if "\x00" in text:
        raise DataError(f"{path} contains NUL bytes: it looks like a binary file, not text")
    return text


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]             # same length; IGNORE where no loss
    kind: str = "window"          # "window", "qa", "closed" (a QA pair without the document), "anchor" or "distill"
    # kind "distill" only (distill.py): the frozen base model's log-probabilities (N, V) at the
    # N labelled positions, read with the evidence in context; the loss is then KL(teacher ‖ model).
    teacher: Optional[object] = None


# ----------------------------------------------------------------------------- windows (§3.1)
def window_spans(n: int, length: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) spans over n tokens. Rule: starts are 0, s, 2s, ...; the last window is shifted
    back so that it ends exactly at n and stays `length` long (so the final stride may be shorter
    than s). If n ≤ length there is one window, [0, n). Count: 1 + ⌈(n − ℓ)/s⌉ for n > ℓ."""
    if n <= 0:
        raise DataError("the document is empty (no tokens)")
    if length <= 0 or stride <= 0:
        raise DataError(f"window ({length}) and stride ({stride}) must be positive")
    if stride > length:
        raise DataError(f"stride {stride} is larger than the window {length}: tokens would be skipped")
    if n <= length:
        return [(0, n)]
    count = 1 + math.ceil((n - length) / stride)
    spans = [(i * stride, i * stride + length) for i in range(count - 1)]
    return spans + [(n - length, n)]


def window_examples(doc: list[int], cfg: DataConfig) -> list[Example]:
    """L_input = Σ_k L_LM(x_{l_k..r_k}): every token of every window is a target."""
    return [Example(doc[a:b], doc[a:b]) for a, b in window_spans(len(doc), cfg.window, cfg.step)]


# ----------------------------------------------------------------------------- prompts shared by training and answering
def truncate_middle(doc: list[int], budget: int, tok) -> str:
    """The ICL view of a document: its first budget/2 and last budget/2 tokens with "..." between.
    (Released code: 7800-token budget -> first 3900 and last 3900.) Returns text."""
    if len(doc) <= budget:
        return tok.decode(doc)
    head, tail = budget // 2, budget - budget // 2
    return tok.decode(doc[:head]) + "\n...\n" + tok.decode(doc[len(doc) - tail:])


def question_messages(question: str, context_text: Optional[str]) -> list[dict]:
    """The chat turn for a question, with or without (a truncated copy of) the document."""
    if context_text is None:
        content = f"Answer the question briefly.\nQuestion: {question}"
    else:
        content = f"{context_text}\n\nAnswer the question about the text above briefly.\nQuestion: {question}"
    return [{"role": "user", "content": content}]


def qa_example(tok, question: str, answer: str, context_text: Optional[str]) -> Example:
    """A QA pair in the chat format; labels cover the answer tokens and the end-of-turn token."""
    messages = question_messages(question, context_text)
    prompt_ids = tok.encode_chat(messages, add_generation_prompt=True)
    full = tok.encode_chat(messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    if full[:len(prompt_ids)] != prompt_ids:
        raise DataError("the chat template does not render the reply after the generation prompt")
    reply_ids = full[len(prompt_ids):]
    # Keep the reply up to and including its end-of-turn token; what follows (a newline) is not ours.
    end = next((i for i, t in enumerate(reply_ids) if t in tok.stop_ids), len(reply_ids) - 1)
    reply_ids = reply_ids[:end + 1]
    return Example(prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids, kind="qa")


def end_of_turn(tok) -> int:
    """The token that closes an assistant turn in this chat template (<|im_end|> for SmolLM2)."""
    reply = qa_example(tok, "?", "x", None)
    return reply.input_ids[-1]


RECITE = "\n\nGiven the context above, recite the following segment of the text.\n"


def ct_prefix(doc: list[int], cfg: DataConfig, tok, rng: random.Random) -> list[int]:
    """The CT prefix of one document: a head span and a tail span (cfg.ct_prefix tokens in all,
    split at a random point drawn once per document), then the recite instruction."""
    head = rng.randint(0, cfg.ct_prefix)
    tail = cfg.ct_prefix - head
    return tok.encode(tok.decode(doc[:head]) + "\n...\n" + tok.decode(doc[len(doc) - tail:] if tail else []) + RECITE)


def contextualized_example(doc: list[int], span: tuple[int, int], prefix: list[int]) -> Example:
    """CT: [head span][...][tail span][instruction][window]; loss on the window only."""
    a, b = span
    return Example(prefix + doc[a:b], [IGNORE] * len(prefix) + doc[a:b])


# ----------------------------------------------------------------------------- anchors (our extension)
ANCHORS = Path(__file__).resolve().parent / "examples"


def anchor_questions() -> list[str]:
    """The general questions and instructions of the anchor (examples/anchor_prompts.txt)."""
    return [p for p in (ANCHORS / "anchor_prompts.txt").read_text(encoding="utf-8").splitlines() if p.strip()]


def anchor_prompts(tok, form: str = "chat") -> list[list[int]]:
    """The general prompts of the anchor, each ending where the assistant's reply begins: as a
    plain chat turn ("chat"), or in the prompt a user's question is asked in without the document
    ("question", question_messages), so that they differ from its questions only in the subject."""
    return [tok.encode_chat([{"role": "user", "content": p}] if form == "chat" else question_messages(p, None))
            for p in anchor_questions()]


def anchor_texts_hash() -> str:
    """Changes whenever the anchor's text changes (part of the adapter cache key)."""
    blob = b"".join((ANCHORS / f).read_bytes() for f in ("gpl-3.0.txt", "anchor_prompts.txt"))
    return hashlib.sha256(blob).hexdigest()[:16]


def anchor_examples(tok, replies: Optional[list[list[int]]] = None, length: int = 128, form: str = "chat") -> list[Example]:
    """Text that has nothing to do with any absorbed document: windows of the GNU GPL v3 and
    general prompts (anchor_prompts, in the given form), alternating; each prompt followed by the
    frozen base model's own reply (`replies`, one per prompt, from distill.base_replies), so that
    the positions where the model *answers* are anchored too, not only the question. Not in the paper: the KL anchor
    (anchor.anchor_loss) asks the adapted model to predict them exactly as the base model does,
    which is what teaches the gate to stay shut where the document does not help.
    kind "anchor": the KL counts every position; labels are IGNORE over a prompt, to mark where
    the base's reply starts (eval.py gates measures the gate on the two apart)."""
    text = tok.encode((ANCHORS / "gpl-3.0.txt").read_text(encoding="utf-8"))
    windows = [text[a:b] for a, b in window_spans(len(text), length, length)]
    prompts = anchor_prompts(tok, form)
    if replies is not None:
        if len(replies) != len(prompts):
            raise DataError(f"{len(replies)} anchor replies for {len(prompts)} anchor prompts")
    chats = [Example(p + r, [IGNORE] * len(p) + r, kind="anchor") for p, r in zip(prompts, replies or [[]] * len(prompts))]
    texts = [Example(ids, ids, kind="anchor") for ids in windows]
    return [x for pair in zip(texts, chats) for x in pair] + texts[len(chats):] + chats[len(texts):]


# ----------------------------------------------------------------------------- QA files
def read_jsonl(path: str):
    """(line number, JSON object) for every non-blank line of a JSONL file; an unreadable file or
    a malformed line is a DataError naming the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text ({e})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {i}: expected a JSON object")
        yield i, rec


def read_qa_jsonl(path: str) -> list[dict]:
    """{"question": ..., "answer": ...} per line; a malformed line is an error naming the line."""
    pairs = []
    for i, rec in read_jsonl(path):
        if not all(isinstance(rec.get(k), str) and rec[k].strip() for k in ("question", "answer")):
            raise DataError(f"{path}, line {i}: expected non-empty \"question\" and \"answer\" strings")
        pairs.append({"question": rec["question"], "answer": rec["answer"]})
    return pairs


def sentences(text: str) -> list[str]:
    """A plain sentence splitter: enough to cut the document into passages for QA synthesis."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


# ----------------------------------------------------------------------------- the mix and the schedule
def batches(examples: list[Example], size: int, prompted: int = 1) -> list[list[Example]]:
    """An epoch's examples (already shuffled) in forward-pass batches of `size`. With prompted > 1,
    the examples that begin with the answer-time prompt (QA pairs, self-study questions: every
    kind but "window") go `prompted` at a time instead, each batch placed where its first example
    fell, so that lift.batch_loss runs their shared truncated document once per batch; questions
    asked without the document ("closed") are batched apart, as they share no document."""
    if prompted == 1:
        return [examples[i:i + size] for i in range(0, len(examples), size)]
    out, filling = [], {}                       # filling: the open batch of each group
    for ex in examples:
        group = ex.kind if ex.kind in ("window", "closed") else "prompted"
        if group not in filling:
            filling[group] = []
            out.append(filling[group])
        filling[group].append(ex)
        if len(filling[group]) == (size if group == "window" else prompted):
            del filling[group]
    return out


SHARED_MIN = 16     # a shorter common start (the chat template's first tokens) is not worth a pass


def shared_prompt(examples: list[Example]) -> int:
    """How many leading tokens the batch's examples share before any of them needs a logit: the
    truncated document in front of every QA and self-study example (0 for windows, whose every
    position is predicted, and for a batch of one). Position t predicts token t + 1, so the
    prefix stops before each example's first labelled token, and each keeps a token of its own."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    n = min(len(ex.input_ids) for ex in examples) - 1
    for ex in examples:
        labelled = next((i for i, l in enumerate(ex.labels) if l != IGNORE), len(ex.labels))
        same = next((i for i, (a, b) in enumerate(zip(first, ex.input_ids)) if a != b), len(first))
        n = min(n, labelled - 1, same)
    return n if n >= SHARED_MIN else 0


def build_epochs(doc: list[int], qa: list[dict], epochs: int, cfg: DataConfig, tok, seed: int,
                 distilled: list[Example] = ()) -> list[list[Example]]:
    """The released schedule: epochs on windows only, then windows + QA (if any), each epoch in a
    seeded random order. QA examples carry the truncated document as at test time. `distilled`
    (distill.py's examples, already built) join the mix at the same epoch as the QA pairs."""
    if (qa or distilled) and epochs <= cfg.qa_start_epoch:
        raise DataError(f"{len(qa) + len(distilled)} question examples would never be trained on: --epochs {epochs} "
                        f"ends before --qa-start-epoch {cfg.qa_start_epoch}; raise --epochs or lower --qa-start-epoch")
    rng = random.Random(seed)
    spans = window_spans(len(doc), cfg.window, cfg.step)
    context_text = truncate_middle(doc, cfg.context, tok)
    qa_examples = [qa_example(tok, p["question"], p["answer"], context_text) for p in qa]
    prefix = ct_prefix(doc, cfg, tok, rng) if cfg.contextualized else None
    plan = []
    for epoch in range(epochs):
        if prefix is not None:
            items = [contextualized_example(doc, s, prefix) for s in spans]
        else:
            items = window_examples(doc, cfg)
        if epoch >= cfg.qa_start_epoch:
            items = items + qa_examples + list(distilled)
        rng.shuffle(items)
        plan.append(items)
    return plan
