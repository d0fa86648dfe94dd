"""The LoRA baseline: starts as the base model, trains only its own tensors, saves and loads exactly."""
import pytest
import torch

from conftest import tiny_model
import lora
from adapters import load_adapter_file
from model import ConfigError

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])


def test_fresh_lora_is_the_base_model_and_only_lora_is_trainable():
    base, model = tiny_model(), tiny_model()
    lora.attach(model, lora.LoRAConfig(rank=4), seed=0)
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_state_dict(model)) and len(trainable) == 2 * 7 * model.cfg.n_layers


def test_lora_save_load_and_disable(tmp_path):
    base, model = tiny_model(), tiny_model()
    lora.attach(model, lora.LoRAConfig(rank=4), seed=0)
    with torch.no_grad():
        for a in lora.adapters(model):
            a.B.normal_(std=0.1)
        want = model(IDS)
        with lora.disabled(model):
            assert torch.equal(model(IDS), base(IDS))
    assert not torch.equal(want, base(IDS))
    lora.save(model, str(tmp_path / "l.safetensors"))
    fresh = tiny_model()
    load_adapter_file(fresh, str(tmp_path / "l.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(IDS), want)
    with pytest.raises(ConfigError, match="another base model"):
        load_adapter_file(tiny_model(seed=3), str(tmp_path / "l.safetensors"))


@pytest.mark.parametrize("targets, hooked", [("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3")),
                                             ("values", ("wv", "wo")), ("wo", ("wo",))])
def test_lora_on_part_of_the_block_updates_only_those_projections(targets, hooked):
    base, model = tiny_model(), tiny_model()
    lora.attach(model, lora.LoRAConfig(rank=4, targets=targets), seed=0)
    names = {n.split("_", 1)[1] for n in model.lora}            # "0_attention_wq" -> "attention_wq"
    assert {n.rsplit("_", 1)[1] for n in names} == set(hooked)
    with torch.no_grad():
        for a in lora.adapters(model):
            a.B.normal_(std=0.1)
        assert not torch.equal(model(IDS), base(IDS))          # the hooks that are there do act
    assert len(lora.adapter_state_dict(model)) == 2 * len(hooked) * model.cfg.n_layers
