"""Benchmark data for eval.py: file formats, generated long documents, needles, and metrics.

The paper evaluates LIFT on LooGLE and LongBench with a GPT-4 judge (arXiv 2502.14644 §4). Here:
  * our own JSONL format, one document per line:
        {"id": ..., "document": "..." | "document_path": "...",
         "questions": [{"question": ..., "answers": [...], "evidence_pos": 0.42}, ...]}
    (evidence_pos, optional, is where the evidence starts, as a fraction of the document's tokens);
  * LongBench's JSONL ({"context", "input", "answers"}), one question per line, grouped by context;
  * generated documents of invented facts at any length, each fact a question whose evidence
    position is known, so accuracy can be read against "inside or outside the ICL budget";
  * needle-in-a-haystack: one invented fact at depth d of a haystack of length L;
  * SQuAD-style metrics: exact match, token F1, and "answer contained".
Everything generated is deterministic under its seed. This file is separate from eval.py so that
the data can be read (and tested) without the runner and its plots.
"""
from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from pathlib import Path

from data import DataError, read_jsonl


# ----------------------------------------------------------------------------- metrics (SQuAD style)
def normalize(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, refs: list[str]) -> float:
    return float(any(normalize(pred) == normalize(r) for r in refs))


def token_f1(pred: str, refs: list[str]) -> float:
    def f1(p, r):
        p, r = normalize(p).split(), normalize(r).split()
        if not p or not r:
            return float(p == r)
        common = sum((Counter(p) & Counter(r)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(r)
        return 2 * precision * recall / (precision + recall)
    return max(f1(pred, r) for r in refs)


def contains(pred: str, refs: list[str]) -> float:
    """1 if some non-empty normalised reference appears, on word boundaries, in the prediction."""
    p = f" {normalize(pred)} "
    return float(any(normalize(r) and f" {normalize(r)} " in p for r in refs))


def score(pred: str, refs: list[str]) -> dict:
    return {"em": exact_match(pred, refs), "f1": token_f1(pred, refs), "contains": contains(pred, refs)}


# ----------------------------------------------------------------------------- reading files
# Readers are strict: a malformed line is an error naming the file and the line, raised before any
# training starts. (A skipped line, or a string "answers" scored one character at a time, would
# make a table silently wrong.)
class BenchmarkError(DataError):
    pass


def _question(rec: dict, where: str, q_key: str = "question") -> dict:
    """One question, its field types checked: a non-empty question string, a non-empty list of
    non-empty answer strings ("answer": a single string is accepted), evidence_pos in [0, 1]."""
    q = rec.get(q_key)
    refs = rec["answers"] if "answers" in rec else [rec.get("answer")]
    if not isinstance(q, str) or not q.strip():
        raise BenchmarkError(f"{where}: \"{q_key}\" must be a non-empty string")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, (str, int, float)) and str(r).strip()
                                                         for r in refs):
        raise BenchmarkError(f"{where}: \"answers\" must be a non-empty list of strings (or \"answer\": a string)")
    pos = rec.get("evidence_pos")
    if pos is not None and (isinstance(pos, bool) or not isinstance(pos, (int, float)) or not 0 <= pos <= 1):
        raise BenchmarkError(f"{where}: \"evidence_pos\" must be a number between 0 and 1")
    return {**{k: v for k, v in rec.items() if k not in (q_key, "answer")}, "question": q,
            "answers": [str(r) for r in refs]}


def in_budget(pos: float | None, n_tokens: int, context: int) -> bool | None:
    """Is evidence at fraction `pos` of the document inside the truncated (head + tail) view?"""
    if pos is None:
        return None
    t = pos * n_tokens
    return n_tokens <= context or t < context // 2 or t >= n_tokens - (context - context // 2)


def evidence_window(ids: list[int], pos: float, context: int) -> list[int]:
    """The `context` tokens of a document that hold a question's evidence: from a quarter of the
    budget before where the evidence starts (fraction `pos` of the tokens), moved back inside the
    document at its ends. eval.py's reading modes put it where ICL puts the head and tail: what
    the model answers when what it needs is in front of it. Not a ceiling for LIFT: a memory
    trained on the answer's own form can do better than the model's reading (results/NOTEBOOK.md,
    "What the model reads from the evidence itself")."""
    start = min(max(0, round(pos * len(ids)) - context // 4), max(0, len(ids) - context))
    return ids[start:start + context]


def read_benchmark(path: str) -> list[dict]:
    """Our format or LongBench's (detected per line), every line checked.
    Returns documents: {"id", "document", "questions": [{"question", "answers", "evidence_pos"?}]}."""
    docs: dict[str, dict] = {}
    base = Path(path).parent
    for i, rec in read_jsonl(path):
        where = f"{path}, line {i}"
        if "context" in rec:                                    # LongBench: one question per line
            if not isinstance(rec["context"], str) or not rec["context"].strip():
                raise BenchmarkError(f"{where}: \"context\" must be a non-empty string")
            q = _question({k: v for k, v in rec.items() if k != "context"}, where, q_key="input")
            doc = docs.setdefault(rec["context"], {"id": str(rec.get("_id", f"line{i}")), "document": rec["context"],
                                                   "questions": []})
            doc["questions"].append(q)
            continue
        text = rec.get("document")
        if text is None and isinstance(rec.get("document_path"), str):
            p = base / rec["document_path"]
            if not p.is_file():
                raise BenchmarkError(f"{where}: document_path {rec['document_path']} not found")
            text = p.read_text(encoding="utf-8")
        qs = rec.get("questions")
        if not isinstance(text, str) or not text.strip() or not isinstance(qs, list) or not qs:
            raise BenchmarkError(f"{where}: needs \"document\" (or \"document_path\") and a non-empty "
                                 f"\"questions\" list")
        if not all(isinstance(q, dict) for q in qs):
            raise BenchmarkError(f"{where}: every question must be an object")
        doc = {"id": str(rec.get("id", f"line{i}")), "document": text,
               "questions": [_question(q, f"{where}, question {k + 1}") for k, q in enumerate(qs)]}
        if isinstance(rec.get("train_questions"), list):
            doc["train_questions"] = [_question(q, f"{where}, train question {k + 1}")
                                      for k, q in enumerate(rec["train_questions"])]
        if any(d["id"] == doc["id"] for d in docs.values()):
            raise BenchmarkError(f"{where}: document id {doc['id']!r} is used twice")
        docs[doc["id"] + "\0" + str(i)] = doc
    if not docs:
        raise BenchmarkError(f"{path} holds no documents")
    return list(docs.values())


def read_questions(path: str) -> list[dict]:
    """One question per line: {"question", "answer" or "answers", "evidence_pos"?}, every line checked."""
    out = [_question(rec, f"{path}, line {i}") for i, rec in read_jsonl(path)]
    if not out:
        raise BenchmarkError(f"{path} holds no questions")
    return out


def locate_answer(tok, text: str, answers: list[str]) -> float | None:
    """Evidence position estimated as the first verbatim (case-sensitive) occurrence of a reference
    answer, as a fraction of the document's tokens; None if no answer occurs verbatim."""
    hits = [text.find(a) for a in answers if a and text.find(a) >= 0]
    return len(tok.encode(text[:min(hits)])) / len(tok.encode(text)) if hits else None


def write_benchmark(path: str, docs: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


# ----------------------------------------------------------------------------- generated documents
SYLLABLES = ["ka", "lo", "mir", "ten", "vos", "ral", "bek", "shi", "dun", "el", "gar", "po", "thes", "wyn", "ari", "cor"]
NOUNS = ["lantern", "compass", "violin", "clock", "tapestry", "telescope", "anchor", "mirror", "kettle", "banner"]
COLOURS = ["amber", "cobalt", "scarlet", "ivory", "jade", "violet", "copper", "silver"]
ANIMALS = ["heron", "badger", "falcon", "otter", "lynx", "tortoise", "raven", "hare"]
FILLER = [
    "The road followed the river for a while and then climbed slowly into the hills.",
    "Most days in the valley passed quietly, with work in the fields and talk in the evenings.",
    "Travellers often remarked on the smell of woodsmoke and the sound of the mill wheel.",
    "In winter the paths were covered with snow, and people stayed close to their stoves.",
    "The market was busy on feast days, when farmers came down from the upper pastures.",
    "Children played by the water while their parents mended nets and baskets.",
    "Old letters describe the weather, the harvests and the prices of bread and salt.",
    "Nobody could remember a year in which the swallows had not returned in spring.",
]


def invented_name(rng: random.Random, parts=2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def fact(rng: random.Random) -> tuple[str, str, str]:
    """One invented fact: (sentence, question, answer)."""
    person, town = f"{invented_name(rng)} {invented_name(rng, 3)}", invented_name(rng, 3)
    year, n, noun = rng.randint(1400, 1950), rng.randint(12, 9800), rng.choice(NOUNS)
    kind = rng.randrange(4)
    if kind == 0:
        return (f"{person} was born in the town of {town} in {year}.", f"In which year was {person} born?", str(year))
    if kind == 1:
        return (f"The {noun} of {town} was made by {person}.", f"Who made the {noun} of {town}?", person)
    if kind == 2:
        return (f"The harbour of {town} held exactly {n} boats at its largest.",
                f"How many boats did the harbour of {town} hold at its largest?", str(n))
    return (f"{person} moved to {town} and opened a shop that sold only {noun}s.",
            f"Where did {person} open a shop that sold only {noun}s?", town)


def filler_sentence(rng: random.Random) -> str:
    return rng.choice(FILLER)


def generate_facts_document(tok, n_tokens: int, n_questions: int, seed: int, n_train: int = 0) -> dict:
    """A document of ~n_tokens (by tok) of filler with n_questions + n_train invented facts spread
    evenly through it; each question records where its evidence starts (fraction of tokens). The
    n_train extra facts (every other one when n_train = n_questions) become "train_questions": QA
    pairs one may train on (auxiliary tasks) without ever seeing a test question."""
    rng = random.Random(seed)
    n_all = n_questions + n_train
    facts = [fact(rng) for _ in range(n_all)]
    targets = [(k + 0.5) / n_all for k in range(n_all)]             # evenly spread depths
    is_train = set(rng.sample(range(n_all), n_train))
    sentences, questions, train, total, k = [], [], [], 0, 0
    while total < n_tokens or k < n_all:
        if k < n_all and total >= targets[k] * n_tokens:
            s, q, a = facts[k]
            (train if k in is_train else questions).append({"question": q, "answers": [a], "evidence_token": total})
            k += 1
        else:
            s = filler_sentence(rng)
        n = len(tok.encode(" " + s))
        sentences.append(s)
        total += n
    for q in questions + train:
        q["evidence_pos"] = q.pop("evidence_token") / total
    return {"id": f"facts-{n_tokens}-{seed}", "document": " ".join(sentences), "questions": questions,
            "train_questions": train}


NEEDLE_QUESTION = "What is the secret number of the {colour} {animal}?"


def generate_needle(tok, n_tokens: int, depth: float, seed: int) -> dict:
    """Haystack of filler sentences of ~n_tokens; the needle sentence starts at `depth` (0..1) of it."""
    rng = random.Random(seed)
    colour, animal, number = rng.choice(COLOURS), rng.choice(ANIMALS), str(rng.randint(1000, 9999))
    needle = f"The secret number of the {colour} {animal} is {number}."
    sentences, total, placed, where = [], 0, False, 0
    while total < n_tokens or not placed:
        if not placed and total >= depth * n_tokens:
            s, placed, where = needle, True, total
        else:
            s = filler_sentence(rng)
        sentences.append(s)
        total += len(tok.encode(" " + s))
    return {"id": f"needle-{n_tokens}-{depth:.2f}-{seed}", "document": " ".join(sentences),
            "questions": [{"question": NEEDLE_QUESTION.format(colour=colour, animal=animal), "answers": [number],
                           "evidence_pos": where / total, "depth": depth}]}
