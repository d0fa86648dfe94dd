"""Auxiliary QA pairs written by the model itself (arXiv 2502.14644 §3.2, "AT").

The released recipe: for each of n random passages of ~16 consecutive sentences, ask an
instruction model for a Question / Answer / Evidence triple and keep it only if the evidence
appears verbatim in the passage (a few attempts per passage). Departures: the released runs used a
separate, larger instruction model (greedy, up to 1,024 new tokens); here the base model itself
writes the pairs, sampled at temperature 0.7 with a fresh seed per attempt (greedy decoding would
repeat the same failed triple), up to 96 new tokens. Pairs are written before any adapter is
attached, so they come from the base model.
"""
from __future__ import annotations

import random
import re
from typing import Optional

from compute import autocast
from data import sentences
from model import generate

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
