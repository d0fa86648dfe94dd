"""Pre-LIFT SFT: the loss is window loss + γ·answer loss, held-out documents are never trained
on, an interrupted run resumes to the same result, and --init loads exactly or refuses."""
import pytest
import torch

import gated_memory as gm
import sft
from checkpoint import load_model
from conftest import save_hf_dir, tiny_model
from data import DataConfig
from adapters import load_adapter_file
from lift import TrainConfig
from model import ConfigError
from options import UserError

DATA = DataConfig(window=48, context=32)
TRAIN = TrainConfig(dtype="float32", lr=1e-2)
SMALL = sft.SFTConfig(docs=4, heldout=2, doc_tokens=120, questions=2, docs_per_step=2, epochs=2)


def grads(model):
    return {n: p.grad.clone() for n, p in gm.trainable_parameters(model).items()}


def test_sft_gradient_is_window_term_plus_gamma_times_answer_term(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    with torch.no_grad():
        for p in gm.trainable_parameters(model).values():
            p.normal_(std=0.05)                       # away from init, so both terms have gradients
    doc = sft.make_corpus(tok, SMALL, None)[0][0]
    windows, qa = sft.document_examples(tok, doc, DATA)
    assert windows and qa
    results = {}
    for name, (w, a, gamma) in {"win": (windows, [], 1.0), "ans": ([], qa, 1.0), "both": (windows, qa, 2.5)}.items():
        model.zero_grad(set_to_none=True)
        results[name] = sft.document_loss_terms(model, w, a, TRAIN, scale=1.0, gamma=gamma), grads(model)
    (w_loss, _), g_win = results["win"]
    (_, a_loss), g_ans = results["ans"]
    (w2, a2), g_both = results["both"]
    assert (w2, a2) == pytest.approx((w_loss, a_loss))
    for n in g_both:
        assert torch.allclose(g_both[n], g_win[n] + 2.5 * g_ans[n], atol=1e-6)


def test_heldout_documents_never_reach_a_training_batch(tiny_dir, tmp_path, monkeypatch):
    model, tok = load_model(str(tiny_dir))
    seen = []
    real = sft.document_examples
    monkeypatch.setattr(sft, "document_examples", lambda t, d, c: seen.append(d["document"]) or real(t, d, c))
    sft.run_sft(model, tok, tmp_path / "s", SMALL, DATA, TRAIN, progress=False)
    train, heldout = sft.make_corpus(tok, SMALL, None)
    assert set(seen) == {d["document"] for d in train}
    assert not set(seen) & {d["document"] for d in heldout}
    assert (tmp_path / "s" / "init.safetensors").exists()


def test_resumed_run_equals_uninterrupted_run(tiny_dir, tmp_path):
    model, tok = load_model(str(tiny_dir))
    sft.run_sft(model, tok, tmp_path / "full", SMALL, DATA, TRAIN, progress=False)
    want = {n: t.clone() for n, t in gm.adapter_state_dict(model).items()}
    model, tok = load_model(str(tiny_dir))
    sft.run_sft(model, tok, tmp_path / "cut", SMALL, DATA, TRAIN, max_steps=1, progress=False)
    assert not (tmp_path / "cut" / "init.safetensors").exists()
    model, tok = load_model(str(tiny_dir))                           # a new process, as after a crash
    stats = sft.run_sft(model, tok, tmp_path / "cut", SMALL, DATA, TRAIN, progress=False)
    assert [r["step"] for r in stats["log"]] == [2, 3, 4]              # continued from the saved step
    got = gm.adapter_state_dict(model)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_init_loads_exactly_and_refuses_a_mismatch(tiny_dir, tmp_path):
    model, tok = load_model(str(tiny_dir))
    sft.run_sft(model, tok, tmp_path / "s", SMALL, DATA, TRAIN, progress=False)
    trained = {n: t.clone() for n, t in gm.adapter_state_dict(model).items()}
    path = str(tmp_path / "s" / "init.safetensors")
    fresh, _ = load_model(str(tiny_dir))
    load_adapter_file(fresh, path, expect=gm.GatedMemoryConfig())
    assert all(torch.equal(gm.adapter_state_dict(fresh)[n], trained[n]) for n in trained)
    with pytest.raises(UserError, match="another adapter shape"):
        load_adapter_file(fresh, path, expect=gm.GatedMemoryConfig(memory_mult=1))
    other = load_model(str(save_hf_dir(tiny_model(seed=5), tmp_path / "other")))[0]
    with pytest.raises(ConfigError, match="another base model"):
        load_adapter_file(other, path, expect=gm.GatedMemoryConfig())


def test_eval_compares_default_and_sft_initialisation(tiny_dir, tmp_path):
    import benchmarks as bm
    import eval as ev
    model, tok = load_model(str(tiny_dir))
    sft.run_sft(model, tok, tmp_path / "s", SMALL, DATA, TRAIN, progress=False)
    docs = bm.read_benchmark(str(tmp_path / "s" / "heldout.jsonl"))
    common = dict(modes=["icl", "lift+icl"], adapters=["gated_memory"], model_name=str(tiny_dir), data_cfg=DATA,
                  train_cfg=TrainConfig(epochs=1, dtype="float32"), max_new_tokens=3, train_qa=False, lora_rank=2)
    ev.run(docs, tmp_path / "cmp", **common)
    records = ev.run(docs, tmp_path / "cmp", **common, init=str(tmp_path / "s" / "init.safetensors"))
    n_q = sum(len(d["questions"]) for d in docs)
    assert sorted({r["adapter"] for r in records}) == ["gated_memory", "gated_memory+sft", "none"]
    assert len(records) == 3 * n_q                    # icl once, lift+icl per initialisation
    assert "gated_memory+sft" in (tmp_path / "cmp" / "summary.md").read_text()
