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
from options import UserError

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


@pytest.mark.parametrize("argv", [["--help"], ["sft", "--help"]])
def test_every_help_text_prints(argv, capsys):
    """argparse formats help with %: a stray "%" in a field's help would crash --help."""
    import eval as evaluation
    import train
    with pytest.raises(SystemExit) as stop:
        train.cli(argv)
    assert stop.value.code == 0 and "--" in capsys.readouterr().out
    p = evaluation.parser()
    for sub in [p] + list(p._subparsers._group_actions[0].choices.values()):
        assert "--" in sub.format_help()


def test_a_recipe_sets_its_flags_and_an_explicit_flag_still_wins():
    import distill
    import eval as evaluation
    import train
    from dataclasses import fields
    names = {f.name for f in fields(DataConfig)} | {f.name for f in fields(TrainConfig)} | {"switch"}   # + answering's
    assert all(set(flags) <= names for flags in distill.RECIPES.values())     # no recipe key does nothing
    parse = lambda *a: train.parser(list(a)).parse_args(list(a))
    plain, study = parse("--doc", "d"), parse("--doc", "d", "--recipe", "study")
    assert (plain.distill, plain.lr, plain.closed_book) == (0, TrainConfig().lr, False)
    assert all(getattr(study, k) == v for k, v in distill.RECIPES["study"].items())
    mixed = parse("--doc", "d", "--epochs", "5", "--recipe", "study", "--no-closed-book")
    assert (mixed.epochs, mixed.closed_book, mixed.distill) == (5, False, 32)  # before or after --recipe
    paper = parse("--doc", "d", "--recipe", "paper")
    assert (paper.anchor, paper.switch, plain.switch) == (0.0, False, True)   # the paper answers without our switch
    argv = ["run", "--bench", "b", "--out", "o", "--recipe", "study", "--lr", "1e-3"]
    ran = evaluation.parser(argv).parse_args(argv)
    assert (ran.lr, ran.distill, ran.reply) == (1e-3, 32, "plain")
    with pytest.raises(SystemExit):
        parse("--doc", "d", "--recipe", "nonsense")


def run_train(*args, cache, process: bool, capsys, monkeypatch) -> tuple[int, str, str]:
    """train.py with args: in a new process (what a user runs), or in this one (the same train.cli,
    without the 3–5 s of a new process's imports): (exit status, stdout, stderr)."""
    if process:
        p = cli(*args, cache=cache)
        return p.returncode, p.stdout, p.stderr
    import train
    monkeypatch.setenv("LIFT_CACHE", str(cache))
    code = train.cli(list(args))
    return (code, *capsys.readouterr())


@pytest.mark.parametrize("adapter,process", [([], True), (["--lora-rank", "2"], False), (["--head-lora", "2"], False)])
def test_cli_answers_and_second_call_uses_the_cache(tiny_dir, doc, tmp_path, capsys, monkeypatch, adapter, process):
    args = ["--doc", str(doc), "--ask", "What came?", "--model", str(tiny_dir), "--window", "32",
            "--context", "48", "--epochs", "1", "--dtype", "float32", "--max-new-tokens", "4", "--quiet", *adapter]
    run = lambda: run_train(*args, cache=tmp_path / "c", process=process, capsys=capsys, monkeypatch=monkeypatch)
    code, out, err = run()
    assert code == 0, err
    assert "Q: What came?" in out and "\nA: " in out and "tokens/s" in err
    code, again, err = run()
    assert code == 0 and "no training" in err and "tokens/s" not in err
    assert again == out


@pytest.mark.parametrize("setup,extra,message", [
    ("missing", [], "no such file"),           # the first case in a new process, the others in this one
    ("empty", [], "is empty"),
    ("latin1", [], "not utf-8"),
    ("ok", ["--ask", "  "], "empty question"),
    ("ok", ["--window", "100000"], "larger than the model's context"),
    ("badqa", [], "line 2"),
    ("ok", ["--lr", "inf"], "learning rate"),
    ("ok", ["--init", "no-such-init.safetensors"], "no such file"),
    ("ok", ["--lora-rank", "-1"], "cannot be negative"),
    ("ok", ["--lora-rank", "2", "--head-lora", "2"], "part of gated memory"),
    ("ok", ["--init", "x.safetensors", "--head-lora", "2"], "--init cannot start one"),
])
def test_cli_bad_input_is_one_line_error_and_nothing_is_cached(tiny_dir, tmp_path, capsys, monkeypatch,
                                                                setup, extra, message):
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
    code, _, err = run_train("--doc", str(doc), "--ask", "What came?", "--model", str(tiny_dir), "--window", "32",
                             "--context", "48", "--epochs", "1", "--dtype", "float32", "--quiet", *args, *extra,
                             cache=tmp_path / "c", process=setup == "missing", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2                 # in this process, a traceback would be an exception failing the test
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0].lower(), err
    assert "Traceback" not in err
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


@pytest.mark.real
def test_default_model_end_to_end_with_tiny_settings(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text((ROOT / "examples" / "orchard_chronicle.txt").read_text()[:1500])
    args = ["--doc", str(doc), "--ask", "Who founded Vellmora?", "--window", "128", "--context", "128",
            "--epochs", "1", "--max-new-tokens", "12", "--quiet",
            "--anchor", "0",   # the anchor's 48 base replies would cost a minute; tiny-model tests cover it
            "--no-switch"]     # its threshold's 48 passes cost ~12 s a call; the tiny CLI test runs it
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


def test_compiled_training_learns_what_eager_training_learns_and_leaves_the_blocks_eager(tiny_dir):
    """--compile is speed only: the same adapter (up to fused-kernel rounding; windows, anchor and gate
    penalty on sequences padded to a bucket), and afterwards the blocks run eagerly again
    (generation would otherwise recompile for every cached step)."""
    from data import Example
    from lift import train_adapter
    model, tok = load_model(str(tiny_dir))
    ids = tok.encode(TEXT)
    plan = [[Example(ids[:32], ids[:32]), Example(ids[8:40], ids[8:40])]] * 2
    trained = []
    for flag in (False, True):
        gm.attach(model, gm.GatedMemoryConfig(), seed=0)
        start = {n: p.detach().clone() for n, p in gm.trainable_parameters(model).items()}
        train_adapter(model, plan, TrainConfig(dtype="float32", compile=flag, gate_penalty=0.1), progress=False,
                      anchors=[Example(ids[3:23], ids[3:23])])     # compiled, sequences are padded to 64
        trained.append({n: p.detach().clone() for n, p in gm.trainable_parameters(model).items()})
        gm.remove(model)
    assert all(layer._compiled_call_impl is None for layer in model.layers)
    assert any(not torch.allclose(trained[0][n], start[n], atol=1e-4) for n in start)      # it did learn
    assert all(torch.allclose(trained[0][n], trained[1][n], atol=1e-5) for n in trained[0]), \
        max((trained[0][n] - trained[1][n]).abs().max().item() for n in trained[0])


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
    assert base == settings_key(model, tok, data, adapter, replace(train, compile=True), [], 0, None)  # speed only
    init = tmp_path / "init.bin"
    init.write_bytes(b"x")
    variants = [replace(data, window=33), replace(data, stride=5), replace(data, context=40),
                replace(data, contextualized=True), replace(data, qa_start_epoch=1), replace(data, distill=4)]
    keys = [settings_key(model, tok, d, adapter, train, [], 0, None) for d in variants]
    keys += [settings_key(model, tok, data, replace(adapter, memory_mult=1), train, [], 0, None),
             settings_key(model, tok, data, replace(adapter, memory_reads="layer"), train, [], 0, None),  # a probe, set
             settings_key(model, tok, data, replace(adapter, memory_mix="add"), train, [], 0, None),
             settings_key(model, tok, data, replace(adapter, gate_fixed=1.0), train, [], 0, None),
             settings_key(model, tok, data, replace(adapter, memory_act="none"), train, [], 0, None),
             settings_key(model, tok, data, replace(adapter, memory_scale=2.0), train, [], 0, None),
             settings_key(model, tok, data, replace(adapter, head_lora=2), train, [], 0, None)]
    for field in ("epochs", "lr", "beta1", "beta2", "eps", "weight_decay", "clip", "accumulate", "qa_batch", "seed",
                  "gate_open"):
        value = getattr(train, field)
        keys.append(settings_key(model, tok, data, adapter, replace(train, **{field: value * 2 + 1}), [], 0, None))
    keys += [settings_key(model, tok, data, adapter, replace(train, dtype="bfloat16"), [], 0, None),
             settings_key(model, tok, data, adapter, replace(train, gate_open_on="questions"), [], 0, None),
             settings_key(model, tok, data, adapter, replace(train, anchor_format="question"), [], 0, None),
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


def test_anchor_base_pass_runs_once_per_example_and_changes_no_loss(tiny_dir):
    """The frozen base's states for an anchor example are kept for the run: the second use runs
    only the adapted model, with the same KL as a fresh computation."""
    from data import Example
    from lift import anchor_loss
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    ids = tok.encode(TEXT)[:40]
    ex, cfg, kept = Example(ids, ids, kind="anchor"), TrainConfig(dtype="float32"), {}
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    first = anchor_loss(model, ex, cfg, kept).item()
    second = anchor_loss(model, ex, cfg, kept).item()
    assert len(calls) == 3 and len(kept) == 1                        # base + adapted, then adapted only
    assert first == second == anchor_loss(model, ex, cfg).item()


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
                           for ex in anchor_examples(tok, length=32)[:6]))
    assert kls[1] < kls[0] * 0.7, kls


def test_gate_penalty_adds_the_mean_gate_on_the_anchor_and_closes_the_gate(tiny_dir):
    """--gate-penalty λ: the anchor's loss grows by exactly λ · (mean g over its tokens, layers and
    heads), and its gradient pushes every gate down."""
    from data import Example
    from switch import recorded
    from lift import anchor_loss
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    ids = tok.encode(TEXT)[:40]
    ex = Example(ids, ids, kind="anchor")
    plain = anchor_loss(model, ex, TrainConfig(dtype="float32", anchor=1.0)).item()
    penalised = anchor_loss(model, ex, TrainConfig(dtype="float32", anchor=1.0, gate_penalty=2.0))
    mean_g = recorded(model, ids, "float32")[0].mean().item()
    assert penalised.item() - plain == pytest.approx(2.0 * mean_g, rel=1e-4)
    penalised.backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    assert recorded(model, ids, "float32")[0].mean().item() < mean_g
    assert all(a.gate_log is None for a in gm.adapters(model))      # nothing collected outside the anchor
    with pytest.raises(UserError, match="--anchor"):
        TrainConfig(anchor=0.0, gate_penalty=1.0)


def test_anchor_prompts_carry_the_base_models_own_reply(tiny_dir):
    """Each anchor prompt is followed by the base model's greedy reply (and end of turn when it
    stopped); a stored set of replies is reused, a damaged one written again."""
    import cache
    from data import anchor_examples, anchor_prompts, end_of_turn
    from distill import ANCHOR_REPLY_TOKENS, base_replies
    from model import generate
    model, tok = load_model(str(tiny_dir))
    replies = base_replies(model, tok, "float32")
    prompts = anchor_prompts(tok)
    assert len(replies) == len(prompts)
    for p, r in list(zip(prompts, replies))[:3]:
        expected = generate(model, p, ANCHOR_REPLY_TOKENS, stop_ids=tok.stop_ids)
        assert r[:len(expected)] == expected and len(r) - len(expected) == (len(expected) < ANCHOR_REPLY_TOKENS)
        assert len(r) == len(expected) or r[-1] == end_of_turn(tok)
    examples = anchor_examples(tok, replies, length=32)
    assert [p + r for p, r in zip(prompts, replies)][0] in [e.input_ids for e in examples]
    with pytest.raises(UserError):
        anchor_examples(tok, replies[:-1])
    first = cache.anchor_set(model, tok, "float32")                 # written to the cache folder
    stored = list(cache.cache_dir().glob("anchor-replies-*.json"))
    assert len(stored) == 1
    calls = []
    real = cache.distill.base_replies
    cache.distill.base_replies = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert [e.input_ids for e in cache.anchor_set(model, tok, "float32")] == [e.input_ids for e in first]
        assert calls == []
        stored[0].write_text('["not a reply"]')
        assert [e.input_ids for e in cache.anchor_set(model, tok, "float32")] == [e.input_ids for e in first]
        assert calls == [1]
    finally:
        cache.distill.base_replies = real


def test_anchor_prompts_in_the_question_form_have_their_own_replies(tiny_dir):
    """--anchor-format question: each anchor prompt is put as a question asked without the
    document (the prompt LIFT answers in), marked up to where the base's own reply to *that*
    prompt starts; its replies are stored apart from the plain chat form's."""
    import cache
    from data import IGNORE, anchor_examples, anchor_prompts, anchor_questions, question_messages
    from distill import ANCHOR_REPLY_TOKENS
    from model import generate
    model, tok = load_model(str(tiny_dir))
    asked = anchor_prompts(tok, "question")
    assert asked == [tok.encode_chat(question_messages(q, None)) for q in anchor_questions()] != anchor_prompts(tok)
    chats = [ex for ex in cache.anchor_set(model, tok, "float32", form="question") if ex.labels[0] == IGNORE]
    assert len(chats) == len(asked) and len(list(cache.cache_dir().glob("anchor-replies-*.json"))) == 1
    for ex, prompt in list(zip(chats, asked))[:3]:
        assert ex.input_ids[:len(prompt)] == prompt and ex.labels[:len(prompt)] == [IGNORE] * len(prompt)
        reply = generate(model, prompt, ANCHOR_REPLY_TOKENS, stop_ids=tok.stop_ids)
        assert ex.labels[len(prompt):len(prompt) + len(reply)] == reply == ex.input_ids[len(prompt):len(prompt) + len(reply)]
    cache.anchor_set(model, tok, "float32")                                    # the chat form: a second file
    assert len(list(cache.cache_dir().glob("anchor-replies-*.json"))) == 2
    windows = [ex for ex in anchor_examples(tok, length=32, form="question") if ex.labels[0] != IGNORE]
    assert windows and all(ex.labels == ex.input_ids for ex in windows)        # windows of text are unchanged


def test_anchor_prompts_and_the_general_questions_do_not_overlap():
    """The general-ability set measures what the anchor did NOT show the model."""
    import json
    anchor = {l.strip().lower() for l in (ROOT / "examples/anchor_prompts.txt").read_text().splitlines()}
    general = [json.loads(l)["question"].strip().lower()
               for l in (ROOT / "examples/general_questions.jsonl").read_text().splitlines() if l.strip()]
    assert len(general) >= 50 and not anchor & set(general)


def test_gate_trace_records_every_probe_per_layer(tiny_dir):
    from gates import GateTrace
    model, tok = load_model(str(tiny_dir))
    ids = tok.encode(TEXT)
    trace = GateTrace(model, tok, ids, 32, ["Who lent the crowns?"], ["What is 2 + 2?"], "float32", every=2)
    absorb_cached(model, tok, TEXT, train_cfg=TrainConfig(epochs=1, dtype="float32", anchor=0.0),
                  use_cache=False, progress=False, on_step=trace, **SMALL)
    r = trace.result()
    assert r["steps"][:3] == [1, 2, 4] and all(s == 1 or s % 2 == 0 for s in r["steps"])
    for probe in ("document window", "document questions", "general questions"):
        assert len(r["gate_per_layer"][probe]) == len(r["steps"])
        assert all(len(v) == model.cfg.n_layers and all(0 < g < 1 for g in v) for v in r["gate_per_layer"][probe])
        assert all(0 <= s <= 1 for v in r["memory_share_per_layer"][probe] for s in v)


def test_anchor_every_n_batches_runs_the_anchor_that_often_with_n_times_its_weight(tiny_dir, monkeypatch):
    """--anchor-every 2: the anchor follows batches 0, 2, 4, ... and its KL counts twice; 1 (the
    default) is every batch and leaves the adapter cache's key as it was before the option."""
    import cache
    import lift
    from data import DataConfig, Example
    model, tok = load_model(str(tiny_dir))
    ids = tok.encode(TEXT)
    plan = [[Example(ids[i:i + 24], ids[i:i + 24]) for i in range(0, 40, 8)]]         # 5 batches
    weights, real = [], lift.anchor_loss

    def spied(m, ex, cfg, base_states):      # records the weight each anchor KL enters the gradient with
        kl = real(m, ex, cfg, base_states)
        kl.register_hook(lambda g: weights.append(g.item()))
        return kl
    monkeypatch.setattr(lift, "anchor_loss", spied)
    for every, calls in ((1, 5), (2, 3), (5, 1)):
        gm.attach(model, gm.GatedMemoryConfig(), seed=0)
        weights.clear()
        lift.train_adapter(model, plan, TrainConfig(dtype="float32", anchor_every=every), progress=False,
                           anchors=[Example(ids[3:23], ids[3:23])])
        assert weights == pytest.approx([float(every)] * calls)            # one step per batch: weight N
    key = lambda cfg: cache.settings_key(model, tok, DataConfig(), gm.GatedMemoryConfig(), cfg, [], 0, None)
    assert "anchor_every" not in cache.learning_settings(TrainConfig())
    assert key(TrainConfig(anchor_every=2)) != key(TrainConfig())
    with pytest.raises(UserError):
        TrainConfig(anchor_every=0)


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_a_shared_prompt_runs_once_and_gives_the_gradients_of_the_examples_run_whole(tiny_dir, grad_checkpoint):
    """--qa-batch: QA examples that begin with the same truncated document go through the model
    together, the document once (compute.SharedPrefix); loss and gradients are those of the
    examples run one by one, teacher (KL) examples included."""
    from data import IGNORE, Example, qa_example
    from data import shared_prompt
    from lift import batch_loss
    model, tok = load_model(str(tiny_dir))
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    with torch.no_grad():                                   # a memory that does something
        for p in gm.trainable_parameters(model).values():
            p.normal_(std=0.3)
    context = TEXT[:150]
    batch = [qa_example(tok, "What came?", "The frost.", context), qa_example(tok, "How much?", "3,000 crowns", context)]
    distilled = qa_example(tok, "Who?", "A banker", context)
    n = sum(l != IGNORE for l in distilled.labels[1:])
    distilled = Example(distilled.input_ids, distilled.labels, kind="distill",
                        teacher=torch.randn(n, model.cfg.vocab_size).log_softmax(-1))
    batch.append(distilled)
    P = shared_prompt(batch)
    assert P >= len(tok.encode(context)) - 2                # the document, not just the template's first tokens
    assert all(l == IGNORE for ex in batch for l in ex.labels[:P + 1])
    cfg = TrainConfig(dtype="float32", grad_checkpoint=grad_checkpoint)
    params = gm.trainable_parameters(model)
    model.zero_grad(set_to_none=True)
    want_loss, want_n = 0.0, 0
    for ex in batch:
        loss, n = batch_loss(model, [ex], cfg)
        loss.backward()
        want_loss, want_n = want_loss + loss.item(), want_n + n
    want = {k: p.grad.clone() for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    loss, n = batch_loss(model, batch, cfg)
    loss.backward()
    assert n == want_n and abs(loss.item() - want_loss) < 1e-4 * want_loss
    assert all(torch.allclose(params[k].grad, want[k], atol=1e-5, rtol=1e-4) for k in want), \
        max((params[k].grad - want[k]).abs().max().item() for k in want)


def test_windows_share_no_prompt_and_qa_batches_group_only_the_prompted_examples():
    from data import Example, batches, shared_prompt
    w = [Example(list(range(i, i + 40)), list(range(i, i + 40))) for i in range(3)]
    q = [Example(list(range(30)) + [90 + i], [-100] * 30 + [90 + i], kind="qa") for i in range(5)]
    assert shared_prompt(w[:1] * 2) == 0 and shared_prompt(q[:1]) == 0 and shared_prompt(q) == 29
    order = [w[0], q[0], q[1], w[1], q[2], q[3], q[4], w[2]]
    assert batches(order, 1) == [[ex] for ex in order]                      # the default: as before
    assert batches(order, 2, 3) == [[w[0], w[1]], [q[0], q[1], q[2]], [q[3], q[4]], [w[2]]]
