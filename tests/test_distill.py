"""Context distillation (distill.py, our extension): names, the teacher's targets, the KL loss."""
import pytest
import torch

from conftest import TEXT
import gated_memory as gm
import lora
from checkpoint import load_model
from data import IGNORE, DataConfig, build_epochs, question_messages, truncate_middle
from distill import QUESTION, REPLY_TOKENS, distill_examples, names, teacher_example
from lift import TrainConfig, batch_loss


def test_names_keep_proper_names_and_drop_capitalised_ordinary_words():
    text = ("The mill was built by Edric Hallowmere in the spring. In winter the river froze. "
            "Hallowmere sold it to the Seven Sisters Guild. the end of the mill came late.")
    assert names(text) == ["Edric Hallowmere", "Seven Sisters Guild"]   # "The", "In" are ordinary words


def test_teacher_reads_the_passage_and_the_student_sees_the_answer_time_prompt(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    doc = tok.encode(TEXT)
    passage, context = tok.decode(doc[:40]), truncate_middle(doc, 48, tok)
    ex = teacher_example(model, tok, QUESTION.format("Fox"), passage, context, "float32")
    s_prompt = tok.encode_chat(question_messages(QUESTION.format("Fox"), context))
    reply = ex.input_ids[len(s_prompt):]
    assert ex.input_ids[:len(s_prompt)] == s_prompt and ex.kind == "distill"
    assert ex.labels == [IGNORE] * len(s_prompt) + reply and len(reply) >= 1
    # The targets are the base model's own distributions, reading the passage, at each reply token.
    t_prompt = tok.encode_chat(question_messages(QUESTION.format("Fox"), passage))
    with torch.no_grad():
        logits = model(torch.tensor([t_prompt + reply]))[0, len(t_prompt) - 1:-1]
    assert ex.teacher.shape == (len(reply), model.cfg.vocab_size)
    torch.testing.assert_close(ex.teacher.float(), logits.log_softmax(-1), atol=0.01, rtol=0.01)   # stored in bf16


def test_distillation_loss_is_kl_zero_for_the_base_on_the_teachers_prompt_and_falls_with_training(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    doc = tok.encode(TEXT)
    passage = tok.decode(doc[:40])
    same = teacher_example(model, tok, QUESTION.format("Fox"), passage, passage, "float32")   # student = teacher
    lora.attach(model, lora.LoRAConfig(rank=2), seed=0)                                     # B = 0: the base
    loss, n = batch_loss(model, [same], TrainConfig(dtype="float32"))
    assert n == len(same.teacher) and loss.item() == pytest.approx(0.0, abs=2e-3 * n)      # bf16 targets
    lora.remove(model)
    cfg = DataConfig(window=32, context=48, distill=3)
    examples = distill_examples(model, tok, doc, cfg, "float32")
    assert 2 <= len(examples) <= 3 + 1 and all(ex.teacher is not None for ex in examples)
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    train = TrainConfig(dtype="float32", lr=1e-2)
    before = sum(batch_loss(model, [ex], train)[0].item() for ex in examples)
    assert before > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(20):
        for ex in examples:
            batch_loss(model, [ex], train)[0].backward()
            opt.step()
            opt.zero_grad()
    assert sum(batch_loss(model, [ex], train)[0].item() for ex in examples) < 0.5 * before


def test_distilled_examples_join_the_schedule_with_the_qa_pairs(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    doc = tok.encode(TEXT)
    cfg = DataConfig(window=32, context=48, distill=2, qa_start_epoch=1)
    examples = distill_examples(model, tok, doc, cfg, "float32")
    plan = build_epochs(doc, [], 3, cfg, tok, seed=0, distilled=examples)
    assert [sum(ex.kind == "distill" for ex in epoch) for epoch in plan] == [0, len(examples), len(examples)]


def test_each_name_is_answered_with_the_documents_own_sentence_and_unrelated_questions_anchor_icl(tiny_dir):
    from data import anchor_questions, end_of_turn
    model, tok = load_model(str(tiny_dir))
    text = ("the valley was quiet. " * 6 + "The bell of the town was cast by Ysolde Parrin in 1743. "
            + "the river was slow. " * 6)
    doc = tok.encode(text)
    cfg = DataConfig(window=64, context=32, distill=2)
    examples = distill_examples(model, tok, doc, cfg, "float32")
    named = [ex for ex in examples if QUESTION.format("Ysolde Parrin") in tok.decode(ex.input_ids)]
    assert len(named) == 1
    n = len(named[0].teacher)
    sentence = tok.encode("The bell of the town was cast by Ysolde Parrin in 1743.")
    assert named[0].input_ids[-n:] == sentence[:REPLY_TOKENS] + [end_of_turn(tok)]       # cut if long
    # The other example: an unrelated question, with the truncated document for teacher and student alike.
    other = [ex for ex in examples if ex is not named[0]]
    assert len(other) == 1 and anchor_questions()[0] in tok.decode(other[0].input_ids)
    assert truncate_middle(doc, 32, tok) in tok.decode(other[0].input_ids)
