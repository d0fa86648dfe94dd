"""Shared fixtures: a tiny random Llama with a tiny tokenizer, saved as a Hugging Face directory,
and (session-scoped, for the few tests marked `real`) the built-in default model."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig, Transformer  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. In 1743 the frost came to the valley, "
        "and 3,000 silver crowns were lent by a banker. Question? Answer! 0123456789 ") * 4


def tiny_config(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=320,
                norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True, max_seq_len=512, fused_attention=False)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(tiny_config(**kw))
    for p in m.parameters():          # larger than default init so that outputs differ visibly
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.8, 1.2)
    return m.eval()


def build_tokenizer(vocab_size=320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT, "user assistant system Answer the question about the text above briefly."], trainer)
    return tok


HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}


def hf_state_dict(model: Transformer) -> dict:
    """Our names -> Hugging Face names, written independently of checkpoint.NAME_TABLE."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            mod, w = rest.rsplit(".", 1)
            out[f"model.layers.{i}.{LAYER_NAMES[mod]}.{w}"] = t.clone()
        else:
            out[HF_NAMES[name]] = t.clone()
    return out


def save_hf_dir(model: Transformer, path: Path, sharded=False):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "intermediate_size": c.ffn_dim, "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings, "max_position_embeddings": c.max_seq_len}))
    sd = hf_state_dict(model)
    if sharded:
        names = sorted(sd)
        half = {n: sd[n] for n in names[: len(names) // 2]}, {n: sd[n] for n in names[len(names) // 2:]}
        weight_map = {}
        for k, part in enumerate(half):
            fname = f"model-{k + 1:05d}-of-00002.safetensors"
            save_file(part, str(path / fname))
            weight_map.update({n: fname for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(sd, str(path / "model.safetensors"))
    build_tokenizer(c.vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return path


@pytest.fixture
def tiny_dir(tmp_path):
    return save_hf_dir(tiny_model(), tmp_path / "tiny")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own adapter cache and never touches the network."""
    monkeypatch.setenv("LIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


_BASE_REPLIES = {}


@pytest.fixture(autouse=True)
def _base_replies_once_per_session(monkeypatch):
    """The anchor's base replies (distill.base_replies: 48 greedy replies) depend only on the base
    model, its tokenizer, the dtype and the prompts' form, and most tests train the same tiny
    model: each test has its own cache folder, so without this every one of them would write the
    same replies again. Tests of the replies themselves compare them with `generate` directly."""
    import distill
    from checkpoint import fingerprint
    real = distill.base_replies

    def once(model, tok, dtype, progress=False, form="chat"):
        key = (fingerprint(model), tok.fingerprint(), dtype, form)
        if key not in _BASE_REPLIES:
            _BASE_REPLIES[key] = real(model, tok, dtype, progress, form)
        return [list(r) for r in _BASE_REPLIES[key]]
    monkeypatch.setattr(distill, "base_replies", once)


@pytest.fixture(scope="session")
def default_model():
    from checkpoint import load_model
    return load_model(None, dtype=torch.float32)
