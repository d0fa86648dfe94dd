"""The tokenizer of a chat model: byte-level BPE (the `tokenizers` library), its special tokens,
the ids that end a reply, and the chat template (rendered with jinja2's sandbox).

Two rules matter for LIFT and are easy to get wrong:
  * Text that comes from a user (the document, a question, an answer) is always encoded as plain
    text: a literal "<|im_end|>" inside a document is a few ordinary tokens, never the control
    token that ends a turn (otherwise a document could cut its own training examples short).
  * Only the chat template's own markup becomes special tokens (`encode_chat`).
The tokenizer comes from a Hugging Face directory (tokenizer.json) or is rebuilt from the
vocabulary and merges stored in a GGUF file. Not in the paper: plumbing every LIFT run needs.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

from model import ConfigError


class Tokenizer:
    """The `tokenizers` library's tokenizer plus what a chat model needs: its special tokens,
    the ids that end a reply, and the chat template (rendered with jinja2)."""

    def __init__(self, tok, chat_template: Optional[str], bos_token: str, eos_token: str, stop_ids: list[int]):
        self.tok, self.chat_template = tok, chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.stop_ids = tuple(sorted(set(stop_ids)))
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Never adds BOS/EOS: callers decide (LIFT windows use none, the chat
        template writes its own). A special-token string inside the text stays plain text."""
        return self._encode(text, specials=False)

    def _encode(self, text: str, specials: bool) -> list[int]:
        self.tok.encode_special_tokens = not specials     # True: "<|im_end|>" is encoded as text
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """[{"role": ..., "content": ...}, ...] -> the prompt text the model was tuned on."""
        if not self.chat_template:
            # A base model: plain "role: content" lines are the best we can do.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        import jinja2.sandbox
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ConfigError(msg))
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The chat prompt as ids: the template's markup with its special tokens, each message's
        content as plain text. (Each content is swapped for a placeholder, the template rendered,
        and the pieces encoded one by one; contents start after a newline and end before a
        special token, so the pieces meet where BPE would have split anyway.)"""
        marked = [{**m, "content": f"\x00{i}\x00"} for i, m in enumerate(messages)]
        pieces = re.split(r"\x00(\d+)\x00", self.render_chat(marked, add_generation_prompt))
        ids = []
        for k, piece in enumerate(pieces):     # even k: template markup; odd k: a message's index
            ids += self._encode(piece, specials=True) if k % 2 == 0 else self.encode(messages[int(piece)]["content"])
        return ids

    def fingerprint(self) -> str:
        """A hash of the vocabulary, merges, template and end tokens: part of the adapter cache
        key, since the same text tokenized otherwise trains another adapter."""
        if not hasattr(self, "_fingerprint"):
            blob = json.dumps([self.tok.to_str(), self.chat_template, self.stop_ids])
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprint


def _token_text(t) -> str:
    return t if isinstance(t, str) or t is None else t.get("content", "")


def load_hf_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    if not (path / "tokenizer.json").exists():
        raise ConfigError(f"{path} has no tokenizer.json")
    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    tc = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
    gc = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").exists() else {}
    bos, eos = _token_text(tc.get("bos_token")) or "", _token_text(tc.get("eos_token")) or ""
    stop = gc.get("eos_token_id", [])
    stop = [stop] if isinstance(stop, int) else list(stop)
    if eos and tok.token_to_id(eos) is not None:
        stop.append(tok.token_to_id(eos))
    template = tc.get("chat_template")
    if isinstance(template, list):   # some configs hold named templates; use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(tok, template, bos, eos, stop)


# The pre-tokenizers GGUF files name in tokenizer.ggml.pre, as llama.cpp defines them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GGUF files often name a wrong EOS for chat models (SmolLM2's says <|im_start|>); llama.cpp also
# recognises end-of-generation tokens by their text. We do the same with this list.
END_TOKEN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>")


def load_gguf_tokenizer(reader) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    f = reader.fields
    kind = f["tokenizer.ggml.model"].contents()
    if kind != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "default"
    if pre == "smollm":     # digits one by one, then GPT-2's byte-level split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre == "llama-bpe":  # Llama 3: its own split regex, then bytes -> printable characters
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("default", "gpt2"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, llama-bpe, gpt2)")
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control, 4 = user-defined: both must be matched whole, never split by BPE.
    specials = [tokens[i] for i, ty in enumerate(types) if ty in (3, 4)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    def tid(key):
        return int(f[key].contents()) if key in f else None
    bos_id, eos_id = tid("tokenizer.ggml.bos_token_id"), tid("tokenizer.ggml.eos_token_id")
    stop = [i for i in (eos_id, tid("tokenizer.ggml.eot_token_id"), tid("tokenizer.ggml.eom_token_id")) if i is not None]
    stop += [tokens.index(t) for t in END_TOKEN_TEXTS if t in specials]
    template = f["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in f else None
    return Tokenizer(tok, template, tokens[bos_id] if bos_id is not None else "",
                     tokens[eos_id] if eos_id is not None else "", stop)
