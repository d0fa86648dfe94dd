"""What the adapter learns beyond the document's windows: our extensions to LIFT (METHOD.md §9).

1. The anchor's replies (`base_replies`): the base model's own greedy reply to each general prompt
   of the KL anchor (anchor.anchor_loss), so that the adapter is asked to change nothing there.

2. Self-study questions and the answer-time anchor (`distill_examples`, --distill N).
   LIFT's windows teach the adapter to continue the document's text, and the anchor teaches it to
   change nothing on unrelated text. Neither shows it a question whose answer lies in the absorbed
   document, so the gate learns "does this look like the document?", not "does this query need
   the document?" (results/NOTEBOOK.md, "The method's quality"). Both kinds of examples below use
   the LIFT+ICL prompt, the truncated document then the question, exactly as at answer time:
     - the questions and replies of --study, written by rules from the text (study.py);
     - unrelated questions (N/2 of the anchor's prompts, or K of them with --study-unrelated K),
       answered with the base model's own greedy reply to that same prompt and trained with
       KL(base ‖ adapted) on it: LIFT+ICL should answer as ICL does wherever the absorbed document
       does not help.
   Not in arXiv 2502.14644. Why not the context distillation of "knowledge modules" (a teacher,
   the base model reading the passage, gives the target distribution): measured here, a 135M
   teacher asked an open question invents ("Kadunshi is a legendary figure in the Islamic world")
   even with the passage in front of it; and a teacher forced along a reply it would not write
   itself gives soft targets at the reply's first tokens, where the student, decoding greedily,
   leaves the trained path (the trained questions themselves went unanswered). KL is therefore
   kept only where the reply is the teacher's own greedy path.

The file sits above lift.py: cache.py calls it before lift.absorb, with no adapter attached.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
from tqdm import tqdm

from adapters import attached
from compute import autocast
from data import (IGNORE, DataConfig, Example, anchor_prompts, anchor_questions, end_of_turn, qa_example,
                  question_messages, truncate_middle)
from lift import answer
from model import generate
from study import mention, study_pairs

# --recipe NAME: several flags at once, for the command lines; a flag given explicitly still wins.
# "study" is what answered best with Gated Memory: each of up to 32 names studied in four wordings,
# answered as plain sentences, with and without the document, 8 questions a step, 10 epochs at lr
# 3e-3 (results/NOTEBOOK.md, "Gated Memory answers the generated facts"). It trains 5-6 times as
# long as the defaults. "paper" is the released recipe: the defaults without our KL anchor, and
# train.py answering without our switch (switch.py; eval.py answers without it unless asked).
RECIPES = {"study": dict(distill=32, phrasings=4, reply="plain", closed_book=True, qa_start_epoch=0,
                         qa_batch=8, epochs=10, lr=3e-3),
           "paper": dict(anchor=0.0, switch=False)}
RECIPE_HELP = ("several settings at once (a flag given explicitly still wins): " +
               "; ".join(f"{name}: " + " ".join(("--no-" if v is False else "--") + k.replace("_", "-")
                                                + ("" if isinstance(v, bool) else f" {v}")
                                            for k, v in flags.items()) for name, flags in RECIPES.items()))
STUDY_FORMAT = "names quoted (cross-entropy) + unrelated questions in context (KL)/2"   # in the cache key
REPLY_TOKENS = 48                  # a reply, at most: a quoted sentence, or the teacher's own answer


@torch.no_grad()
def teacher_example(model, tok, question: str, context: str, dtype: str) -> Example:
    """The base model's greedy reply r to `question` with `context`, and its log-probabilities at
    every token of r: the target that keeps the adapted model's reply to that prompt the base's."""
    device = model.tok_embeddings.weight.device
    prompt = tok.encode_chat(question_messages(question, context))
    with autocast(device, dtype):
        reply = generate(model, prompt, REPLY_TOKENS, stop_ids=tok.stop_ids)
        reply = reply + [end_of_turn(tok)] * (len(reply) < REPLY_TOKENS)   # it stopped: learn to stop too
        ids = torch.tensor([prompt + reply], device=device)                     # (1, P + R)
        logits = model(ids)[0, len(prompt) - 1:-1]                              # (R, V): predicting each reply token
    teacher = logits.float().log_softmax(-1).to(torch.bfloat16).cpu()       # (R, V), bf16 to halve the memory
    return Example(prompt + reply, [IGNORE] * len(prompt) + reply, kind="distill", teacher=teacher)


def distill_examples(model, tok, doc: list[int], cfg: DataConfig, dtype: str, progress: bool = False) -> list[Example]:
    """LIFT on `doc` gets cfg.distill questions about its names, each answered with the
    document's sentence (quoted, or plain with cfg.reply; cross-entropy, in the LIFT+ICL prompt),
    and half as many unrelated questions (or cfg.study_unrelated) asked with the truncated
    document in context, whose target is the base model's distribution on that same prompt (KL):
    the answer-time format's own anchor, so that LIFT+ICL answers as ICL does wherever the
    absorbed document does not help. With cfg.closed_book, every self-study question is also
    trained without the document, the prompt of LIFT alone. Call with no adapter attached: the
    teacher is the model as it is."""
    context = truncate_middle(doc, cfg.context, tok)
    pairs = study_pairs(tok.decode(doc), cfg)
    named = [qa_example(tok, question, reply, context) for question, reply, _ in pairs]
    if cfg.closed_book:          # the same questions in the prompt LIFT alone is asked in: no document
        named += [replace(qa_example(tok, question, reply, None), kind="closed") for question, reply, _ in pairs]
    unrelated = anchor_questions()[:cfg.study_unrelated or max(1, cfg.distill // 2)]
    return named + [teacher_example(model, tok, q, context, dtype)
                    for q in tqdm(unrelated, desc="anchor answers in context", disable=not progress, leave=False)]


def recalled(model, tok, doc: list[int], cfg: DataConfig, dtype: str) -> list[tuple[str, bool]]:
    """After LIFT with --distill: each of its own self-study questions, and whether the adapted
    model answers it (LIFT+ICL, greedy) with the quoted sentence or the blanked name. A
    training-fit check: a question it was trained on but cannot answer shows what the adapter did
    *not* store; one it answers while a user's question on the same fact fails shows a fact stored
    but not reached by the user's words. A blanked number counts only whole (`mention`)."""
    return [(question, bool(mention(expected, answer(model, tok, question, doc, mode="lift+icl", context=cfg.context,
                                                     max_new_tokens=REPLY_TOKENS, dtype=dtype))))
            for question, _, expected in study_pairs(tok.decode(doc), cfg)]


# ----------------------------------------------------------------------------- the anchor's replies
ANCHOR_REPLY_TOKENS = 24


@torch.no_grad()
def base_replies(model, tok, dtype: str, progress: bool = False, form: str = "chat") -> list[list[int]]:
    """The base model's own greedy reply to each anchor prompt (ending with its end-of-turn
    token when it stopped), for the KL anchor. Any adapter is switched off."""
    kind, out, eot = attached(model), [], end_of_turn(tok)
    with autocast(model.tok_embeddings.weight.device, dtype), (kind.disabled(model) if kind else nullcontext()):
        for prompt in tqdm(anchor_prompts(tok, form), desc="anchor replies", disable=not progress, leave=False):
            reply = generate(model, prompt, ANCHOR_REPLY_TOKENS, stop_ids=tok.stop_ids)
            out.append(reply + [eot] * (len(reply) < ANCHOR_REPLY_TOKENS))
    return out
