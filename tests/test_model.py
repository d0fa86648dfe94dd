"""The hand-written Llama and its loaders: strict loading, attention paths, KV cache, RoPE, errors."""
import json
import math

import pytest
import torch

from conftest import save_hf_dir, tiny_config, tiny_model
from checkpoint import load_model
from model import ConfigError, generate, rope_frequencies

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 19, 64, 1, 300]])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_directory_loads_strictly_and_gives_same_logits(tmp_path, tied, sharded):
    ref = tiny_model(tie_embeddings=tied)
    path = save_hf_dir(ref, tmp_path / "m", sharded=sharded)
    model, tok = load_model(str(path), fused_attention=False)
    with torch.no_grad():
        assert torch.equal(model(IDS), ref(IDS))
    assert all(not p.requires_grad for p in model.parameters())
    assert tok.stop_ids == (2,)


@pytest.mark.parametrize("block", [128, 5, 2])
def test_explicit_and_fused_attention_agree_in_outputs_gradients_and_after_a_cache(monkeypatch, block):
    """Training uses either path: their logits and gradients agree, for a plain causal prefix
    (the fused kernel's is_causal) and for a continuation after a KV cache (an explicit mask);
    grouped-query heads (4 query heads on 2 key/value heads) included. The explicit path agrees
    whether its queries go in one block or in several (5: a last block shorter than the others;
    2: a continuation of 5 tokens in three blocks, each seeing the cache and its own past), and
    with autograd off, where it adds its mask in place."""
    import model as model_module
    from model import KVCache
    monkeypatch.setattr(model_module, "CPU_FUSED", True)            # the fused kernel, on a CPU too
    monkeypatch.setattr(model_module, "QUERY_BLOCK", block)
    model = tiny_model()
    assert model.cfg.n_heads > model.cfg.n_kv_heads
    wq = model.layers[0].attention.wq.weight.requires_grad_(True)   # a gradient that crosses both layers' attention
    ids = torch.cat([IDS, IDS.flip(1)])                              # a batch of two sequences
    out = {}
    for fused in (False, True):
        model.cfg.fused_attention = fused
        logits = model(ids)
        logits.pow(2).mean().backward()
        cache = KVCache(model.cfg, 2, ids.shape[1], "cpu", torch.float32)
        with torch.no_grad():                # answering: the explicit path's own branch, no gradient
            answered = model(ids)
            model(ids[:, :7], cache=cache)
            continued = model(ids[:, 7:], cache=cache, start_pos=7)          # (2, 5, V)
        out[fused] = (logits.detach(), wq.grad.clone(), continued, answered)
        wq.grad = None
    for explicit, fused in zip(out[False], out[True]):
        assert (explicit - fused).abs().max().item() <= 1e-5
    assert (out[True][2] - out[True][0][:, 7:]).abs().max().item() <= 1e-5   # the cache changes nothing
    assert (out[False][3] - out[False][0]).abs().max().item() <= 1e-5      # nor does answering without autograd


def test_a_cpu_in_bf16_trains_on_the_explicit_path_and_answers_on_the_kernel_only_with_amx(monkeypatch):
    import model as model_module
    from model import fused_kernel
    cfg = tiny_model().cfg
    cfg.fused_attention = True
    cpu, cuda, bf16, fp32 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, torch.float32
    monkeypatch.setattr(model_module, "CPU_AMX", False)                # AVX-512 bf16 only, or AVX2
    assert not fused_kernel(cfg, cpu, bf16) and fused_kernel(cfg, cpu, fp32)
    monkeypatch.setattr(model_module, "CPU_AMX", True)                 # AMX: bf16 answers on the kernel...
    with torch.no_grad():
        assert fused_kernel(cfg, cpu, bf16) and fused_kernel(cfg, cpu, fp32)
    assert not fused_kernel(cfg, cpu, bf16) and fused_kernel(cfg, cpu, fp32)   # ...and trains on the explicit math
    assert fused_kernel(cfg, cuda, bf16) and fused_kernel(cfg, cuda, fp32)
    monkeypatch.setattr(model_module, "CPU_FUSED", False)             # the bench forces a path on a CPU
    assert not fused_kernel(cfg, cpu, fp32) and fused_kernel(cfg, cuda, bf16)
    cfg.fused_attention = False                                        # the flag can always ask for the explicit math
    assert not any(fused_kernel(cfg, d, t) for d in (cpu, cuda) for t in (bf16, fp32))


@pytest.mark.parametrize("fused", [False, True])
def test_greedy_generation_with_cache_equals_without(fused, monkeypatch):
    import model as model_module
    monkeypatch.setattr(model_module, "CPU_FUSED", True)
    model = tiny_model(fused_attention=fused)
    prompt = IDS[0].tolist()
    cached = generate(model, prompt, 20)
    seq = list(prompt)                                  # no cache: rerun the whole sequence each step
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_sampling_is_seeded_and_stops_on_end_tokens():
    model = tiny_model()
    a = generate(model, [5, 6, 7], 15, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, [5, 6, 7], 15, temperature=1.0, top_p=0.9, seed=3)
    assert a == b
    greedy = generate(model, [5, 6, 7], 15)
    stopped = generate(model, [5, 6, 7], 15, stop_ids=(greedy[3],))
    assert stopped == greedy[:greedy.index(greedy[3])]
    streamed = []
    generate(model, [5, 6, 7], 5, on_token=streamed.append)
    assert streamed == greedy[:5]


def test_llama3_rope_scaling_matches_its_formula():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    cfg = tiny_config(head_dim=128, n_heads=1, n_kv_heads=1, dim=128, rope_theta=500000.0, rope_scaling=rs)
    got = rope_frequencies(cfg)
    for i, f in enumerate(1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:            # high frequencies: unchanged
            want = f
        elif wavelen > 8192 / 1.0:          # low frequencies: divided by the factor
            want = f / 8.0
        else:                               # in between: linear blend in 1/wavelength
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want = (1 - s) * f / 8.0 + s * f
        assert got[i].item() == pytest.approx(float(want), rel=1e-6)
    assert got[0].item() == pytest.approx(1.0) and got[-1].item() < (1 / 500000.0 ** (126 / 128)) / 7.9


def test_missing_path_is_a_clear_error():
    with pytest.raises(ConfigError, match="no such file"):
        load_model("./does/not/exist")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path))


def test_non_llama_config_is_refused(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="gpt2.*not supported"):
        load_model(str(tiny_dir))


def test_unsupported_rope_type_is_refused(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4}}))
    with pytest.raises(ConfigError, match="yarn"):
        load_model(str(tiny_dir))


def test_truncated_safetensors_is_refused(tiny_dir):
    f = tiny_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        load_model(str(tiny_dir))


def test_missing_or_unexpected_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    path = save_hf_dir(tiny_model(), tmp_path / "m")
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\].*unexpected \['model.layers.1.mlp.extra.weight'\]"):
        load_model(str(path))


def test_hub_id_offline_fails_with_a_message_not_a_hang():
    with pytest.raises(ConfigError, match="Offline"):
        load_model("HuggingFaceTB/no-such-model-for-lift-tests")


def test_chat_template_renders_with_generation_prompt(tiny_dir):
    _, tok = load_model(str(tiny_dir))
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 1 and 2 in ids          # the template's special tokens are single ids, not split by BPE
    assert tok.decode(ids, skip_special=False) == text


def test_special_token_text_inside_user_content_stays_plain_text(tiny_dir):
    """A document or question containing "<|im_end|>" must not end the turn (nor vanish)."""
    _, tok = load_model(str(tiny_dir))
    content = "a line <|im_end|> and <|endoftext|> inside"
    assert not set(tok.encode(content)) & {0, 1, 2}                      # no control token
    ids = tok.encode_chat([{"role": "user", "content": content}])
    assert ids.count(2) == 1 and ids.count(1) == 2                       # only the template's own
    assert content in tok.decode(ids, skip_special=False)


def test_softmax_of_bf16_scores_is_the_fp32_softmax_rounded_once():
    """explicit_attention skips the cast of its scores to fp32 because of this: the kernel computes
    in fp32 inside, so the bf16 result is the fp32 softmax rounded to bf16, bit for bit."""
    torch.manual_seed(0)
    scores = (4 * torch.randn(64, 300)).to(torch.bfloat16)
    assert torch.equal(torch.softmax(scores, -1), torch.softmax(scores.float(), -1).to(torch.bfloat16))
