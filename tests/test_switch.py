"""--switch (switch.py): the gate, read once per question, decides whether Gated Memory answers at
all; when it does not, the reply is exactly the base model's."""
import json

import pytest
import torch

import gated_memory as gm
import lora
import switch
from checkpoint import load_model
from conftest import TEXT
from data import anchor_questions, truncate_middle
from lift import answer


def loud_memory(model):
    """A Gated Memory whose memory writes large values: its replies differ from the base model's."""
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    with torch.no_grad():
        for a in gm.adapters(model):
            a.mem_out.normal_(std=3.0)
    return gm.adapters(model)


def test_the_question_span_holds_the_question_in_both_prompts(tiny_dir):
    _, tok = load_model(str(tiny_dir))
    question = "Who came to the valley in 1743?"
    for context in (None, truncate_middle(tok.encode(TEXT), 48, tok)):
        ids, first, last = switch.question_span(tok, question, context)
        assert tok.decode(ids[first:last]).strip() == question
        assert last < len(ids)                            # the chat template's end follows it


@pytest.mark.real
def test_the_question_span_starts_at_the_questions_first_word_with_the_real_tokenizer(default_model):
    """SmolLM2's byte-level BPE joins the space after "Question:" to the question's first word."""
    _, tok = default_model
    for question in anchor_questions()[:8] + ["What is 2 + 2?"]:
        for context in (None, "Some text.\nMore of it."):
            ids, first, last = switch.question_span(tok, question, context)
            assert tok.decode(ids[first:last]).strip() == question
            assert tok.decode(ids[:first]).endswith("Question:")


def test_the_threshold_is_the_most_open_anchor_prompt_in_each_prompt_form(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    loud_memory(model)
    context = truncate_middle(tok.encode(TEXT), 48, tok)
    gates = [switch.question_gate(model, tok, q, context, "float32") for q in anchor_questions()]
    assert len(set(gates)) > 1                            # the prompts do open the gate differently
    assert switch.threshold(model, tok, context, "float32") == pytest.approx(max(gates), rel=1e-5)
    gates = [switch.question_gate(model, tok, q, None, "float32") for q in anchor_questions()]
    assert switch.threshold(model, tok, None, "float32") == pytest.approx(max(gates), rel=1e-5)   # via the shared prefix
    assert len(gm.adapters(model)[0].switch_thresholds) == 2                   # kept, one per prompt form


def test_a_question_below_the_threshold_gets_the_base_models_reply(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    doc = tok.encode(TEXT)
    memories = loud_memory(model)
    question = "What came to the valley?"
    ask = lambda mode, s=False: answer(model, tok, question, doc, mode=mode, context=48, max_new_tokens=8, switch=s)
    for mode, base_mode in (("lift", "closed"), ("lift+icl", "icl")):
        plain, base = ask(mode), ask(base_mode)
        assert plain != base                              # the memory changes this reply
        context = None if mode == "lift" else truncate_middle(doc, 48, tok)
        gate = switch.question_gate(model, tok, question, context, "float32")
        memories[0].switch_thresholds[switch.threshold_key(context, "float32")] = gate          # the question opens it no more than that
        assert ask(mode, True) == base and memories[0].switch_last["adapter_used"] is False
        memories[0].switch_thresholds[switch.threshold_key(context, "float32")] = gate - 1e-3   # now it opens it more
        assert ask(mode, True) == plain and memories[0].switch_last["adapter_used"] is True


def test_a_gate_gain_changes_only_the_answers_the_adapter_gives_and_not_the_switchs_decision(tiny_dir):
    """--gate-gain K: the switch reads the gate unscaled; the adapter, if it answers, answers with K·g."""
    model, tok = load_model(str(tiny_dir))
    doc = tok.encode(TEXT)
    memories = loud_memory(model)
    question = "What came to the valley?"
    ask = lambda k, s=True: answer(model, tok, question, doc, mode="lift", context=48, max_new_tokens=8, switch=s,
                                   gate_gain=k)
    gate = switch.question_gate(model, tok, question, None, "float32")
    memories[0].switch_thresholds[switch.threshold_key(None, "float32")] = gate - 1e-3      # the adapter answers
    assert ask(1.0) == ask(1.0, False) != ask(20.0)
    assert memories[0].switch_last == {"gate": gate, "threshold": gate - 1e-3, "adapter_used": True}   # unscaled
    memories[0].switch_thresholds[switch.threshold_key(None, "float32")] = gate               # the base answers
    assert ask(20.0) == ask(1.0) == answer(model, tok, question, doc, mode="closed", context=48, max_new_tokens=8)


def test_an_adapter_without_a_gate_always_answers(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    lora.attach(model, lora.LoRAConfig(rank=4), seed=0)
    with torch.no_grad():
        for a in lora.adapters(model):
            a.B.normal_(std=0.5)
    doc = tok.encode(TEXT)
    ask = lambda s: answer(model, tok, "What came?", doc, mode="lift", context=48, max_new_tokens=8, switch=s)
    assert ask(True) == ask(False) != answer(model, tok, "What came?", doc, mode="closed", context=48, max_new_tokens=8)


def test_the_thresholds_are_kept_beside_the_adapter_for_the_next_process_and_only_for_that_adapter(
        tiny_dir, tmp_path, capsys, monkeypatch):
    """train.py writes the switch's thresholds next to the cached adapter; a second call (a new
    process in real use, the same train.cli here) reads them instead of the 48 passes, and prints
    the same decision. A file whose checksum names another adapter is ignored."""
    import train
    doc = tmp_path / "d.txt"
    doc.write_text(TEXT * 2)
    args = ["--doc", str(doc), "--ask", "What came?", "--model", str(tiny_dir), "--window", "32", "--context", "48",
            "--epochs", "1", "--dtype", "float32", "--max-new-tokens", "3", "--quiet"]
    assert train.cli(args) == 0
    first = capsys.readouterr()
    kept = list((tmp_path / "cache").glob("*.switch.json"))
    assert len(kept) == 1 and "(switch: " in first.err
    passes = []
    real = switch.recorded
    monkeypatch.setattr(switch, "recorded", lambda *a, **k: passes.append(1) or real(*a, **k))
    assert train.cli(args) == 0
    second = capsys.readouterr()
    assert len(passes) == 1 and "no training" in second.err          # the question's own pass only
    assert second.out == first.out and second.err.splitlines()[-1] == first.err.splitlines()[-1]
    saved = json.loads(kept[0].read_text())
    kept[0].write_text(json.dumps({**saved, "adapter": "another adapter's checksum"}))
    passes.clear()
    assert train.cli(args) == 0
    assert len(passes) == 1 + len(anchor_questions()) + 1 and capsys.readouterr().out == first.out


def test_a_routed_question_is_asked_as_the_study_asked_it_and_the_adapter_answers(tiny_dir, tmp_path, capsys):
    """train.py --route: a question holding a studied key is asked in the study's wording, and the
    switch does not send it to the base model (no "(switch: …)" line); one holding none is asked as
    written, through the switch."""
    import train
    from data import DataConfig
    from study import route
    text = ("The mill was built in 1724 by Edric Hallowmere. The banker Ferdinand Oakes lent 3,000 silver crowns. "
            "The river froze in the winter of 1743.")
    doc = tmp_path / "d.txt"
    doc.write_text(text)
    args = ["--doc", str(doc), "--model", str(tiny_dir), "--window", "32", "--context", "48", "--epochs", "1",
            "--dtype", "float32", "--max-new-tokens", "3", "--quiet", "--distill", "4", "--study", "keys", "--route",
            "--qa-start-epoch", "0"]
    assert train.cli(args + ["--ask", "Who lent the silver crowns?"]) == 0
    routed = capsys.readouterr()
    _, tok = load_model(str(tiny_dir))
    asked = route("Who lent the silver crowns?", tok.decode(tok.encode(text)), DataConfig(distill=4, study="keys"))
    assert asked and f"(asked as the study asked it: {asked})" in routed.out and "(switch: " not in routed.err
    assert train.cli(args + ["--ask", "What is the weather?"]) == 0
    plain = capsys.readouterr()
    assert "asked as the study" not in plain.out and "(switch: " in plain.err
