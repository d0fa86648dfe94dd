"""sameness.py: the general-ability measure against the base model's replies."""
import json

import torch

import gated_memory as gm
import sameness
import switch
from checkpoint import load_model
from data import truncate_middle

DOC = {"id": "d", "document": "In 1743 the frost came to the valley. " * 6,
       "questions": [{"question": "When did the frost come?", "answers": ["1743"], "evidence_pos": 0.1}]}
GENERAL = [{"question": "The quick brown fox?", "answers": ["dog"]}, {"question": "Question? Answer!", "answers": ["x"]}]


def measure(model, tok, tmp_path, force_gate):
    for a in gm.adapters(model):
        a.force_gate = force_gate
    return sameness.general_ability(model, tok, DOC, tok.encode(DOC["document"]), GENERAL, 32, "float32",
                                    tmp_path / f"g{force_gate}.jsonl", "gm")


def test_an_adapter_that_is_exactly_the_base_keeps_every_reply_and_one_that_is_not_does_not(tiny_dir, tmp_path):
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    shut = measure(model, tok, tmp_path, 0.0)
    assert shut["general_same_lift"] == shut["general_same_lift+icl"] == 1.0
    open_ = measure(model, tok, tmp_path, 1.0)                 # every head replaced by its (≈ 0) memory
    assert open_["general_same_lift"] < 1.0 and open_["general_same_lift+icl"] < 1.0
    records = [json.loads(l) for l in (tmp_path / "g1.0.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["same"] == (r["base"] == r["adapted"]) for r in records)


def test_an_unknown_document_is_one_line_of_error(tmp_path, capsys):
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps(DOC) + "\n")
    general = tmp_path / "g.jsonl"
    general.write_text("".join(json.dumps(q) + "\n" for q in GENERAL))
    assert sameness.main(["--bench", str(bench), "--doc", "nope", "--general", str(general), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_two_copies_of_the_base_in_one_precision_agree_and_the_measure_sees_a_difference(tiny_dir, tmp_path):
    """precision_agreement compares the two models' replies, not one model with itself."""
    model, tok = load_model(str(tiny_dir))
    ids = tok.encode(DOC["document"])
    twin, _ = load_model(str(tiny_dir))
    agree = sameness.precision_agreement((model, "float32"), (twin, "float32"), tok, ids, GENERAL, 32, tmp_path / "a")
    assert agree == {"general_same_closed": 1.0, "general_same_icl": 1.0}
    gm.attach(twin, gm.GatedMemoryConfig(), seed=0)         # the base modes switch any adapter off ...
    for a in gm.adapters(twin):
        a.force_gate = 1.0
    assert sameness.precision_agreement((model, "float32"), (twin, "float32"), tok, ids, GENERAL, 32,
                                        tmp_path / "b") == agree
    torch.manual_seed(0)
    with torch.no_grad():                                  # ... but a changed base weight is seen
        twin.tok_embeddings.weight.add_(torch.randn_like(twin.tok_embeddings.weight))
    moved = sameness.precision_agreement((model, "float32"), (twin, "float32"), tok, ids, GENERAL, 32, tmp_path / "c")
    assert moved["general_same_closed"] < 1.0 and moved["general_same_icl"] < 1.0


def test_with_the_switch_a_question_that_opens_no_gate_gets_the_base_reply(tiny_dir, tmp_path):
    """--switch: replies the open adapter changes come back word for word once the threshold lies
    above every question's gate; the records say that the adapter did not answer."""
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    for a in gm.adapters(model):
        a.force_gate = 1.0                                     # every question opens the gate fully
    context = truncate_middle(tok.encode(DOC["document"]), 32, tok)                   # LIFT+ICL's, at budget 32
    gm.adapters(model)[0].switch_thresholds.update({switch.threshold_key(None, "float32"): 1.0,
                                                    switch.threshold_key(context, "float32"): 0.5})
    ask = lambda path: sameness.general_ability(model, tok, DOC, tok.encode(DOC["document"]), GENERAL, 32, "float32",
                                                tmp_path / path, "gm", switch=True)
    out = ask("a.jsonl")
    assert out["general_same_lift"] == 1.0 and out["general_adapter_used_lift"] == 0.0
    assert out["general_same_lift+icl"] < 1.0 and out["general_adapter_used_lift+icl"] == 1.0   # 1 > 0.5: opens
    records = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert all(r["switch"]["adapter_used"] == (r["mode"] == "lift+icl") for r in records)


def test_the_memorys_share_is_nothing_with_the_gate_shut_and_grows_as_it_opens(tiny_dir, tmp_path):
    """general_ability reports what the gate lets through, not only the gate: the memory's share of
    each head's output on the document's questions and on general ones."""
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    with torch.no_grad():
        for a in gm.adapters(model):
            a.mem_out.normal_(0, 0.1)                          # a memory that writes something
    shares = {g: measure(model, tok, tmp_path, g) for g in (0.0, 0.1, 0.5)}
    assert shares[0.0]["share_document"] == shares[0.0]["share_general"] == 0.0
    assert 0 < shares[0.1]["share_general"] < shares[0.5]["share_general"] <= 1
    assert shares[0.5]["gate_document"] == shares[0.5]["gate_general"] == 0.5
