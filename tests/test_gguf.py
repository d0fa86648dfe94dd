"""GGUF loading: a tiny Llama written as llama.cpp would write it (q/k rows permuted, tokenizer
stored as vocabulary + merges) must load back to the same model and tokenizer."""
import numpy as np
import pytest
import torch

from conftest import CHAT_TEMPLATE, TEXT, build_tokenizer, tiny_model
from checkpoint import load_model
from model import ConfigError

GGUF_LAYER = {"attention_norm": "attn_norm", "ffn_norm": "ffn_norm", "attention.wq": "attn_q",
              "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
              "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to wq/wk rows (rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, arch="llama"):
    import gguf
    c = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    tok = build_tokenizer(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    import json
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            mod = rest.rsplit(".", 1)[0]
            if mod == "attention.wq":
                a = llamacpp_permute(a, c.n_heads)
            elif mod == "attention.wk":
                a = llamacpp_permute(a, c.n_kv_heads)
            gname = f"blk.{i}.{GGUF_LAYER[mod]}.weight"
        else:
            gname = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                     "output.weight": "output.weight"}[name]
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tok


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_loads_with_unpermuted_query_key_rows(tmp_path, tied):
    ref = tiny_model(tie_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    hf_tok = write_gguf(ref, path)
    model, tok = load_model(str(path), fused_attention=False)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids), ref(ids), atol=1e-5)
    assert tok.encode(TEXT) == hf_tok.encode(TEXT, add_special_tokens=False).ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert 2 in tok.stop_ids and tok.chat_template == CHAT_TEMPLATE


def test_gguf_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.gguf"
    write_gguf(tiny_model(), path, arch="gpt2")
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        load_model(str(path))


def test_garbage_file_named_gguf_is_refused(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="cannot read"):
        load_model(str(path))
