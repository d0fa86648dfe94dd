"""The storage probe (storage.py): "stored" means greedy decoding writes the answer word for word,
and the probe's training does store what it is shown."""
import pytest
import torch

from conftest import TEXT
import gated_memory as gm
import lora
from checkpoint import load_model
from data import IGNORE, Example
from lift import TrainConfig
from model import generate
from storage import curve, fact_examples, facts_outside, stored


def greedy_example(model, prompt: list[int], n: int) -> Example:
    reply = generate(model, prompt, n)
    return Example(prompt + reply, [IGNORE] * len(prompt) + reply, kind="qa")


def test_stored_is_exactly_what_greedy_decoding_writes(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    ex = greedy_example(model, tok.encode("The quick brown fox"), 6)   # the model's own greedy reply
    share, gate = stored(model, [ex], "float32")
    assert share == 1.0
    assert abs(gate - 0.047) < 0.01                                     # a fresh gate: σ(−3) on every answer position
    wrong = list(ex.labels)
    wrong[-3] = (wrong[-3] + 1) % model.cfg.vocab_size                  # one answer token the model would not write
    assert stored(model, [ex, Example(ex.input_ids[:-3] + [wrong[-3]] + ex.input_ids[-2:], wrong)], "float32")[0] == 0.5


def test_the_probe_stores_what_it_is_shown_and_leaves_the_base_frozen(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    text = "Edric Hallowmere founded the mill in 1743. The banker Ferdinand Oakes lent 3,000 silver crowns."
    facts = facts_outside(text, 4, context="The banker Ferdinand Oakes lent 3,000 silver crowns.")
    assert facts == [("Edric Hallowmere", "Edric Hallowmere founded the mill in 1743.")]   # the other is in context
    forms = {"alone": fact_examples(tok, facts), "in_context": fact_examples(tok, facts, "Some other text.")}
    assert forms["alone"][0].kind == "qa" and len(forms["in_context"][0].input_ids) > len(forms["alone"][0].input_ids)
    points = curve(model, forms, "alone", lora.LoRAConfig(8, 16.0),
                   TrainConfig(epochs=20, lr=1e-2, anchor=0.0, dtype="float32"), every=10)
    assert [p["epoch"] for p in points] == list(range(21))
    assert [p["epoch"] for p in points if "in_context" in p] == [0, 10, 20]   # the other form, every 10 epochs
    assert points[0]["alone"] == 0.0 and points[-1]["alone"] == 1.0
    after = model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)            # only the adapter moved


def test_help_prints_and_plot_draws_curves(tmp_path, capsys):
    import json
    import storage
    assert "--train-on" in storage.parser().format_help()
    rec = {"curve": [{"epoch": 0, "alone": 0.0, "in_context": 0.0}, {"epoch": 1, "alone": 0.5}]}
    (tmp_path / "a.json").write_text(json.dumps(rec))
    assert storage.main(["--plot", str(tmp_path / "a.json"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert storage.main(["--out", str(tmp_path / "x.json")]) == 2          # no --bench/--doc: a one-line error
    assert "error:" in capsys.readouterr().err


def test_more_phrasings_train_more_examples_and_the_held_out_phrasing_is_measured(tiny_dir, monkeypatch):
    import storage
    from study import KEY_QUESTIONS
    model, tok = load_model(str(tiny_dir))
    facts = [("Edric Hallowmere", "Edric Hallowmere founded the mill in 1743.")]
    forms = {"alone": fact_examples(tok, facts), "reworded": fact_examples(tok, facts, phrasing=storage.REWORDED)}
    assert "What do you know about Edric Hallowmere?" in tok.decode(forms["reworded"][0].input_ids)
    epochs, train = [], storage.lift.train_adapter

    def counting(m, plan, *a, **k):                                      # the loop, noting each epoch's size
        epochs.extend(len(e) for e in plan)
        return train(m, plan, *a, **k)
    monkeypatch.setattr(storage.lift, "train_adapter", counting)
    points = curve(model, forms, "alone", lora.LoRAConfig(8, 16.0), TrainConfig(epochs=4, lr=1e-2, anchor=0.0,
                   dtype="float32"), every=2, extra=fact_examples(tok, facts, phrasing=KEY_QUESTIONS[1]))
    assert epochs == [2, 2, 2, 2]                                        # every epoch: the fact in both phrasings
    assert [p["epoch"] for p in points] == [0, 1, 2, 3, 4]
    assert [p["epoch"] for p in points if "reworded" in p] == [0, 2, 4]  # the held-out phrasing, every 2 epochs


def test_key_similarity_compares_facts_and_wordings_and_leaves_no_adapter(tiny_dir):
    from storage import answer_keys, key_similarity
    model, tok = load_model(str(tiny_dir))
    facts = [("Edric Hallowmere", "Edric Hallowmere founded the mill in 1743."),
             ("Ferdinand Oakes", "The banker Ferdinand Oakes lent 3,000 silver crowns.")]
    keys = answer_keys(model, fact_examples(tok, facts))
    assert len(keys) == model.cfg.n_layers and keys[0].shape == (2, model.cfg.n_heads, model.cfg.head_dim)
    rows = key_similarity(model, tok, facts)
    assert [r["layer"] for r in rows] == list(range(model.cfg.n_layers))
    assert all(-1 <= r[k] <= 1 for r in rows for k in r if k != "layer")
    # The first layer's query sees only its own token, the same for every question there: identical
    # keys. Later layers mix in the question's words, so the facts' keys part.
    assert rows[0]["other_fact_same_wording"] == pytest.approx(1, abs=1e-5)
    assert rows[-1]["other_fact_same_wording"] < 0.9999
    assert all(layer.attention.head_adapter is None for layer in model.layers)
