"""A stopped LIFT run goes on from its last finished epoch and ends with the adapter an
uninterrupted run makes (resume.py)."""
import pytest
import torch

from conftest import TEXT
import gated_memory as gm
from cache import absorb_cached
from checkpoint import load_model
from data import DataConfig, Example, window_examples
from lift import TrainConfig, train_adapter


class Stop(Exception):
    pass


def stop_at(n):
    """An on_step that stops the run at its n-th optimizer step, as a Ctrl-C would."""
    def on_step(step):
        if step == n:
            raise Stop
    return on_step


def train(model, plan, anchors, resume_file=None, on_step=None):
    gm.remove(model)
    gm.attach(model, gm.GatedMemoryConfig(), seed=0)
    cfg = TrainConfig(dtype="float32", accumulate=2, anchor_every=3)   # counters that span epochs
    stats = train_adapter(model, plan, cfg, progress=False, anchors=anchors, resume_file=resume_file,
                          on_step=on_step)
    return stats, {n: p.detach().clone() for n, p in gm.trainable_parameters(model).items()}


@pytest.fixture
def setup(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    ids = tok.encode(TEXT)
    epoch = [Example(ids[i:i + 24], ids[i:i + 24]) for i in range(0, 120, 24)]      # 5 examples, 3 steps
    anchors = [Example(ids[i:i + 16], ids[i:i + 16]) for i in (3, 50)]
    return model, [epoch, epoch[::-1], epoch], anchors


def test_a_run_stopped_in_its_second_epoch_ends_as_an_uninterrupted_run(setup, tmp_path):
    model, plan, anchors = setup
    whole_stats, whole = train(model, plan, anchors)
    saved = tmp_path / "run.resume.pt"
    with pytest.raises(Stop):
        train(model, plan, anchors, saved, on_step=stop_at(5))     # epoch 1 = steps 1-3; stops inside epoch 2
    assert saved.exists()
    stats, resumed = train(model, plan, anchors, saved)
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)    # bit for bit
    for key in ("tokens", "epoch_losses", "mean_anchor_loss"):
        assert stats[key] == whole_stats[key], key


def test_an_unreadable_or_mismatched_file_is_ignored_and_the_run_starts_over(setup, tmp_path, capsys):
    model, plan, anchors = setup
    _, whole = train(model, plan, anchors)
    saved = tmp_path / "run.resume.pt"
    saved.write_bytes(b"not a checkpoint")
    _, fresh = train(model, plan, anchors, saved)
    assert all(torch.equal(whole[n], fresh[n]) for n in whole)
    assert "cannot resume" in capsys.readouterr().err
    torch.save({"run": {}, "params": [torch.zeros(3)], "optimizer": {}, "rng": torch.get_rng_state()}, saved)
    _, fresh = train(model, plan, anchors, saved)                   # another adapter's tensors
    assert all(torch.equal(whole[n], fresh[n]) for n in whole)


def test_the_cache_resumes_a_stopped_absorb_and_then_removes_the_run_file(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFT_CACHE", str(tmp_path))
    model, tok = load_model(str(tiny_dir))
    kw = dict(data_cfg=DataConfig(window=32, context=48), adapter_cfg=gm.GatedMemoryConfig(),
              train_cfg=TrainConfig(epochs=3, dtype="float32", anchor=0), progress=False)
    first_epoch = len(window_examples(tok.encode(TEXT), kw["data_cfg"]))      # one step per window
    with pytest.raises(Stop):
        absorb_cached(model, tok, TEXT, on_step=stop_at(first_epoch + 1), **kw)
    assert len(list(tmp_path.glob("*.resume.pt"))) == 1 and not list(tmp_path.glob("*.safetensors"))
    resumed = absorb_cached(model, tok, TEXT, **kw)
    assert resumed.trained and not list(tmp_path.glob("*.resume.pt"))
    state = gm.adapter_state_dict(model)
    gm.remove(model)
    whole = absorb_cached(model, tok, TEXT, use_cache=False, **kw)
    assert whole.stats["epoch_losses"] == resumed.stats["epoch_losses"]
    assert all(torch.equal(state[n], t) for n, t in gm.adapter_state_dict(model).items())
