"""eval.py and benchmarks.py: metrics, generators that put evidence where they say, file readers,
and a tiny end-to-end run that writes records, a table and plots, and resumes."""
import json

import pytest
import torch

import benchmarks as bm
from conftest import build_tokenizer
from checkpoint import Tokenizer


def test_metrics_on_hand_made_cases():
    assert bm.normalize("The  Ember-Queen!") == "emberqueen"
    assert bm.exact_match("the Silver Heron.", ["Silver Heron"]) == 1.0
    assert bm.exact_match("Silver Heron train", ["Silver Heron"]) == 0.0
    assert bm.contains("It was the Silver Heron, I think", ["Golden Owl", "silver heron"]) == 1.0
    assert bm.contains("Silver Herons", ["Silver Heron"]) == 0.0          # word boundaries
    assert bm.token_f1("Jonas Halvard the miller", ["Jonas Halvard"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert bm.token_f1("", ["x"]) == 0.0 and bm.exact_match("", [""]) == 1.0
    assert bm.contains("", ["x"]) == 0.0 and bm.contains("anything", [""]) == 0.0


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(build_tokenizer(), None, "", "", [2])


def test_facts_generator_is_deterministic_and_puts_evidence_where_it_says(tok):
    a = bm.generate_facts_document(tok, 1500, 6, seed=3, n_train=4)
    assert a == bm.generate_facts_document(tok, 1500, 6, seed=3, n_train=4)
    assert a != bm.generate_facts_document(tok, 1500, 6, seed=4, n_train=4)
    assert len(a["questions"]) == 6 and len(a["train_questions"]) == 4
    n = len(tok.encode(a["document"]))
    assert 1500 <= n < 1700
    positions = [q["evidence_pos"] for q in a["questions"] + a["train_questions"]]
    for q in a["questions"] + a["train_questions"]:
        answer = q["answers"][0]
        before = a["document"][: a["document"].index(answer)]
        # the sentence holding the answer starts at the recorded token position (± one sentence)
        assert abs(len(tok.encode(before)) / n - q["evidence_pos"]) < 0.05
    assert sorted(positions) == pytest.approx([(k + 0.5) / 10 for k in range(10)], abs=0.05)


def test_evidence_window_holds_each_answer_within_the_budget(tok):
    """The reading modes' passage: `context` tokens that contain the question's answer, wherever
    the evidence lies, the document's first and last facts included."""
    doc = bm.generate_facts_document(tok, 1500, 8, seed=1)
    ids = tok.encode(doc["document"])
    for q in doc["questions"]:
        window = bm.evidence_window(ids, q["evidence_pos"], 128)
        assert len(window) == 128 and q["answers"][0] in tok.decode(window)
    assert bm.evidence_window(ids, 0.0, 128) == ids[:128] and bm.evidence_window(ids, 1.0, 128) == ids[-128:]
    assert bm.evidence_window(ids[:50], 0.5, 128) == ids[:50]          # a short document is read whole


def test_locate_answer_finds_the_first_verbatim_occurrence(tok):
    text = "aaaa bbbb cccc. The River Tamsel is long. the river tamsel"
    pos = bm.locate_answer(tok, text, ["nowhere", "The River Tamsel"])
    assert pos == len(tok.encode("aaaa bbbb cccc. ")) / len(tok.encode(text))
    assert bm.locate_answer(tok, text, ["absent"]) is None


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9])
def test_needle_sits_at_the_requested_depth(tok, depth):
    d = bm.generate_needle(tok, 1200, depth, seed=1)
    assert d == bm.generate_needle(tok, 1200, depth, seed=1)
    q = d["questions"][0]
    needle_at = d["document"].index("The secret number")
    n = len(tok.encode(d["document"]))
    assert abs(len(tok.encode(d["document"][:needle_at])) / n - depth) < 0.05
    assert q["answers"][0] in d["document"][needle_at:needle_at + 80]


def test_readers_for_our_format_and_longbench(tmp_path):
    (tmp_path / "doc.txt").write_text("A long text.")
    ours = tmp_path / "ours.jsonl"
    ours.write_text("\n".join([
        json.dumps({"id": "a", "document": "Doc A.", "questions": [{"question": "q1", "answers": ["x"], "evidence_pos": 0.5}]}),
        "",
        json.dumps({"id": "b", "document_path": "doc.txt", "questions": [{"question": "q2", "answer": "y"}],
                    "train_questions": [{"question": "t", "answers": ["z"]}]}),
    ]) + "\n")
    docs = bm.read_benchmark(str(ours))
    assert [d["id"] for d in docs] == ["a", "b"] and docs[1]["document"] == "A long text."
    assert docs[1]["questions"][0]["answers"] == ["y"] and docs[1]["train_questions"][0]["answers"] == ["z"]
    lb = tmp_path / "lb.jsonl"
    lb.write_text("\n".join([
        json.dumps({"context": "Ctx one.", "input": "Q one?", "answers": ["A1"], "_id": "p"}),
        json.dumps({"context": "Ctx one.", "input": "Q two?", "answers": ["A2", "A2b"]}),
    ]) + "\n")
    docs = bm.read_benchmark(str(lb))
    assert len(docs) == 1 and [q["question"] for q in docs[0]["questions"]] == ["Q one?", "Q two?"]


def test_tiny_end_to_end_run_writes_records_table_plots_and_resumes(tiny_dir, tmp_path):
    import eval as ev
    from checkpoint import load_model
    from data import DataConfig
    from lift import TrainConfig
    _, tok = load_model(str(tiny_dir))
    docs = [bm.generate_facts_document(tok, 300, 2, seed=0, n_train=1)]
    out = tmp_path / "run"
    args = dict(modes=["closed", "icl", "lift", "lift+icl", "full", "evidence", "lift+evidence"],
                adapters=["gated_memory", "lora"],
                model_name=str(tiny_dir), data_cfg=DataConfig(window=64, context=64, qa_start_epoch=0), max_new_tokens=4,
                train_cfg=TrainConfig(epochs=1, dtype="float32"), train_qa=True, lora_rank=2)
    records = ev.run(docs, out, **args)
    # 2 questions × (4 base modes + 3 adapter modes × 2 adapters)
    assert len(records) == 2 * (4 + 3 * 2)
    assert {r["mode"] for r in records if r["adapter"] == "none"} == {"closed", "icl", "full", "evidence"}
    assert {r["adapter"] for r in records} == {"none", "gated_memory", "lora"}
    assert all({"em", "f1", "contains", "evidence_pos", "in_budget", "prediction"} <= set(r) for r in records)
    assert (out / "summary.md").read_text().count("\n|") >= 7
    absorbed = [json.loads(l) for l in (out / "absorb.jsonl").read_text().splitlines()]
    assert {a["adapter"] for a in absorbed} == {"gated_memory", "lora"}
    assert all(a["doc_loss_after"] < a["doc_loss_before"] and a["tokens"] > 0 for a in absorbed)
    assert (out / "score_by_mode.png").stat().st_size > 1000 and (out / "score_by_position.png").exists()
    lines = (out / "records.jsonl").read_text().splitlines()
    again = ev.run(docs, out, **args)                     # resumed: nothing recomputed
    assert (out / "records.jsonl").read_text().splitlines() == lines and len(again) == len(records)
    (out / "records.jsonl").write_text("\n".join(lines[:-3]) + "\n")   # an interrupted run
    ev.run(docs, out, **args)
    assert len((out / "records.jsonl").read_text().splitlines()) == len(lines)


def test_lora_targets_reach_the_adapter_and_set_the_folders_key(tiny_dir, tmp_path, monkeypatch):
    """`eval.py run --lora-targets attention` trains LoRA on the attention projections only, and
    its folder's key differs from LoRA everywhere: the two are never mixed in one table."""
    import eval as ev
    from checkpoint import load_model
    from data import DataConfig
    from lift import TrainConfig
    from options import UserError
    _, tok = load_model(str(tiny_dir))
    docs = [bm.generate_facts_document(tok, 200, 1, seed=0)]
    trained = []
    real = ev.absorb_cached
    monkeypatch.setattr(ev, "absorb_cached", lambda *a, **k: trained.append(k["adapter_cfg"]) or real(*a, **k))
    args = dict(modes=["lift"], adapters=["lora"], model_name=str(tiny_dir), max_new_tokens=2, train_qa=False,
                lora_rank=2, data_cfg=DataConfig(window=64, context=64), train_cfg=TrainConfig(epochs=1, dtype="float32"))
    ev.run(docs, tmp_path / "attention", lora_targets="attention", **args)
    assert [c.targets for c in trained] == ["attention"]
    with pytest.raises(UserError, match="other settings"):
        ev.run(docs, tmp_path / "attention", **args)                  # LoRA everywhere: another key


def test_bench_times_both_attention_paths_in_turn_and_writes_profiles(tiny_dir, tmp_path, capsys, monkeypatch):
    """`eval.py bench` on a tiny model, without the compile rows: every row it promises, the two
    attention paths side by side, fractions of the measured product rate, and the profiles."""
    import eval as ev
    import model
    monkeypatch.setattr(model, "QUERY_BLOCK", 16)              # three blocks of queries over 48 tokens
    assert ev.main(["bench", "--model", str(tiny_dir), "--dtype", "float32", "--lengths", "48", "--train-lengths",
                    "32", "--decode-tokens", "2", "--no-compile", "--profile", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    for what in ("prefill 48, explicit attention", "prefill 48, fused attention kernel",
                 "ℓ = 32, explicit attention (in turn)", "ℓ = 32, fused attention kernel (in turn)",
                 "ℓ = 32, checkpointing", "ℓ = 32, batch 4", "default loop step:", "--qa-batch 8", "decode 2 tokens",
                 "matrix products alone, ℓ = 32", "prefill 48's matrix products alone",
                 "attention of one layer over 48 tokens, forward:"):
        assert sum(what in r for r in rows) == 1, what
    assert not any("torch.compile" in r or "--compile" in r for r in rows)
    # a tiny model's step is a few % of its 4N limit, which can round to "0%": compare the unrounded figures
    steps = [r for r in rows if "training step" in r]
    tokens_per_s = [float(r.split("|")[2].replace(",", "")) for r in steps]
    limits = [float(r.split("limit ")[1].split(" tokens/s")[0].replace(",", "")) for r in steps]
    assert len(steps) == 4 and all(0 < t < 10 * lim for t, lim in zip(tokens_per_s, limits))
    rate = lambda what: float(next(r for r in rows if what in r).split("|")[2].replace(",", ""))
    assert rate("matrix products alone, ℓ = 32") > rate("ℓ = 32, explicit attention")   # the products are part of the step
    assert rate("prefill 48's matrix products alone") > rate("prefill 48, explicit attention")   # ... and of a prefill
    assert "matmul 2048^3 again" in out
    # the softmax row counts the scores the blocks of 16 queries make: 4 heads × 16 queries × (16 + 32 + 48) keys
    assert "over its 6,144 scores" in next(r for r in rows if "attention of one layer over 48" in r)
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"profile_train_step_32.txt", "profile_prefill_48.txt",
                                                          "profile_prefill_48_fused.txt"}


def test_profile_of_a_compiled_step_shows_compiled_graphs_and_leaves_the_model_eager(tiny_dir, tmp_path):
    """A step profiled as --compile runs it: blocks and the head's loss compiled (their graphs
    appear in the table), the matrix products still named; afterwards nothing is left compiled or attached."""
    import compute
    import profiling
    from checkpoint import load_model
    model, tok = load_model(str(tiny_dir))
    table = profiling.profile_step(model, tok, 32, "float32", tmp_path, compiled=True)      # graphs shared with test_lift
    assert (tmp_path / "profile_train_step_32_compiled.txt").read_text() == table
    assert "CompiledFxGraph" in table and "aten::mm" in table
    assert all(layer._compiled_call_impl is None and layer.attention.head_adapter is None for layer in model.layers)
    assert compute._rows_loss is compute.rows_loss


@pytest.mark.parametrize("tied", [True, False])
def test_weight_flops_count_every_product_a_token_meets_and_only_those(tied):
    """The 4N limit's N: every nn.Linear of the blocks, plus the output head (the tied embedding, or the
    untied output layer, whose embedding is then a lookup), not the norms; an attached adapter not."""
    import gated_memory
    import speed
    from conftest import tiny_model
    m = tiny_model(tie_embeddings=tied)
    linear = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    expected = 2 * (linear + (m.tok_embeddings.weight.numel() if tied else 0))
    gated_memory.attach(m, gated_memory.GatedMemoryConfig(), seed=0)
    assert speed.weight_flops(m) == expected
    assert len(speed.step_weights(m)) == 7 * m.cfg.n_layers + 1


def test_cost_sweep_measures_both_methods_fits_and_plots(tiny_dir, tmp_path):
    import eval as ev
    out = tmp_path / "cost"
    ev.main(["cost", "--lengths", "100", "150", "200", "--model", str(tiny_dir), "--window", "32", "--context", "32",
             "--epochs", "1", "--dtype", "float32", "--out", str(out)])
    rows = [json.loads(l) for l in (out / "cost.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["icl"] * 3 + ["lift"] * 3
    assert all(not r.get("failed") and r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    text = (out / "cost.md").read_text()
    assert "ICL fit" in text and "crossover" in text and (out / "cost.png").stat().st_size > 1000


def test_gate_heatmap_for_two_questions(tiny_dir, tmp_path):
    import eval as ev
    doc = tmp_path / "d.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    ev.main(["gates", "--doc", str(doc), "--question", "What jumps?", "--model", str(tiny_dir), "--window", "32",
             "--context", "32", "--epochs", "1", "--dtype", "float32", "--out", str(tmp_path / "g")])
    g = json.loads((tmp_path / "g" / "gates.json").read_text())
    assert set(g["mean_gate"]) == {"about the document", "unrelated", "windows of d.txt (the document)",
                                   "anchor's chat prompts (48), and the base's replies"}
    assert all(0 < v < 1 for v in (g["mean_gate"]["about the document"], g["mean_gate"]["unrelated"]))
    assert len(g["per_layer"]["unrelated"]) == 2 and (tmp_path / "g" / "gates.png").stat().st_size > 1000


def test_gates_on_windows_of_other_texts_for_an_adapter_with_other_settings(tiny_dir, tmp_path):
    import eval as ev
    doc, other = tmp_path / "d.txt", tmp_path / "other.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    other.write_text("In 1724 Edric Hallowmere built a mill on the Brisk. " * 10)
    flags = ["--doc", str(doc), "--question", "What jumps?", "--texts", str(other), "--model", str(tiny_dir),
             "--window", "32", "--context", "32", "--epochs", "1", "--dtype", "float32"]
    for extra, name in (([], "learned"), (["--gate-fixed", "1"], "fixed")):   # a gate held at 1 reads 1 everywhere
        ev.main(["gates", *flags, *extra, "--out", str(tmp_path / name)])
    learned, fixed = (json.loads((tmp_path / n / "gates.json").read_text())["mean_gate"] for n in ("learned", "fixed"))
    texts = ["windows of d.txt (the document)", "windows of other.txt"]
    assert all(0 < learned[t]["gate"] < 1 and learned[t]["memory share"] > 0 for t in texts)
    assert learned[texts[0]]["gate"] != learned[texts[1]]["gate"]
    assert all(fixed[t]["gate"] == 1.0 for t in texts) and fixed["about the document"] == 1.0
    chats = next(k for k in learned if k.startswith("anchor's chat prompts"))   # a question against an answer
    assert 0 < learned[chats]["gate on the prompt"] < 1 and 0 < learned[chats]["gate on the reply"] < 1
    assert learned[chats]["gate on the prompt"] != learned[chats]["gate on the reply"]
    assert fixed[chats]["gate on the prompt"] == fixed[chats]["gate on the reply"] == 1.0


def test_gates_of_question_sets_and_of_the_self_study_questions(tiny_dir, tmp_path):
    import eval as ev
    doc, questions, general = tmp_path / "d.txt", tmp_path / "q.jsonl", tmp_path / "g.jsonl"
    doc.write_text("In 1724 Edric Hallowmere built a mill on the Brisk. " * 10)
    questions.write_text(json.dumps({"question": "Who built the mill?", "answer": "Edric Hallowmere"}) + "\n")
    general.write_text(json.dumps({"question": "What is the capital of France?", "answer": "Paris"}) + "\n")
    ev.main(["gates", "--doc", str(doc), "--question", "Who built the mill?", "--questions", str(questions),
             "--general", str(general), "--distill", "2", "--qa-start-epoch", "0", "--model", str(tiny_dir),
             "--window", "32", "--context", "32", "--epochs", "1", "--dtype", "float32", "--out", str(tmp_path / "g")])
    g = json.loads((tmp_path / "g" / "gates.json").read_text())["mean_gate"]
    study = [k for k in g if k.startswith("self-study questions")]
    assert study == ["self-study questions (2)"] and 0 < g[study[0]]["gate"] < 1 and g[study[0]]["memory share"] > 0
    assert 0 < g[study[0]]["gate after the document"] < 1 and g[study[0]]["gate after the document"] != g[study[0]]["gate"]
    # a set of one question is that question's own map, averaged: the two measures agree
    assert g["questions (1)"]["gate"] == g["about the document"] and g["general (1)"]["gate"] == g["unrelated"]


def test_in_budget_matches_the_head_and_tail_that_truncation_keeps(tok):
    """Evidence is inside the ICL view iff its first token is among the first context/2 or the
    last context/2 tokens that data.truncate_middle keeps."""
    from data import truncate_middle
    from benchmarks import in_budget
    n, context = 1000, 100
    assert in_budget(None, n, context) is None
    assert in_budget(0.3, 80, context) is True                       # the whole document fits
    kept = [t for t in range(n) if t < 50 or t >= 950]
    for t in range(n):
        assert in_budget(t / n, n, context) == (t in kept), t
    doc = list(range(40, 40 + n))                                    # check against the real truncation
    assert len(tok.encode(truncate_middle(doc, context, tok))) > 0


def test_summary_splits_the_counts_by_document(tmp_path, monkeypatch):
    import eval as ev
    monkeypatch.setattr(ev.plots, "plot_results", lambda groups, out: None)
    rec = lambda doc, inside, hit: {"doc": doc, "mode": "lift", "adapter": "lora", "contains": hit, "em": 0.0,
                                    "f1": 0.0, "in_budget": inside}
    records = [rec("a", False, True), rec("a", False, False), rec("a", True, True), rec("b", False, False)]
    text = ev.write_summary(records, tmp_path, {})
    assert "| lift (lora) | 1/2 · 1/1 | 0/1 · 0/0 |" in text
    assert "by document" not in ev.write_summary(records[:3], tmp_path, {})      # one document: no split


def test_summary_splits_the_counts_by_what_the_study_set_reached(tmp_path, monkeypatch):
    import eval as ev
    monkeypatch.setattr(ev.plots, "plot_results", lambda groups, out: None)
    rec = lambda q, hit: {"doc": "a", "q": q, "mode": "lift", "adapter": "gated_memory", "contains": hit, "em": 0.0,
                          "f1": 0.0, "in_budget": False}
    records = [rec(0, True), rec(1, False), rec(2, True), rec(3, False)]
    text = ev.write_summary(records, tmp_path, {}, {("a", 0): True, ("a", 1): True, ("a", 2): False})
    assert "| lift (gated_memory) | 1/2 | 1/1 |" in text              # question 3: not in the map, in neither
    assert "studied" not in ev.write_summary(records, tmp_path, {})   # no study set: no such table
    other = {**records[0], "doc": "b"}                              # a document this command did not study
    assert "(documents a only)" in ev.write_summary(records + [other], tmp_path, {}, {("a", 0): True})


def test_summary_counts_the_reply_an_adapter_falls_back_on(tmp_path, monkeypatch):
    import eval as ev
    from summary import most_repeated_opening
    monkeypatch.setattr(ev.plots, "plot_results", lambda groups, out: None)
    recited = '"You" (or "Your")   means an individual'
    replies = [recited + " or a legal entity.", recited.upper() + ".", "Thirty days.", "Sections 3.1 to 3.4."]
    assert most_repeated_opening(replies) == ('"you" (or "your") means an', 2, 3)   # case and spacing ignored
    records = [{"doc": "a", "mode": "lift", "adapter": "gated_memory", "contains": False, "em": 0.0, "f1": 0.0,
                "in_budget": False, "prediction": p} for p in replies]
    records[2]["question"] = "Within thirty days of what must a breach be cured?"   # "Thirty days." is too short to restate it
    assert '| lift (gated_memory) | "you" (or "your") means an | 2/4 | 3 | 0/4 |' in ev.write_summary(records, tmp_path, {})
    records[2]["prediction"] = "Within thirty days of the notice."
    assert '| 3 | 1/4 |' in ev.write_summary(records, tmp_path, {})
    assert most_repeated_opening([]) == ("", 0, 0)


def test_a_reply_restates_its_question_when_it_begins_with_three_of_its_words_in_a_row():
    from summary import restates
    question = "Is the copyright license granted in Section 2 revocable or irrevocable?"
    assert restates("The copyright license granted in Section 2 is irrevocable.", question)   # articles ignored
    assert restates("COPYRIGHT, license granted!", question)                                  # case, punctuation
    assert not restates("Subject to the terms and conditions of this License", question)     # a recited clause
    assert not restates("license granted", question) and not restates("", question)         # too short
    assert not restates("copyright granted license", question)                               # not in a row


def test_recital_tells_the_right_place_from_another(tmp_path):
    from summary import recital, recital_table
    doc = ("The licence ends after thirty days of notice. " + "Filler words fill this licence. " * 30 +
           "The licence is governed by the law of the defendant's place of business.")
    answers = ["place of business"]
    assert recital("The licence is governed by the law of the defendant's", doc, answers) == "right"
    assert recital("THE licence ends after thirty days, of notice", doc, answers) == "wrong"   # case, commas
    assert recital("The licence is governed by the law of Mars", doc, answers) == "right"      # six words suffice
    assert recital("The licence may be governed by", doc, answers) == "none"
    assert recital("", doc, answers) == "none"
    far = "The licence ends after thirty days of notice. " + "One more word here. " * 40 + "the place of business"
    assert recital("The licence ends after thirty days of notice", far, answers) == "wrong"   # beyond the passage
    assert recital("The licence ends after thirty days", doc, answers) == "none"   # five words (no "the"): too short
    rec = lambda p, inside: {"doc": "d", "prediction": p, "answers": answers, "in_budget": inside, "contains": False}
    groups = {"lift (gated_memory)": [rec("The licence ends after thirty days of notice.", False),
                                      rec("The licence is governed by the law of the defendant's", False),
                                      rec("I do not know.", False), rec("The licence ends after thirty days", True)]}
    assert "| lift (gated_memory) | 3 | 2 | 1 | 0 |" in recital_table(groups, {"d": doc})


def test_address_table_tells_a_fact_stored_but_not_reached_from_one_never_studied():
    from data import DataConfig
    from study import key_sentence, asked_key, study_pairs
    from summary import address_table
    text = ("The sundial was carved by Marta Voss in 1802. The bells ring twice at dusk. "
            "The ferry leaves from the northern pier. The market closes early on feast days.")
    cfg = DataConfig(distill=100, study="keys")
    bench = {"d": {"document": text, "questions": [
        {"question": "Who carved the sundial, Marta Voss or another?", "answers": ["Marta Voss"],
         "evidence": "carved by Marta Voss"},
        {"question": "How often do the bells ring?", "answers": ["twice"], "evidence": "ring twice"},
        {"question": "Where does the boat leave from?", "answers": ["northern pier"], "evidence": "the northern pier"},
        {"question": "When is the market open?", "answers": ["early"], "evidence": "closes early"}]}}
    studied = [q for q, _, _ in study_pairs(text, cfg) if "market" not in key_sentence(asked_key(q), text)]
    bells = [q for q in studied if "bells" in key_sentence(asked_key(q), text)]
    absorbed = [{"doc": "d", "study_missed": bells, "study_recalled": [q for q in studied if q not in bells]}]
    rec = lambda q, hit, inside=False: {"doc": "d", "q": q, "mode": "lift+icl", "adapter": "gated_memory",
                                        "contains": hit, "in_budget": inside}
    groups = {"lift+icl (gated_memory)": [rec(0, True), rec(1, False), rec(2, False), rec(3, True), rec(0, False, True)]}
    # studied and outside: questions 0-2 (3's sentence is not in the recorded study set; the last is inside);
    # recited in the study's wording: 0 and 2; holding a key: 0 ("Marta Voss", "sundial") and 1 ("bells")
    assert "| lift+icl (gated_memory) | 3 | 2 | 2 | 1 | 1 |" in address_table(groups, absorbed, bench, cfg)
    no_recall = address_table(groups, [{"doc": "d"}], bench, cfg)          # rebuilt from the settings, no recall check
    assert "| lift+icl (gated_memory) | 4 | – | 3 | 2 | 2 |" in no_recall          # "market" is a key too
    assert address_table(groups, absorbed, bench, DataConfig()) == []       # no study: no table


def test_the_studied_probe_and_the_routed_mode_ask_study_questions_in_place_of_the_users(tiny_dir, tmp_path):
    import eval as ev
    from checkpoint import load_model
    from data import DataConfig, DataError
    from study import route, study_pairs
    from lift import TrainConfig
    _, tok = load_model(str(tiny_dir))
    doc = bm.generate_facts_document(tok, 300, 2, seed=0)
    args = dict(modes=["lift+icl", "lift+studied"], adapters=["gated_memory"], model_name=str(tiny_dir),
                max_new_tokens=4, train_cfg=TrainConfig(epochs=1, dtype="float32", anchor=0.0), train_qa=False, lora_rank=2)
    cfg = DataConfig(window=64, context=64, qa_start_epoch=0, distill=2)          # two names: one holds a fact
    records = ev.run([doc], tmp_path / "run", data_cfg=cfg, **args)
    asked = {m: [r["question"] for r in records if r["mode"] == m] for m in ("lift+icl", "lift+studied")}
    text = tok.decode(tok.encode(doc["document"]))
    (_, filler), (about_year, year) = [(q, r) for q, r, _ in study_pairs(text, cfg)]
    assert [q["answers"][0] in year for q in doc["questions"]] == [False, True]
    assert len(asked["lift+icl"]) == 2 and asked["lift+studied"] == [about_year]    # only the studied fact, in its wording
    assert [r["answers"] for r in records if r["mode"] == "lift+studied"] == [doc["questions"][1]["answers"]]
    # lift+routed: a question holding a studied name ("Eltenmir") is asked the study's question on it;
    # the rest as the user wrote them. The adapter comes from the cache: no second training.
    extra = {**doc["questions"][1], "question": "Who was born in the town of Eltenmir?"}
    routed_doc = {**doc, "questions": doc["questions"] + [extra]}
    general = [{"question": "Where is the town of Eltenmir?", "answers": ["?"]}, {"question": "What is 2+2?", "answers": ["4"]}]
    routed = ev.run([routed_doc], tmp_path / "routed", data_cfg=cfg, **{**args, "modes": ["lift+routed"]}, general=general)
    assert json.loads((tmp_path / "routed" / "absorb.jsonl").read_text())["general_routed"] == 1
    assert [r["question"] for r in routed] == [q["question"] for q in doc["questions"]] + [about_year]
    assert [r.get("routed", False) for r in routed] == [False, False, True]
    assert route(extra["question"], text, cfg) == about_year
    with pytest.raises(DataError, match="lift\\+studied"):
        ev.run([doc], tmp_path / "other", data_cfg=DataConfig(window=64, context=64), **args)


def test_runs_table_puts_runs_side_by_side_and_sums_them():
    from summary import runs_table
    rec = lambda mode, inside, hit, q="q", **kw: {"mode": mode, "adapter": "gated_memory" if mode != "icl" else "none",
                                                  "contains": hit, "in_budget": inside, "question": q, "doc": "d",
                                                  "answers": ["x"], **kw}
    runs = {"seed1": [rec("icl", False, True), rec("lift+icl", False, True), rec("lift+icl", False, True),
                      rec("lift+icl", True, False)],
            "seed2": [rec("icl", False, False), rec("lift+icl", False, False), rec("lift+icl", True, True)]}
    absorbed = {"seed1": [{"gate_document": 0.06, "gate_general": 0.02, "general_same_lift": 1.0,
                           "general_same_lift+icl": 0.98}]}
    lines = runs_table(runs, absorbed)
    assert "| seed1 | 1/1 · 0/0 | 2/2 · 0/1 | – | 3.00× | 1.00 / 0.98 |" in lines   # no lift: no context effect
    assert "| seed2 | 0/1 · 0/0 | 0/1 · 1/1 | – | – | – |" in lines       # nothing absorbed recorded: no gate
    assert "| **all** | 1/2 · 0/0 | 2/3 · 1/2 | – | | |" in lines
    absorbed["seed1"][0].update(share_document=0.3, share_general=0.2)       # what the gate lets through
    assert "| seed1 | 1/1 · 0/0 | 2/2 · 0/1 | – | 3.00× (share 1.50×) | 1.00 / 0.98 |" in runs_table(runs, absorbed)
    # outside the budget, question by question: LIFT alone right and LIFT+ICL right (kept), right and
    # wrong (lost), wrong and right (gained); inside the budget does not count
    both = {"s": [rec("lift", False, True, "a"), rec("lift+icl", False, True, "a"),
                  rec("lift", False, True, "b"), rec("lift+icl", False, False, "b"),
                  rec("lift", False, True, "c"), rec("lift+icl", False, False, "c"),
                  rec("lift", False, False, "d"), rec("lift+icl", False, True, "d"),
                  rec("lift", True, True, "e"), rec("lift+icl", True, False, "e")]}
    lines = runs_table(both, {})
    assert "| s | 3/4 · 1/1 | 2/4 · 0/1 | 1 · 2 · 1 | – | – |" in lines
    assert "| **all** | 3/4 · 1/1 | 2/4 · 0/1 | 1 · 2 · 1 | | |" in lines
    # only the adapter's own replies count: not where --switch answered with the adapter off, nor a
    # question that holds its own answer (a reply restating it scores)
    off, on = {"switch": {"adapter_used": False}}, {"switch": {"adapter_used": True}}
    both["s"] += [rec("lift", False, True, "f", **off), rec("lift+icl", False, False, "f", **on),
                  rec("lift", False, True, "is it x", **on), rec("lift+icl", False, False, "is it x", **on),
                  rec("lift", False, True, "g", **on), rec("lift+icl", False, False, "g", **on)]
    assert "| s | 6/7 · 1/1 | 2/7 · 0/1 | 1 · 3 · 1 | – | – |" in runs_table(both, {})
