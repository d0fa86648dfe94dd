"""answer_gain.py: the reference answer's log-probability under base and adapter, with and
without the document's opening in context."""
import json

import torch
import torch.nn.functional as F

import lora
from answer_gain import answer_logprob, gains, main
from checkpoint import load_model

DOC = "The frost came to the valley in 1743, and the banker lent 3,000 silver crowns. " * 12


def test_the_answer_logprob_is_the_mean_of_the_next_token_logprobs_read_one_step_at_a_time(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    prompt, answer = tok.encode("Question? Answer!"), tok.encode(" 1743 crowns")
    steps = []
    for i, t in enumerate(answer):                      # one forward per token, the prefix grown by hand
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer[:i]]))[0, -1]
        steps.append(F.log_softmax(logits.float(), -1)[t].item())
    assert abs(answer_logprob(model, prompt, answer, "float32") - sum(steps) / len(steps)) < 1e-4


def test_a_fresh_lora_gains_nothing_and_a_trained_one_moves_the_answer_in_both_modes(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    lora.attach(model, lora.LoRAConfig(rank=4), seed=0)          # B = 0: exactly the base model
    doc = {"d": tok.encode(DOC)}
    qs = [{"doc": "d", "question": "When did the frost come?", "answers": ["1743"], "in_budget": False}]
    fresh = gains(model, tok, qs, doc, context=32, dtype="float32")[0]
    assert fresh["gain lift"] == 0.0 and fresh["gain lift+icl"] == 0.0
    assert fresh["base lift"] != fresh["base lift+icl"]            # the opening in context changes the prompt
    with torch.no_grad():
        for a in lora.adapters(model):
            a.B.normal_(std=0.5)
    moved = gains(model, tok, qs, doc, context=32, dtype="float32")[0]
    assert moved["gain lift"] != 0.0 and moved["gain lift+icl"] != 0.0
    assert moved["base lift"] == fresh["base lift"]               # the base is read with the adapter off
    shared = {}                                                   # the base's figures kept across adapters
    assert gains(model, tok, qs, doc, context=32, dtype="float32", base=shared)[0] == moved and len(shared) == 2
    assert gains(model, tok, qs, doc, context=32, dtype="float32", base=shared)[0] == moved


def test_the_command_reads_a_run_folder_and_writes_every_question(tiny_dir, tmp_path, capsys):
    model, tok = load_model(str(tiny_dir))
    lora.attach(model, lora.LoRAConfig(rank=4), seed=0)
    with torch.no_grad():
        for a in lora.adapters(model):
            a.B.normal_(std=0.5)
    lora.save(model, str(tmp_path / "a.safetensors"))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "d", "document": DOC, "questions": [
        {"question": "When did the frost come?", "answers": ["1743"]},
        {"question": "How many crowns?", "answers": ["3,000"]}]}) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    rec = lambda q, a, inside, mode: {"doc": "d", "question": q, "answers": [a], "in_budget": inside, "mode": mode}
    run.joinpath("records.jsonl").write_text("\n".join(json.dumps(r) for r in [
        rec("When did the frost come?", "1743", False, "icl"), rec("When did the frost come?", "1743", False, "lift"),
        rec("How many crowns?", "3,000", True, "icl")]) + "\n")
    out = tmp_path / "gains.json"
    assert main([str(run), str(tmp_path / "a.safetensors"), "--bench", str(bench), "--context", "32",
                 "--model", str(tiny_dir), "--dtype", "float32", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| a | outside (1) |" in table and "| a | inside (1) |" in table
    rows = json.loads(out.read_text())[str(tmp_path / "a.safetensors")]
    assert [r["question"] for r in rows] == ["When did the frost come?", "How many crowns?"]   # each once
    assert main([str(tmp_path / "nothing"), str(tmp_path / "a.safetensors"), "--bench", str(bench)]) == 2
    assert "no records.jsonl" in capsys.readouterr().err
