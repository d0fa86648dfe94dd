"""compute.head_loss: the output head's loss a few rows at a time is the loss of the whole logits."""
import pytest
import torch
import torch.nn.functional as F

import compute
from conftest import tiny_model
from lora import LoRA, LoRAConfig


def whole_logits_loss(model, x, target):
    """The plain way: every logit at once, then the loss (what head_loss must equal)."""
    logits = F.linear(x, model.head_weight)
    if model.output_adapter is not None:
        logits = logits + model.output_adapter(x)
    logp = logits.float().log_softmax(-1)
    if isinstance(target, torch.Tensor):
        return F.nll_loss(logp, target, reduction="sum")
    return F.kl_div(logp, target(0, x.shape[0]), log_target=True, reduction="sum")


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kind", ["next tokens", "teacher"])
def test_chunked_head_loss_equals_the_whole_logits_loss_and_its_gradient(monkeypatch, kind, compiled):
    """Eagerly, and with rows_loss compiled (inside compiled_blocks, as under --compile: chunks of 3
    rows and a last one of 1, two shapes)."""
    model = tiny_model().requires_grad_(False)                      # a frozen head, as in LIFT: the chunked path
    V = model.cfg.vocab_size
    monkeypatch.setattr(compute, "HEAD_CHUNK", 3 * V)                 # 3 rows a chunk: 37 rows make 13 chunks
    torch.manual_seed(0)
    x = torch.randn(37, model.cfg.dim, requires_grad=True)
    teacher = torch.randn(37, V).log_softmax(-1)
    target = torch.randint(0, V, (37,)) if kind == "next tokens" else (lambda i, j: teacher[i:j])
    grads = []
    for loss_fn in (compute.head_loss, whole_logits_loss):
        with compute.compiled_blocks(model, compiled and loss_fn is compute.head_loss):
            assert (compute._rows_loss is compute.rows_loss) != (compiled and loss_fn is compute.head_loss)
            loss = loss_fn(model, x, target)
        (2.5 * loss).backward()                                       # the caller's scale reaches the gradient
        grads.append((loss.item(), x.grad.clone()))
        x.grad = None
    (chunked, g_chunked), (whole, g_whole) = grads
    assert chunked == pytest.approx(whole, rel=1e-5)
    assert torch.allclose(g_chunked, g_whole, atol=1e-6)
    with torch.no_grad(), compute.compiled_blocks(model, compiled):    # evaluation: the same loss, no gradient work
        assert compute.head_loss(model, x, target).item() == pytest.approx(whole, rel=1e-5)
    assert compute._rows_loss is compute.rows_loss                    # eager again after the block


def test_head_loss_with_an_output_adapter_trains_the_adapter():
    """An adapter on the output head needs gradients of its own: the logits are then computed whole."""
    model = tiny_model().requires_grad_(False)
    model.output_adapter = LoRA(model.cfg.dim, model.cfg.vocab_size, LoRAConfig(2, 4.0))
    torch.nn.init.normal_(model.output_adapter.B, std=0.1)           # B = 0 at first: make it matter
    x = torch.randn(9, model.cfg.dim)
    target = torch.randint(0, model.cfg.vocab_size, (9,))
    loss = compute.head_loss(model, x, target)
    assert loss.item() == pytest.approx(whole_logits_loss(model, x, target).item(), rel=1e-6)
    loss.backward()
    assert model.output_adapter.A.grad is not None and model.output_adapter.A.grad.abs().sum() > 0
