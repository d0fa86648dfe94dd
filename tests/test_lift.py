"""LIFT end to end: the frozen base, a learning adapter, determinism, the cache, and the command
line's behaviour on good and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TEXT
import gated_memory as gm
from cache import absorb_cached
from checkpoint import load_model
from data import DataConfig
from lift import TrainConfig, answer, document_loss

SMALL = dict(data_cfg=DataConfig(window=32, context=48), adapter_cfg=gm.GatedMemoryConfig())


def run_absorb(path, seed=0, epochs=3, **kw):
    model, tok = load_model(str(path))
    result = absorb_cached(model, tok, TEXT, train_cfg=TrainConfig(epochs=epochs, dtype="float32", seed=seed),
                           progress=False, **SMALL, **kw)
    return model, tok, result


def test_training_changes_only_the_adapter_and_the_document_loss_falls(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    doc = tok.encode(TEXT)
    loss_before = document_loss(model, doc, SMALL["data_cfg"], dtype="float32")
    result = absorb_cached(model, tok, TEXT, train_cfg=TrainConfig(epochs=8, dtype="float32"), progress=False, **SMALL)
    assert result.trained
    for n, p in model.named_parameters():
        if gm.is_adapter_param(n):
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None
            assert torch.equal(p, before[n]), f"base tensor {n} changed"
    fresh = gm.GatedMemory(model.cfg.n_heads, model.cfg.head_dim, gm.GatedMemoryConfig())
    assert not torch.equal(model.layers[0].attention.head_adapter.mem_out, fresh.mem_out)
    loss_after = document_loss(model, doc, SMALL["data_cfg"], dtype="float32")
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)


def test_two_runs_with_one_seed_give_the_same_adapter(tiny_dir):
    a, _, _ = run_absorb(tiny_dir, use_cache=False)
    b, _, _ = run_absorb(tiny_dir, use_cache=False)
    c, _, _ = run_absorb(tiny_dir, seed=1, use_cache=False)
    sa, sb, sc = gm.adapter_state_dict(a), gm.adapter_state_dict(b), gm.adapter_state_dict(c)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not all(torch.equal(sa[n], sc[n]) for n in sa)


def test_second_absorb_of_the_same_document_loads_the_cache(tiny_dir):
    m1, tok, first = run_absorb(tiny_dir)
    m2, _, second = run_absorb(tiny_dir)
    assert first.trained and not second.trained and first.path == second.path
    ids = torch.tensor([tok.encode(TEXT)[:40]])
    with torch.no_grad():
        assert torch.equal(m1(ids), m2(ids))
    _, _, third = run_absorb(tiny_dir, epochs=2)       # another setting: another adapter
    assert third.trained and third.path != first.path


def test_answer_modes_use_and_skip_the_adapter(tiny_dir):
    """icl runs the base model on the truncated document; lift runs the adapted model on the
    question alone; lift+icl the adapted model on the truncated document."""
    from lift import answer_prompt
    from model import generate
    model, tok, _ = run_absorb(tiny_dir)
    doc = tok.encode(TEXT)
    got = {m: answer(model, tok, "What came?", doc, mode=m, context=48, max_new_tokens=8, dtype="float32")
           for m in ("icl", "lift", "lift+icl")}
    prompts = {m: answer_prompt(tok, "What came?", doc, m, 48) for m in got}
    assert len(prompts["lift"]) < len(prompts["icl"]) == len(prompts["lift+icl"])   # no document in lift
    expect = lambda m: tok.decode(generate(model, prompts[m], 8, stop_ids=tok.stop_ids)).strip()
    assert got["lift"] == expect("lift") and got["lift+icl"] == expect("lift+icl")
    with gm.disabled(model):
        assert got["icl"] == expect("icl")
    adapted_logits = model(torch.tensor([prompts["lift"]]))
    with gm.disabled(model):
        assert not torch.allclose(adapted_logits, model(torch.tensor([prompts["lift"]])))   # the adapter acts


# ----------------------------------------------------------------------------- command line
def cli(*args, cache, timeout=600):
    env = {**os.environ, "LIFT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text(TEXT * 2)
    return p


def test_cli_answers_and_second_call_uses_the_cache(tiny_dir, doc, tmp_path):
    args = ["--doc", str(doc), "--ask", "What came?", "--model", str(tiny_dir), "--window", "32",
            "--context", "48", "--epochs", "1", "--dtype", "float32", "--max-new-tokens", "4", "--quiet"]
    first = cli(*args, cache=tmp_path / "c")
    assert first.returncode == 0, first.stderr
    assert "Q: What came?" in first.stdout and "\nA: " in first.stdout and "tokens/s" in first.stderr
    second = cli(*args, cache=tmp_path / "c")
    assert second.returncode == 0 and "no training" in second.stderr and "tokens/s" not in second.stderr
    assert second.stdout == first.stdout


@pytest.mark.parametrize("setup,extra,message", [
    ("missing", [], "no such file"),
    ("empty", [], "is empty"),
    ("latin1", [], "not utf-8"),
    ("ok", ["--ask", "  "], "empty question"),
    ("ok", ["--window", "100000"], "larger than the model's context"),
    ("badqa", [], "line 2"),
    ("ok", ["--lr", "inf"], "learning rate"),
    ("ok", ["--init", "no-such-init.safetensors"], "no such file"),
])
def test_cli_bad_input_is_one_line_error_and_nothing_is_cached(tiny_dir, tmp_path, setup, extra, message):
    doc = tmp_path / "d.txt"
    args = []
    if setup == "empty":
        doc.write_text("  \n")
    elif setup == "latin1":
        doc.write_bytes("Caf\xe9 au lait".encode("latin-1"))
    elif setup in ("ok", "badqa"):
        doc.write_text(TEXT * 2)
    if setup == "badqa":
        qa = tmp_path / "qa.jsonl"
        qa.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n{broken\n")
        args = ["--qa", str(qa)]
    r = cli("--doc", str(doc), "--ask", "What came?", "--model", str(tiny_dir), "--window", "32", "--context", "48",
            "--epochs", "1", "--dtype", "float32", "--quiet", *args, *extra, cache=tmp_path / "c")
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0].lower(), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


@pytest.mark.real
def test_default_model_end_to_end_with_tiny_settings(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text((ROOT / "examples" / "orchard_chronicle.txt").read_text()[:1500])
    args = ["--doc", str(doc), "--ask", "Who founded Vellmora?", "--window", "128", "--context", "128",
            "--epochs", "1", "--max-new-tokens", "12", "--quiet"]
    first = cli(*args, cache=tmp_path / "c")
    assert first.returncode == 0, first.stderr
    assert "tokens/s" in first.stderr and len(first.stdout.split("A: ", 1)[1].strip()) > 0
    second = cli(*args, cache=tmp_path / "c")
    assert second.returncode == 0 and "no training" in second.stderr


def test_synthetic_qa_keeps_only_triples_whose_evidence_is_in_the_passage(tiny_dir, monkeypatch):
    import synth_qa
    model, tok = load_model(str(tiny_dir))
    replies = iter(["Question: What jumps? Answer: the fox Evidence: The quick brown fox jumps over the lazy dog.",
                    "Question: Who lent? Answer: a banker Evidence: A sentence that is not in the text.",
                    "no format at all"] + ["Evidence missing"] * 10)
    calls = []

    def fake_generate(model, prompt, n, **kw):
        calls.append(kw["seed"])
        return tok.encode(next(replies))
    monkeypatch.setattr(synth_qa, "generate", fake_generate)
    kept = synth_qa.synthesize_qa(model, tok, TEXT, 2, seed=0, retries=3)
    assert kept == [{"question": "What jumps?", "answer": "the fox",
                     "evidence": "The quick brown fox jumps over the lazy dog."}]
    assert len(calls) == 1 + 3 and len(set(calls)) == len(calls)     # bounded retries, fresh seed each


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    from data import Example
    from lift import example_loss
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    ids = tok.encode(TEXT)[:40]
    got = []
    for flag in (False, True):
        model.zero_grad(set_to_none=True)
        example_loss(model, Example(ids, ids), TrainConfig(dtype="float32", grad_checkpoint=flag)).backward()
        got.append({n: p.grad.clone() for n, p in gm.trainable_parameters(model).items()})
    assert all(torch.allclose(got[0][n], got[1][n], atol=1e-6) for n in got[0])


def test_one_step_per_epoch_uses_the_token_weighted_mean_of_the_examples_gradients(tiny_dir):
    """accumulate=0 (released): one step whose gradient is Σ_k (n_k / Σn) ∇L_k, n_k = labelled tokens of
    example k; compared with the gradients of the examples taken one by one."""
    from data import IGNORE, Example
    from lift import example_loss, train_adapter
    model, tok = load_model(str(tiny_dir))
    ids = tok.encode(TEXT)
    examples = [Example(ids[:30], ids[:30]), Example(ids[5:25], [IGNORE] * 12 + ids[17:25], kind="qa")]
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    cfg = TrainConfig(dtype="float32", accumulate=0, epochs=1, clip=1e9)      # no clipping: compare raw gradients
    weights = [29, 8]                                                         # labelled tokens after the shift
    want = {n: torch.zeros_like(p) for n, p in gm.trainable_parameters(model).items()}
    for ex, w in zip(examples, weights):
        model.zero_grad(set_to_none=True)
        example_loss(model, ex, cfg).backward()
        for n, p in gm.trainable_parameters(model).items():
            want[n] += p.grad * w / sum(weights)
    start = {n: p.detach().clone() for n, p in gm.trainable_parameters(model).items()}
    seen = {}
    real_step = torch.optim.AdamW.step

    def spy(opt, *a, **k):          # capture the gradient the one step sees
        seen.update({n: p.grad.clone() for n, p in gm.trainable_parameters(model).items()})
        return real_step(opt, *a, **k)
    torch.optim.AdamW.step = spy
    try:
        train_adapter(model, [examples], cfg, progress=False)
    finally:
        torch.optim.AdamW.step = real_step
    assert all(torch.allclose(seen[n], want[n], atol=1e-6) for n in want), max((seen[n] - want[n]).abs().max().item() for n in want)
    assert any(not torch.equal(p, start[n]) for n, p in gm.trainable_parameters(model).items())


def test_cache_key_changes_with_every_setting_that_changes_training(tiny_dir, tmp_path):
    from dataclasses import replace
    from cache import settings_key
    model, tok = load_model(str(tiny_dir))
    data, adapter, train = DataConfig(window=32, context=48), gm.GatedMemoryConfig(), TrainConfig(dtype="float32")
    base = settings_key(model, tok, data, adapter, train, [], 0, None)
    assert base == settings_key(model, tok, data, adapter, train, [], 0, None)
    init = tmp_path / "init.bin"
    init.write_bytes(b"x")
    variants = [replace(data, window=33), replace(data, stride=5), replace(data, context=40),
                replace(data, contextualized=True), replace(data, qa_start_epoch=1)]
    keys = [settings_key(model, tok, d, adapter, train, [], 0, None) for d in variants]
    keys += [settings_key(model, tok, data, replace(adapter, memory_mult=1), train, [], 0, None)]
    for field in ("epochs", "lr", "beta1", "beta2", "eps", "weight_decay", "clip", "accumulate", "seed"):
        value = getattr(train, field)
        keys.append(settings_key(model, tok, data, adapter, replace(train, **{field: value * 2 + 1}), [], 0, None))
    keys += [settings_key(model, tok, data, adapter, replace(train, dtype="bfloat16"), [], 0, None),
             settings_key(model, tok, data, adapter, replace(train, grad_checkpoint=True), [], 0, None),
             settings_key(model, tok, data, adapter, train, [{"question": "q", "answer": "a"}], 0, None),
             settings_key(model, tok, data, adapter, train, [], 3, None),
             settings_key(model, tok, data, adapter, train, [], 0, str(init))]
    tok.chat_template += " "                                  # another tokenizer setting
    del tok._fingerprint
    keys.append(settings_key(model, tok, data, adapter, train, [], 0, None))
    assert base not in keys and len(set(keys)) == len(keys)


def test_anchor_kl_is_zero_for_an_adapter_equal_to_the_base_and_positive_otherwise(tiny_dir):
    import lora
    from data import Example
    from lift import anchor_loss
    model, tok = load_model(str(tiny_dir))
    ex = Example(tok.encode(TEXT)[:40], tok.encode(TEXT)[:40], kind="anchor")
    cfg = TrainConfig(dtype="float32")
    lora.attach(model, lora.LoRAConfig(rank=2), seed=0)              # B = 0: exactly the base model
    assert anchor_loss(model, ex, cfg).item() == pytest.approx(0.0, abs=1e-7)
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    lora.remove(model)
    kl = anchor_loss(model, ex, cfg)
    assert kl.item() > 0 and kl.requires_grad                        # g ≈ 0.047 already moves it a little


def test_anchor_term_keeps_the_adapted_model_closer_to_the_base(tiny_dir):
    """Same document, same seed: with --anchor the KL to the base on unrelated text ends lower."""
    from data import anchor_examples
    from lift import anchor_loss
    kls = []
    for weight in (0.0, 5.0):
        model, tok = load_model(str(tiny_dir))
        absorb_cached(model, tok, TEXT, train_cfg=TrainConfig(epochs=3, dtype="float32", lr=1e-2, anchor=weight),
                      use_cache=False, progress=False, **SMALL)
        with torch.no_grad():
            kls.append(sum(anchor_loss(model, ex, TrainConfig(dtype="float32")).item()
                           for ex in anchor_examples(tok, 32)[:6]))
    assert kls[1] < kls[0] * 0.7, kls
