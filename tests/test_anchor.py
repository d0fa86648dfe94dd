"""--gate-open (anchor.document_gate_term): −log of the mean gate over the document's own tokens,
padding and unrelated (KL) examples left out; its gradient opens the gate there, the same with
checkpointing; and a LIFT run with it ends with the gate more open on the document. With
--gate-open-on questions it counts the closed-book questions' prompts only."""
from dataclasses import replace

import pytest
import torch

from conftest import TEXT
import gated_memory as gm
from cache import absorb_cached
from checkpoint import load_model
from data import IGNORE, DataConfig, Example, qa_example, shared_prompt
from lift import TrainConfig, batch_loss
from options import UserError
from switch import recorded


def lively(model):
    """A Gated Memory whose gate differs from token to token (a fresh one is ≈ 0.047 everywhere)."""
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    with torch.no_grad():
        for p in gm.trainable_parameters(model).values():
            p.normal_(std=0.3)


def qa_batch(model, tok):
    """Two QA examples and one unrelated (KL) example, all after the same truncated document."""
    context = TEXT[:150]
    batch = [qa_example(tok, "What came?", "The frost.", context), qa_example(tok, "How much?", "3,000 crowns", context)]
    other = qa_example(tok, "Who?", "A banker", context)
    n = sum(l != IGNORE for l in other.labels[1:])
    return batch + [Example(other.input_ids, other.labels, kind="distill",
                            teacher=torch.randn(n, model.cfg.vocab_size).log_softmax(-1))]


def test_the_term_is_minus_log_of_the_mean_gate_on_the_documents_own_tokens(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    lively(model)
    batch = qa_batch(model, tok)
    P = shared_prompt(batch)
    assert P > 0 and len(batch[0].input_ids) != len(batch[1].input_ids)      # a shared prompt, and padding
    terms = []
    batch_loss(model, batch, TrainConfig(dtype="float32", gate_open=1.0), terms)
    own = torch.cat([recorded(model, ex.input_ids, "float32")[0][:, P:].flatten() for ex in batch[:2]])
    everything = torch.cat([recorded(model, ex.input_ids, "float32")[0].flatten() for ex in batch])
    assert len(terms) == 1 and terms[0].item() == pytest.approx(-own.mean().log().item(), rel=1e-4)
    assert abs(terms[0].item() + everything.mean().log().item()) > 1e-3      # the other tokens do count out
    assert all(a.gate_log is None for a in gm.adapters(model))              # nothing collected afterwards
    for cfg, out in ((TrainConfig(dtype="float32"), []), (TrainConfig(dtype="float32", gate_open=1.0), None)):
        batch_loss(model, batch, cfg, out)                                  # off, or nowhere to put it
        assert not out
    terms = []
    batch_loss(model, batch[2:], TrainConfig(dtype="float32", gate_open=1.0), terms)
    assert terms == []                                                      # an unrelated example alone: no term


def test_on_questions_the_term_counts_only_the_prompts_of_closed_book_questions(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    lively(model)
    batch = [replace(qa_example(tok, q, a, None), kind="closed") for q, a in
             (("What came in the night?", "The frost."), ("How much?", "3,000 crowns"))]
    P = shared_prompt(batch)
    prompts = [next(i for i, label in enumerate(ex.labels) if label != IGNORE) for ex in batch]
    assert all(0 < P < n < len(ex.input_ids) for n, ex in zip(prompts, batch))
    terms = []
    batch_loss(model, batch, TrainConfig(dtype="float32", gate_open=1.0, gate_open_on="questions"), terms)
    gates = [recorded(model, ex.input_ids, "float32")[0] for ex in batch]     # (layers, T, H) each
    questions = torch.cat([g[:, P:n].flatten() for g, n in zip(gates, prompts)])
    assert len(terms) == 1 and terms[0].item() == pytest.approx(-questions.mean().log().item(), rel=1e-4)
    whole = torch.cat([g[:, P:].flatten() for g in gates])
    assert abs(questions.mean().log().item() - whole.mean().log().item()) > 1e-3   # the replies do not count
    asked = qa_example(tok, "How much?", "3,000 crowns", TEXT[:150])         # a question after the document
    window = Example(tok.encode(TEXT)[:40], tok.encode(TEXT)[:40], kind="window")
    for others in ([asked], [window]):                                       # no closed-book question: no term
        terms = []
        batch_loss(model, others, TrainConfig(dtype="float32", gate_open=1.0, gate_open_on="questions"), terms)
        assert terms == []


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_the_terms_gradient_opens_the_gate_on_the_document(tiny_dir, grad_checkpoint):
    model, tok = load_model(str(tiny_dir))
    lively(model)
    window = Example(tok.encode(TEXT)[:40], tok.encode(TEXT)[:40], kind="window")
    before = recorded(model, window.input_ids, "float32")[0].mean().item()
    terms = []
    batch_loss(model, [window], TrainConfig(dtype="float32", gate_open=1.0, grad_checkpoint=grad_checkpoint), terms)
    terms[0].backward()
    last = {n: p.grad for n, p in gm.trainable_parameters(model).items() if n.startswith(f"layers.{model.cfg.n_layers - 1}.")}
    assert all((g is None) == (".mem_" in n) for n, g in last.items())     # the last memory plays no part in it
    torch.optim.SGD(gm.trainable_parameters(model).values(), lr=0.5).step()
    assert recorded(model, window.input_ids, "float32")[0].mean().item() > before


def test_gradients_of_the_term_are_the_same_with_and_without_checkpointing(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    lively(model)
    batch = qa_batch(model, tok)
    grads = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        terms = []
        batch_loss(model, batch, TrainConfig(dtype="float32", gate_open=1.0, grad_checkpoint=ckpt), terms)
        terms[0].backward()
        grads.append({n: p.grad.clone() for n, p in gm.trainable_parameters(model).items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])


def test_a_lift_run_with_the_term_ends_with_the_gate_more_open_on_the_document(tiny_dir):
    data = DataConfig(window=32, context=48)
    gates = []
    for weight in (0.0, 1.0):
        model, tok = load_model(str(tiny_dir))
        absorb_cached(model, tok, TEXT, data_cfg=data, adapter_cfg=gm.GatedMemoryConfig(), use_cache=False,
                      train_cfg=TrainConfig(epochs=1, dtype="float32", lr=1e-2, anchor=0.0, gate_open=weight), progress=False)
        gates.append(recorded(model, tok.encode(TEXT)[:64], "float32")[0].mean().item())
    assert gates[1] > 1.5 * gates[0], gates
    with pytest.raises(UserError, match="--gate-open"):
        TrainConfig(gate_open=-1.0)
