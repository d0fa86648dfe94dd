"""Self-study questions and the answer-time anchor (study.py, distill.py; our extension): names, the
quoted answers, the teacher's targets, the KL loss and the schedule."""
import pytest
import torch

from conftest import TEXT
import gated_memory as gm
import lora
from checkpoint import load_model
from data import IGNORE, DataConfig, anchor_questions, build_epochs, end_of_turn, question_messages, truncate_middle
from distill import distill_examples, teacher_example
from lift import TrainConfig, batch_loss
from study import QUESTION, REPLY, names, statements


def test_names_keep_proper_names_and_drop_capitalised_ordinary_words():
    text = ("The mill was built by Edric Hallowmere in the spring. In winter the river froze. "
            "Hallowmere sold it to the Seven Sisters Guild. the end of the mill came late.")
    assert names(text) == ["Edric Hallowmere", "Seven Sisters Guild"]   # "The", "In" are ordinary words
    assert statements(text, 5)[1] == ("Seven Sisters Guild", "Hallowmere sold it to the Seven Sisters Guild.")


def test_teacher_target_is_the_base_models_own_reply_and_distribution(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    context = truncate_middle(tok.encode(TEXT), 48, tok)
    ex = teacher_example(model, tok, "Name a colour.", context, "float32")
    prompt = tok.encode_chat(question_messages("Name a colour.", context))
    reply = ex.input_ids[len(prompt):]
    assert ex.input_ids[:len(prompt)] == prompt and ex.kind == "distill"
    assert ex.labels == [IGNORE] * len(prompt) + reply and len(reply) >= 1
    with torch.no_grad():
        logits = model(torch.tensor([ex.input_ids]))[0, len(prompt) - 1:-1]
    assert ex.teacher.shape == (len(reply), model.cfg.vocab_size)
    torch.testing.assert_close(ex.teacher.float(), logits.log_softmax(-1), atol=0.01, rtol=0.01)   # stored in bf16
    assert all(t == int(l.argmax()) for t, l in zip(reply[:-1], logits))     # greedy: the teacher's own path


def test_kl_is_zero_for_the_base_positive_for_an_adapter_and_falls_with_training(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    context = truncate_middle(tok.encode(TEXT), 48, tok)
    examples = [teacher_example(model, tok, q, context, "float32") for q in ("Name a colour.", "Count to three.")]
    lora.attach(model, lora.LoRAConfig(rank=2), seed=0)                          # B = 0: exactly the base
    loss, n = batch_loss(model, examples[:1], TrainConfig(dtype="float32"))
    assert n == len(examples[0].teacher) and loss.item() == pytest.approx(0.0, abs=2e-3 * n)   # bf16 targets
    lora.remove(model)
    gm.attach(model, gm.GatedMemoryConfig(init_std=0.3), seed=0)                # far from the base
    train = TrainConfig(dtype="float32")
    before = sum(batch_loss(model, [ex], train)[0].item() for ex in examples)
    assert before > 0.01
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        for ex in examples:
            batch_loss(model, [ex], train)[0].backward()
            opt.step()
            opt.zero_grad()
    assert sum(batch_loss(model, [ex], train)[0].item() for ex in examples) < 0.5 * before


def test_each_name_is_answered_by_quoting_the_document_and_unrelated_questions_anchor_icl(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    text = "the valley was quiet. " * 6 + "The bell was cast by Ysolde Parrin. " + "the river was slow. " * 6
    doc = tok.encode(text)
    cfg = DataConfig(window=64, context=32, distill=2)
    examples = distill_examples(model, tok, doc, cfg, "float32")
    assert [ex.kind for ex in examples] == ["qa", "distill"]
    named, other = examples
    answer = tok.encode(REPLY.format("The bell was cast by Ysolde Parrin.")) + [end_of_turn(tok)]
    assert named.input_ids[-len(answer):] == answer and named.labels[-len(answer):] == answer   # cross-entropy
    assert QUESTION.format("Ysolde Parrin") in tok.decode(named.input_ids)
    assert truncate_middle(doc, 32, tok) in tok.decode(named.input_ids)          # as LIFT+ICL will ask it
    assert anchor_questions()[0] in tok.decode(other.input_ids) and other.teacher is not None
    assert truncate_middle(doc, 32, tok) in tok.decode(other.input_ids)


def test_self_study_examples_join_the_schedule_with_the_qa_pairs(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    doc = tok.encode(TEXT)
    cfg = DataConfig(window=32, context=48, distill=2, qa_start_epoch=1)
    examples = distill_examples(model, tok, doc, cfg, "float32")
    plan = build_epochs(doc, [], 3, cfg, tok, seed=0, distilled=examples)
    assert [sum(any(e is ex for e in epoch) for ex in examples) for epoch in plan] == [0, len(examples), len(examples)]


def test_recall_counts_the_self_study_questions_answered_with_their_sentence(monkeypatch):
    import distill
    text = "the valley was quiet. The bell was cast by Ysolde Parrin. The mill belonged to Edric Hallowmere."
    tok = type("Tok", (), {"decode": staticmethod(lambda ids: text)})()
    said = {"Ysolde Parrin": 'The text says: "The bell was cast by Ysolde Parrin."', "Edric Hallowmere": "I do not know."}
    monkeypatch.setattr(distill, "answer", lambda m, t, q, d, **k: next(v for n, v in said.items() if n in q))
    assert distill.recalled(None, tok, [1], DataConfig(distill=4), "float32") == [
        (QUESTION.format("Ysolde Parrin"), True), (QUESTION.format("Edric Hallowmere"), False)]


def test_recall_of_a_blanked_number_needs_the_whole_number(monkeypatch):
    """--study cloze: the blank "___ barrels" (86) is not recalled by a reply that says 1,860."""
    import distill
    text = "the valley was quiet. The cellar held 86 barrels of cider."
    tok = type("Tok", (), {"decode": staticmethod(lambda ids: text)})()
    cfg = DataConfig(distill=4, study="cloze")
    for reply, hit in [("It held 1,860 barrels.", False), ("It held 86 barrels.", True)]:
        monkeypatch.setattr(distill, "answer", lambda m, t, q, d, **k: reply)
        assert distill.recalled(None, tok, [1], cfg, "float32") == [
            ('Fill in the blank from the text: "The cellar held ___ barrels of cider."', hit)]


def test_a_mixed_batch_sums_each_examples_own_loss(tiny_dir):
    """Cross-entropy and KL examples in one padded batch: the loss is the sum of their own losses."""
    from data import Example
    model, tok = load_model(str(tiny_dir))
    ids = tok.encode(TEXT)[:30]
    window = Example(ids, ids)
    taught = teacher_example(model, tok, "Name a colour.", truncate_middle(tok.encode(TEXT), 48, tok), "float32")
    gm.attach(model, gm.GatedMemoryConfig(init_std=0.3), seed=0)
    cfg = TrainConfig(dtype="float32")
    together, n = batch_loss(model, [window, taught], cfg)
    alone = [batch_loss(model, [ex], cfg) for ex in (window, taught)]
    assert n == alone[0][1] + alone[1][1]
    assert together.item() == pytest.approx(alone[0][0].item() + alone[1][0].item(), rel=1e-4)


def test_cloze_blanks_each_name_and_whole_number_in_its_first_sentence():
    from study import BLANK, CLOZE, study_pairs
    text = ("In 1724 the mill was built by Edric Hallowmere. It held 86 sacks. "
            "In 1,860 days Hallowmere sold it for 800 crowns. It closed in part 2 of the story.")
    pairs = study_pairs(text, DataConfig(distill=10, study="cloze"))
    assert [reply for _, reply, _ in pairs] == ["1724", "Edric Hallowmere", "86", "1,860", "800"]   # no "2"
    assert pairs[0][0] == CLOZE.format(f"In {BLANK} the mill was built by Edric Hallowmere.")
    assert pairs[2][0] == CLOZE.format(f"It held {BLANK} sacks.")            # not the "86" of "1,860"
    assert all(q.count(BLANK) == 1 and reply not in q for q, reply, _ in pairs)
    quoted = study_pairs(text, DataConfig(distill=10))                          # the default asks the other way
    assert quoted == [(QUESTION.format("Edric Hallowmere"), REPLY.format("In 1724 the mill was built by Edric Hallowmere."),
                       "In 1724 the mill was built by Edric Hallowmere")]
    assert study_pairs(text, DataConfig(distill=10, study="both")) == quoted + pairs   # each fact both ways


def test_a_heading_is_no_statement_to_study():
    from study import study_pairs
    text = ("Chapter 10. The Railway\n\nIn 1862 the Railway reached Vellmora. "
            "Chapter 11. Definitions.\n\nThe Definitions of the guild filled 40 pages.")
    blanked = [q for q, _, _ in study_pairs(text, DataConfig(distill=10, study="cloze"))]
    assert blanked and not any("Chapter" in q for q in blanked)               # not "Chapter ___."
    quoted = study_pairs(text, DataConfig(distill=10))
    assert (QUESTION.format("Definitions"), REPLY.format("The Definitions of the guild filled 40 pages."),
            "The Definitions of the guild filled 40 pages") in quoted            # its sentence, not the heading


def test_the_study_direction_is_in_the_cache_key_only_when_it_is_not_the_default():
    from cache import learning_settings
    assert "study" not in learning_settings(DataConfig())                       # older adapters keep their keys
    assert learning_settings(DataConfig(study="cloze"))["study"] == "cloze"
    assert learning_settings(DataConfig(study="both"))["study"] == "both"
    with pytest.raises(ValueError, match="--study"):
        DataConfig(study="all")


def test_keys_point_each_names_number_and_rare_word_at_its_first_sentence_in_turning_phrasings():
    import study
    from study import KEY_QUESTIONS, keys, study_pairs
    text = ("The first frost warden of the town was a soldier named Ilan Brask in 1744. "
            "The warden kept a thermometer on the roof of the town hall. "
            "The town band of the town was founded by Ferdinand Oakes. "
            "The town held a feast every year.")
    found = dict(keys(text))
    first, second, third = study.sentences(text)[:3]
    assert found["Ilan Brask"] == found["1744"] == found['"soldier"'] == first     # its first sentence only
    assert found['"thermometer"'] == second and found["Ferdinand Oakes"] == third
    assert '"town"' not in found and '"warden"' not in found   # in all four sentences; past the first four keys
    per_sentence = [sum(s == t for s in found.values()) for t in study.sentences(text)]
    assert max(per_sentence) <= study.KEYS_PER_SENTENCE and all(per_sentence[:3])
    pairs = study_pairs(text, DataConfig(distill=100, study="keys"))
    assert len(pairs) == len(found)
    assert [q for q, _, _ in pairs[:2]] == [KEY_QUESTIONS[0].format(keys(text)[0][0]),
                                            KEY_QUESTIONS[1].format(keys(text)[1][0])]    # the phrasings in turn
    assert all(reply == REPLY.format(s) and s.startswith(expected) for (_, reply, expected), (_, s) in zip(pairs, keys(text)))
    assert len(study_pairs(text, DataConfig(distill=3, study="keys"))) == 3            # --distill N caps them


def test_the_key_study_changes_the_cache_key(tiny_dir):
    from cache import settings_key
    from lift import TrainConfig as T
    model, tok = load_model(str(tiny_dir))
    key = lambda study: settings_key(model, tok, DataConfig(distill=8, study=study), gm.GatedMemoryConfig(), T(), [], 0, None)
    assert len({key("quote"), key("cloze"), key("keys"), key("phrases"), key("clauses")}) == 5


def test_keys_of_equal_rarity_come_in_the_sentences_order_whatever_the_hash_seed():
    import subprocess
    import sys
    from pathlib import Path
    from study import keys
    text = "The sundial stood beside the orchard gate. The gate was old. The orchard was older than the gate."
    assert [k for k, _ in keys(text)][:3] == ['"sundial"', '"beside"', '"stood"']   # rarer and longer first, then in order
    root = Path(__file__).resolve().parents[1]
    run = lambda seed: subprocess.run([sys.executable, "-c", "import study, json; from benchmarks import read_benchmark; "
                                       "print(json.dumps([study.keys(d['document']) for d in read_benchmark('examples/real_docs.jsonl')]))"],
                                      cwd=root, capture_output=True, text=True, env={"PYTHONHASHSEED": seed, "PATH": ""},
                                      check=True).stdout
    assert run("1") == run("2")                  # string hashing (set order) no longer picks a run's keys


def test_phrases_ask_each_key_among_its_own_words_and_point_back_at_their_sentence():
    from study import KEY_QUESTIONS, asked_key, key_sentence, keys, phrase, sentences, study_pairs
    sentence = 'The contents of the "NOTICE" file are for informational purposes only.'
    assert phrase('"contents"', sentence) == "The contents of the"
    assert phrase("NOTICE", sentence) == "of the NOTICE file are"                  # its quotes dropped
    assert phrase('"absent"', sentence) == "absent"                               # not in it: the key alone
    text = sentence + " The NOTICE file may hold an attribution notice. The file format is plain text."
    keyed, phrased = (study_pairs(text, DataConfig(distill=100, study=s)) for s in ("keys", "phrases"))
    assert [r for _, r, _ in phrased] == [r for _, r, _ in keyed]                 # the same sentences, in order
    assert phrased[0][0] == KEY_QUESTIONS[0].format(phrase(keys(text)[0][0], sentences(text)[0]))
    for study in (keyed, phrased):                                               # each question finds its sentence
        assert [key_sentence(asked_key(q), text) for q, _, _ in study] == [s for _, s in keys(text)]
    assert asked_key("Where is the file?") is None


def test_clauses_answer_each_phrase_from_its_clause_not_its_sentences_start():
    from study import CLAUSE_WORDS, clause, study_pairs
    sentence = ("Each Contributor grants to You a perpetual, worldwide, non-exclusive, no-charge, royalty-free, "
                "irrevocable license to reproduce the Work, except as stated in this section (excluding all registered trademarks).")
    assert clause('"irrevocable"', sentence).startswith("no-charge, royalty-free, irrevocable")   # its phrase, after a comma
    assert clause('"reproduce"', sentence).startswith("irrevocable license to reproduce")      # the comma before its phrase
    assert clause('"trademarks"', sentence).startswith("(excluding all registered")             # a bracket opens one
    assert clause("Each", sentence).startswith("Each Contributor")                            # the sentence's start
    words = " ".join(f"word{i}" for i in range(80)) + "."                   # no mark: from the phrase itself
    assert clause('"word40"', words).split()[0] == "word38" and len(clause('"word40"', words).split()) == CLAUSE_WORDS
    text = sentence + " The NOTICE file may hold an attribution notice. The file format is plain text."
    phrased, clauses = (study_pairs(text, DataConfig(distill=100, study=s)) for s in ("phrases", "clauses"))
    assert [q for q, _, _ in clauses] == [q for q, _, _ in phrased]              # the same questions
    assert all(c in s for (_, _, c), (_, _, s) in zip(clauses, phrased))   # each reply a part of its sentence
    assert any(c != s for (_, _, c), (_, _, s) in zip(clauses, phrased))


def test_restated_replies_start_at_the_questions_own_words_and_continue_the_clause():
    """--reply restate: each reply is its clause from the asked phrase on, so its first words are
    the question's; a key its statement does not hold keeps the statement whole."""
    from cache import learning_settings
    from study import asked_key, onward, study_pairs
    sentence = ("Each Contributor grants to You a perpetual, worldwide, non-exclusive, no-charge, royalty-free, "
                "irrevocable license to reproduce the Work, except as stated in this section (excluding all registered trademarks).")
    assert onward("royalty-free irrevocable license", sentence).startswith("royalty-free, irrevocable license to")  # commas aside
    assert onward("all registered", sentence) == "all registered trademarks)."                 # a bracket aside
    assert onward("Irrevocable", sentence) == sentence and onward("", sentence) == sentence     # case counts; no key
    text = sentence + " The NOTICE file may hold an attribution notice. The file format is plain text."
    clauses, restated = (study_pairs(text, DataConfig(distill=100, study="clauses", reply=r)) for r in ("plain", "restate"))
    assert [q for q, _, _ in restated] == [q for q, _, _ in clauses]            # the same questions
    for (q, plain, _), (_, reply, expected) in zip(clauses, restated):
        first = asked_key(q).split()[0].strip('"')
        assert plain.endswith(reply) and reply.split()[0].strip('",()') == first and reply.rstrip(".") == expected
    assert any(r != p for (_, p, _), (_, r, _) in zip(clauses, restated))       # some clauses start before their phrase
    assert learning_settings(DataConfig(distill=2, reply="restate"))["reply"] == "restate"


def test_route_asks_the_study_question_on_the_longest_rare_key_the_users_question_holds():
    from study import asked_key, key_sentence, route, study_pairs
    text = ("You must keep the NOTICE file intact. You may add a thermometer reading to it. "
            "You may not remove the Apache Software Foundation attribution. You owe nothing else.")
    cfg = DataConfig(distill=100, study="phrases", phrasings=2)
    asked = route("May I delete the apache software foundation attribution?", text, cfg)   # case and punctuation aside
    assert asked in [q for q, _, _ in study_pairs(text, cfg)][::2]                       # a first wording
    assert key_sentence(asked_key(asked), text).startswith("You may not remove")        # the longest key held
    assert route("What do You owe?", text, cfg) is None          # "You" is in four sentences: no address
    assert route("Where is the weather station?", text, cfg) is None
    assert asked_key(route("What reading may I add?", text, DataConfig(distill=100, study="keys"))) == "reading"


def test_phrasings_ask_each_quoted_fact_in_that_many_wordings_and_leave_cloze_alone():
    from study import CLOZE, KEY_QUESTIONS, keys, study_pairs
    text = "The mill was built in 1724 by Edric Hallowmere. the banker Ferdinand Oakes lent 3,000 silver crowns."
    one, three = (study_pairs(text, DataConfig(distill=10, phrasings=k)) for k in (1, 3))
    assert [q for q, _, _ in three[:3]] == [p.format("Edric Hallowmere") for p in KEY_QUESTIONS[:3]]
    assert len(three) == 3 * len(one) and {r for _, r, _ in three} == {r for _, r, _ in one}
    both = study_pairs(text, DataConfig(distill=10, study="both", phrasings=2))
    assert sum(q.startswith(CLOZE[:10]) for q, _, _ in both) == len(study_pairs(text, DataConfig(distill=10, study="cloze")))
    (k0, _), (k1, _) = keys(text)[:2]
    keyed = [q for q, _, _ in study_pairs(text, DataConfig(distill=100, study="keys", phrasings=2))]
    assert keyed[:4] == [KEY_QUESTIONS[0].format(k0), KEY_QUESTIONS[1].format(k0),    # each key: the next phrasings
                         KEY_QUESTIONS[1].format(k1), KEY_QUESTIONS[2].format(k1)]
    with pytest.raises(ValueError, match="--phrasings"):
        DataConfig(phrasings=7)
    from cache import learning_settings
    assert "phrasings" not in learning_settings(DataConfig()) and learning_settings(DataConfig(phrasings=2))["phrasings"] == 2


def test_closed_book_asks_every_study_question_again_without_the_document_and_batches_those_apart(tiny_dir):
    from cache import learning_settings
    from data import batches
    model, tok = load_model(str(tiny_dir))
    text = "the valley was quiet. " * 6 + "The bell was cast by Ysolde Parrin. " + "the river was slow. " * 6
    doc = tok.encode(text)
    cfg = DataConfig(window=64, context=32, distill=2, closed_book=True)
    examples = distill_examples(model, tok, doc, cfg, "float32")
    assert [ex.kind for ex in examples] == ["qa", "closed", "distill"]
    opened, closed, _ = examples
    answer = tok.encode(REPLY.format("The bell was cast by Ysolde Parrin.")) + [end_of_turn(tok)]
    assert closed.input_ids == tok.encode_chat(question_messages(QUESTION.format("Ysolde Parrin"), None)) + answer
    assert closed.labels[-len(answer):] == answer and truncate_middle(doc, 32, tok) not in tok.decode(closed.input_ids)
    assert opened.input_ids[-len(answer):] == answer                     # the LIFT+ICL form is still there
    grouped = batches([opened, closed, opened, closed], 1, prompted=2)
    assert [[ex.kind for ex in b] for b in grouped] == [["qa", "qa"], ["closed", "closed"]]
    assert "closed_book" not in learning_settings(DataConfig()) and learning_settings(cfg)["closed_book"] is True
    with pytest.raises(ValueError, match="--closed-book"):
        DataConfig(closed_book=True)                                     # nothing to ask again without --distill


def test_a_plain_reply_is_the_sentence_alone_and_changes_only_the_replies_and_the_cache_key(tiny_dir):
    """--reply plain answers a quoting question with the document's sentence as a user's answer
    reads ("The secret number … is 2390."), not quoted ('The text says: "…"'); questions, the
    expected words and the cloze answers stay; the key changes only when not at its default."""
    from cache import learning_settings, settings_key
    from study import study_pairs
    text = "The mill was built in 1724 by Edric Hallowmere. the banker Ferdinand Oakes lent 3,000 silver crowns."
    for study in ("quote", "keys", "both"):
        quoted, plain = (study_pairs(text, DataConfig(distill=10, study=study, phrasings=2, reply=r)) for r in ("quote", "plain"))
        assert [(q, e) for q, _, e in quoted] == [(q, e) for q, _, e in plain]
        for (q, r_quoted, expected), (_, r_plain, _) in zip(quoted, plain):
            if r_quoted != expected:                                   # a quoting question, not a blank
                assert r_quoted == REPLY.format(r_plain) and r_plain.startswith(expected) and r_plain.endswith(".")
    assert "reply" not in learning_settings(DataConfig()) and learning_settings(DataConfig(reply="plain"))["reply"] == "plain"
    model, tok = load_model(str(tiny_dir))
    key = lambda r: settings_key(model, tok, DataConfig(distill=8, reply=r), gm.GatedMemoryConfig(), TrainConfig(), [], 0, None)
    assert key("quote") != key("plain")
    with pytest.raises(ValueError, match="--reply"):
        DataConfig(reply="verbatim")


def test_study_unrelated_sets_how_many_general_questions_anchor_the_answer_time_prompt(tiny_dir):
    """--study-unrelated K: K of the anchor's prompts asked with the document in context (KL to the base's
    reply), instead of N/2; the key changes only when it is set, and a negative K is refused."""
    from cache import learning_settings
    model, tok = load_model(str(tiny_dir))
    doc = tok.encode("the valley was quiet. " * 6 + "The bell was cast by Ysolde Parrin. " + "the river was slow. " * 6)
    made = lambda **kw: [ex for ex in distill_examples(model, tok, doc, DataConfig(window=64, context=32, distill=2, **kw),
                                                       "float32") if ex.kind == "distill"]
    assert len(made()) == 1                                              # N/2 of --distill 2
    three = made(study_unrelated=3)
    assert [q in tok.decode(ex.input_ids) for ex, q in zip(three, anchor_questions())] == [True] * 3
    assert all(ex.teacher is not None for ex in three)                  # KL to the base's own reply
    assert "study_unrelated" not in learning_settings(DataConfig())
    assert learning_settings(DataConfig(distill=2, study_unrelated=3))["study_unrelated"] == 3
    with pytest.raises(ValueError, match="--study-unrelated"):
        DataConfig(distill=2, study_unrelated=-1)
    with pytest.raises(ValueError, match="--study-unrelated"):
        DataConfig(study_unrelated=3)                                          # nothing to sit beside without --distill


def test_studied_says_which_questions_a_study_reply_holds():
    from study import studied
    text = ("In 1724 the mill was built by Edric Hallowmere. It held 86 sacks of flour. "
            "Later the Town Council\n   sold it for 800 crowns.")
    questions = [{"question": "Who built the mill?", "answers": ["Edric Hallowmere"]},          # the first name's sentence
                 {"question": "How many sacks?", "answers": ["86"]},                            # no name: never studied
                 {"question": "For how much?", "answers": ["x"], "evidence": "Town Council sold it"},   # spaces aside
                 {"question": "Who sold it?", "answers": ["Town Council"], "evidence": "bought it"}]   # evidence wins
    assert studied(text, DataConfig(distill=10), questions) == [True, False, True, False]
    assert studied(text, DataConfig(distill=1), questions) == [True, False, False, False]     # one name studied


def test_studied_within_an_answers_budget_needs_the_answer_early_in_the_reply():
    from study import studied
    text = "The mill was built by Edric Hallowmere in the year when the river froze and the bells rang 1724."
    words = type("Tok", (), {"encode": staticmethod(str.split), "decode": staticmethod(" ".join)})()   # a token a word
    questions = [{"question": "Who built the mill?", "answers": ["Edric Hallowmere"]},        # words 6-7
                 {"question": "When?", "answers": ["1724"], "evidence": "the bells rang"}]     # the last word
    cfg = DataConfig(distill=10)
    assert studied(text, cfg, questions) == [True, True]                  # anywhere in the reply
    assert studied(text, cfg, questions, words, 10) == [True, False]      # `The text says: "The mill … in`
    assert studied(text, cfg, questions, words, 40) == [True, True]


def test_show_study_counts_how_often_one_reply_is_studied():
    from study import show_study
    text = "The mill of Edric Hallowmere stood by\n   the Long Pond. It held 86 sacks, and it was old."
    shown = show_study(text, DataConfig(distill=10, phrasings=3, reply="plain")).splitlines()
    assert shown[0] == "Q: " + QUESTION.format("Edric Hallowmere")
    assert shown[1] == "A: The mill of Edric Hallowmere stood by the Long Pond."        # on one line
    assert shown[-1] == f"6 questions, 1 distinct replies; the most studied reply is the answer to 6 of them: {shown[1][3:]}"


def test_study_sentences_asks_each_sentence_under_one_name_only():
    from study import study_pairs
    text = ("Edric Hallowmere built the mill for Anna Vell in 1724. The mill held 86 sacks for Anna Vell. "
            "The Long Pond fed the mill that Edric Hallowmere built.")
    quote = study_pairs(text, DataConfig(distill=10, reply="plain"))
    assert [r for _, r, _ in quote].count(text.split(" The mill")[0]) == 2     # two names, one sentence, asked twice
    once = study_pairs(text, DataConfig(distill=10, reply="plain", study="sentences"))
    assert once == [quote[0], (QUESTION.format("Long Pond"), text.split("sacks for Anna Vell. ")[1],
                               text.split("sacks for Anna Vell. ")[1].rstrip("."))]
    assert len(study_pairs(text, DataConfig(distill=1, study="sentences"))) == 1


def test_show_study_names_the_first_of_equally_studied_replies(monkeypatch):
    """Two replies asked equally often: the summary line names the first, so two runs print the same."""
    import study
    pairs = [("q1", "B.", "B"), ("q2", "A.", "A"), ("q3", "A.", "A"), ("q4", "B.", "B")]
    monkeypatch.setattr(study, "study_pairs", lambda text, cfg: pairs)
    assert study.show_study("", DataConfig()).endswith("the most studied reply is the answer to 2 of them: B.")
    monkeypatch.setattr(study, "study_pairs", lambda text, cfg: pairs[1:] + pairs[:1])
    assert study.show_study("", DataConfig()).endswith("2 of them: A.")
