"""Gated Memory (§3.3): the gate's limits, its independence from position, the frozen base, and
adapter files that hold exactly the adapter and refuse a foreign base model."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
import gated_memory as gm
from adapters import load_adapter_file
from model import ConfigError

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 19, 64, 1, 300]])


def with_adapter(seed=0, **kw):
    model = tiny_model()
    gm.attach(model, gm.GatedMemoryConfig(**kw), seed=seed)
    return model


def spread_memory():
    """One layer's Gated Memory (4 heads of 16) with large random weights, so that its gates spread
    over (0, 1) and m is far from 0; and queries and attention outputs for it."""
    torch.manual_seed(0)
    mem = gm.GatedMemory(4, 16, gm.GatedMemoryConfig(gate_shift=0.5))
    with torch.no_grad():
        for p in mem.parameters():
            p.normal_(std=0.3)
    return mem, torch.randn(2, 7, 4, 16), torch.randn(2, 7, 4, 16)


def test_gate_forced_to_zero_gives_the_base_model_exactly():
    base = tiny_model()
    model = with_adapter()
    for a in gm.adapters(model):
        a.force_gate = 0.0
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))


def test_output_is_one_minus_g_times_attention_plus_g_times_memory():
    """o = (1 − g(q))·attn + g(q)·m(q), per head, with g from the gate MLP (not a forced value)."""
    mem, q, attn = spread_memory()
    g = torch.sigmoid(3 * (torch.einsum("bthr,hr->bth", F.silu(torch.einsum("bthd,hdr->bthr", q, mem.gate_in)),
                                         mem.gate_out) - 0.5)).unsqueeze(-1)
    m = torch.einsum("bthw,hwd->bthd", F.silu(torch.einsum("bthd,hdw->bthw", q, mem.mem_in)), mem.mem_out)
    assert g.std() > 0.1 and m.abs().mean() > 0.1            # a case where both terms and g's value matter
    assert torch.allclose(mem(q, attn), (1 - g) * attn + g * m, atol=1e-5)


def test_the_add_mix_keeps_attention_whole_and_adds_g_times_memory():
    """--memory-mix add: o = attn + g(q)·m(q), attention never damped; a fresh one is the base up to m ≈ 0."""
    mem, q, attn = spread_memory()
    g, m = mem.gate(q), mem.memory(q)
    mem.cfg = gm.GatedMemoryConfig(gate_shift=0.5, memory_mix="add")
    assert torch.allclose(mem(q, attn), attn + g * m, atol=1e-5)
    assert not torch.allclose(mem(q, attn), (1 - g) * attn + g * m, atol=1e-2)   # the blend differs here
    mem.record_gates = True                                   # the memory's share, against attention undamped
    mem(q, attn)
    a, b = attn[0].norm(dim=-1), (g * m)[0].norm(dim=-1)
    assert torch.allclose(mem.last_share, b / (a + b), atol=1e-5)
    torch.manual_seed(1)
    fresh, blend = (gm.GatedMemory(4, 16, gm.GatedMemoryConfig(memory_mix=mix)) for mix in ("add", "blend"))
    blend.load_state_dict(fresh.state_dict())
    off = {mix: (a(q, attn) - attn).abs().max() for mix, a in (("add", fresh), ("blend", blend))}
    assert off["add"] < 0.01 * off["blend"]                   # the blend damps by 1 − 0.047, the add does not


def test_in_bf16_the_blend_stays_in_bf16_and_within_its_rounding_of_the_fp32_output():
    """Under bf16 autocast the blend runs in the attention's dtype (no fp32 copies of the heads);
    it must still be the fp32 formula up to bf16's rounding."""
    mem, q, attn = spread_memory()
    exact = mem(q, attn)
    with torch.autocast("cpu", torch.bfloat16):
        low = mem(q.bfloat16(), attn.bfloat16())
    assert low.dtype == torch.bfloat16
    assert (low.float() - exact).abs().max() < 0.03 * exact.abs().max()


def test_gate_floor_shuts_exactly_the_heads_below_it_and_keeps_the_others():
    """sameness.py's probe: g < floor -> that head's output is its attention, bit for bit."""
    mem, q, attn = spread_memory()
    g, free = mem.gate(q), mem(q, attn)
    mem.gate_floor = g.median().item()
    shut = (g < mem.gate_floor).expand_as(attn)
    floored = mem(q, attn)
    assert 0 < shut.float().mean() < 1                          # some heads shut, some not
    assert torch.equal(floored[shut], attn[shut])
    assert torch.equal(floored[~shut], free[~shut])


def test_a_gate_gain_multiplies_the_learned_gate_caps_it_at_one_and_is_undone_after():
    """eval.py --gate-gain: inside gate_gained(model, k) every learned g is min(1, k·g); after it, g."""
    mem, q, attn = spread_memory()
    model = with_adapter()
    model.layers[0].attention.head_adapter = mem          # the spread gates, in a model
    g, free = mem.gate(q), mem(q, attn)
    assert (g > 0.5).any() and (g < 0.5).any()            # so that a gain of 2 caps some gates and not others
    with gm.gate_gained(model, 2.0):
        assert torch.allclose(mem(q, attn), attn + (2 * g).clamp(max=1.0) * (mem.memory(q) - attn), atol=1e-5)
        assert all(a.gate_gain == 2.0 for a in gm.adapters(model))
    assert all(a.gate_gain == 1.0 for a in gm.adapters(model)) and torch.equal(mem(q, attn), free)


def test_a_gate_floor_at_or_above_the_fresh_gate_is_refused():
    """σ(−3) ≈ 0.0474: a floor above it would shut every gate of a fresh adapter for good."""
    assert gm.GatedMemory(2, 16, gm.GatedMemoryConfig(gate_floor=0.04)).gate_floor == 0.04
    for bad in (0.05, -0.01):
        with pytest.raises(ConfigError):
            gm.GatedMemoryConfig(gate_floor=bad)
    gm.GatedMemoryConfig(gate_shift=0.0, gate_floor=0.3)      # a gate that starts at 0.5 allows more


def test_gate_forced_to_one_makes_a_head_output_its_memory():
    model = with_adapter()
    attn = model.layers[0].attention
    mem = attn.head_adapter
    mem.force_gate = 1.0
    x = torch.randn(1, 5, model.cfg.dim)
    q = attn.wq(x).view(1, 5, model.cfg.n_heads, model.cfg.head_dim)
    y = torch.randn_like(q)                                    # any attention output: it must be ignored
    assert torch.allclose(mem(q, y), mem.memory(q), atol=1e-6)


def test_gate_stays_strictly_between_zero_and_one():
    # (In fp32 a sigmoid saturates to exactly 0 or 1 once |3(u - 1)| passes ~17-88, so we test a
    # wide but finite regime: weights far from their initialisation, gates spread over (0, 1).)
    torch.manual_seed(0)
    mem = gm.GatedMemory(4, 16, gm.GatedMemoryConfig())
    with torch.no_grad():
        for p in mem.parameters():
            p.normal_(std=0.3)
    g = mem.gate(torch.randn(2, 50, 4, 16))
    assert (g > 0).all() and (g < 1).all()
    assert g.min() < 0.01 and g.max() > 0.9                   # the regime really is wide


def test_fresh_gate_is_sigmoid_of_minus_three():
    mem = gm.GatedMemory(4, 16, gm.GatedMemoryConfig())
    g = mem.gate(torch.randn(1, 30, 4, 16))
    assert torch.allclose(g, torch.full_like(g, 1 / (1 + math.exp(3))), atol=2e-3)


def test_gate_and_memory_do_not_depend_on_position():
    """The same token at different positions gets the same q before rotary embedding, so the
    same g and m: record what the adapter sees and compare across positions."""
    model = with_adapter()
    seen = {}
    mem = model.layers[0].attention.head_adapter
    mem.register_forward_hook(lambda mod, inp, out: seen.update(q=inp[0]))
    with torch.no_grad():
        model(torch.tensor([[7, 7, 7, 7, 7, 7]]))           # layer 0 input is the embedding only
    q = seen["q"]                                             # (1, T, H, D)
    g, m = mem.gate(q), mem.memory(q)
    assert torch.allclose(g[0, 0], g[0, 5]) and torch.allclose(m[0, 0], m[0, 5])
    assert not torch.allclose(q[0, 0], torch.zeros_like(q[0, 0]))


def test_a_fresh_adapter_changes_the_loss_of_ordinary_text_only_a_little():
    """g ≈ 0.047 shrinks every attention output by ≈ 5%; on the tiny model the loss moves by < 5%."""
    base, model = tiny_model(), with_adapter()
    with torch.no_grad():
        lb = F.cross_entropy(base(IDS)[0, :-1], IDS[0, 1:]).item()
        la = F.cross_entropy(model(IDS)[0, :-1], IDS[0, 1:]).item()
    assert abs(la - lb) / lb < 0.05


def test_only_adapter_tensors_are_trainable_and_they_are_per_head():
    model = with_adapter()
    names = set(gm.trainable_parameters(model))
    c = model.cfg
    want = {f"layers.{i}.attention.head_adapter.{n}" for i in range(c.n_layers)
            for n in ("mem_in", "mem_out", "gate_in", "gate_out")}
    assert names == want == set(gm.adapter_state_dict(model))
    mem = model.layers[0].attention.head_adapter
    assert mem.mem_in.shape == (c.n_heads, c.head_dim, 2 * c.head_dim)
    assert mem.gate_in.shape == (c.n_heads, c.head_dim, math.isqrt(c.head_dim))


def test_save_then_load_gives_identical_logits(tmp_path):
    model = with_adapter()
    with torch.no_grad():
        for p in gm.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.1)
        want = model(IDS)
    gm.save(model, str(tmp_path / "a.safetensors"), {"note": "x"})
    fresh = tiny_model()
    extra = load_adapter_file(fresh, str(tmp_path / "a.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(IDS), want)
    assert extra == {"note": "x"}
    assert not (set(p for p in tmp_path.iterdir()) - {tmp_path / "a.safetensors"})   # no temp file left


def test_adapter_for_another_base_model_is_refused(tmp_path):
    gm.save(with_adapter(), str(tmp_path / "a.safetensors"))
    other = tiny_model(seed=1)
    with pytest.raises(ConfigError, match="another base model"):
        load_adapter_file(other, str(tmp_path / "a.safetensors"))


def test_disabled_context_runs_the_base_model_and_restores_the_adapter():
    base, model = tiny_model(), with_adapter()
    with torch.no_grad(), gm.disabled(model):
        assert torch.equal(model(IDS), base(IDS))
    assert len(gm.adapters(model)) == model.cfg.n_layers


def test_a_memory_reading_the_layer_sees_every_heads_query_at_the_papers_weight_count():
    """--memory-reads layer: head h's memory changes when another head's query changes (the paper's
    reads only its own), with about the paper's number of memory weights (H = 9, D = 64: SmolLM2)."""
    torch.manual_seed(0)
    own, layer = (gm.GatedMemory(4, 16, gm.GatedMemoryConfig(memory_reads=r)) for r in ("head", "layer"))
    for mem in (own, layer):
        with torch.no_grad():
            mem.mem_out.normal_(std=0.3)
    q = torch.randn(1, 5, 4, 16)
    other = q.clone()
    other[:, :, 1] += 1.0                                      # only head 1's query moves
    assert torch.equal(own.memory(q)[:, :, 0], own.memory(other)[:, :, 0])
    assert not torch.allclose(layer.memory(q)[:, :, 0], layer.memory(other)[:, :, 0])
    weights = {r: sum(p.numel() for n, p in gm.GatedMemory(9, 64, gm.GatedMemoryConfig(memory_reads=r))
                      .named_parameters() if n.startswith("mem_")) for r in ("head", "layer")}
    assert abs(weights["layer"] / weights["head"] - 1) < 0.02


def test_a_memory_reading_attention_takes_what_attention_gathered_not_the_query():
    """--memory-reads attention: with the gate held, the head's output follows its attention
    output through the memory, (1 − g)·attn + g·m(attn), and no longer moves with the query (the
    paper's does); the gate still reads the query; same weight count as the paper's memory."""
    torch.manual_seed(0)
    paper, reads = (gm.GatedMemory(4, 16, gm.GatedMemoryConfig(memory_reads=r)) for r in ("head", "attention"))
    for mem in (paper, reads):
        with torch.no_grad():
            mem.mem_out.normal_(std=0.3)
        mem.force_gate = 0.5
    q, attn = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 4, 16)
    other = q + 1.0
    assert torch.allclose(reads(q, attn), 0.5 * attn + 0.5 * reads.memory(attn), atol=1e-6)
    assert torch.equal(reads(q, attn), reads(other, attn))
    assert not torch.allclose(paper(q, attn), paper(other, attn))
    reads.force_gate = None
    assert not torch.allclose(reads(q, attn), reads(other, attn))       # through the gate only
    count = {n: sum(p.numel() for p in m.parameters()) for n, m in (("head", paper), ("attention", reads))}
    assert count["head"] == count["attention"]


def test_a_memory_reading_the_layers_attention_mixes_heads_as_lora_on_wo_does():
    """--memory-reads attention_layer: each head's memory reads all the heads' attention outputs, so
    changing one head's attention moves every head's output (with 'attention' only its own), at
    about the paper's weight count."""
    torch.manual_seed(0)
    own, whole = (gm.GatedMemory(4, 16, gm.GatedMemoryConfig(memory_reads=r, memory_mix="add", gate_fixed=1.0))
                  for r in ("attention", "attention_layer"))
    q, attn = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 4, 16)
    other = attn.clone()
    other[:, :, 0] += 1.0                                     # only head 0's attention changes
    for mem in (own, whole):
        with torch.no_grad():
            mem.mem_out.normal_(std=0.3)
    assert torch.equal(own(q, attn)[:, :, 1:], own(q, other)[:, :, 1:])
    assert not torch.allclose(whole(q, attn)[:, :, 1:], whole(q, other)[:, :, 1:])
    assert whole.mem_in.shape[1] == 4 * 16
    count = {n: sum(p.numel() for p in m.parameters()) for n, m in (("own", own), ("whole", whole))}
    assert abs(count["whole"] - count["own"]) / count["own"] < 0.1


def test_a_linear_memory_is_one_low_rank_matrix_on_the_layers_attention():
    """--memory-act none: m = W2·W1·x with no SiLU between, so sums and multiples of what it reads
    pass through (the paper's SiLU memory does not), and with memory_reads 'attention_layer', add and
    g = 1, the layer's heads change by one matrix of rank at most H·hidden applied to their attention:
    a LoRA on wo's input."""
    torch.manual_seed(0)
    H, D = 4, 16
    linear, silu = (gm.GatedMemory(H, D, gm.GatedMemoryConfig(memory_reads="attention_layer", memory_mix="add",
                                                                gate_fixed=1.0, memory_act=act))
                    for act in ("none", "silu"))
    for mem in (linear, silu):
        with torch.no_grad():
            mem.mem_out.normal_(std=0.3)
    q, a, b = (torch.randn(1, 5, H, D) for _ in range(3))
    assert torch.allclose(linear.memory(a + 2 * b), linear.memory(a) + 2 * linear.memory(b), atol=1e-5)
    assert not torch.allclose(silu.memory(a + 2 * b), silu.memory(a) + 2 * silu.memory(b), atol=1e-3)
    with torch.no_grad():
        M = linear.memory(torch.eye(H * D).view(H * D, 1, H, D)).reshape(H * D, H * D)   # row i: m(e_i)
        assert torch.allclose(linear(q, a).flatten(2), a.flatten(2) + a.flatten(2) @ M, atol=1e-5)
    hidden = linear.mem_in.shape[2]
    assert H * hidden < H * D and torch.linalg.matrix_rank(M) <= H * hidden


def test_a_scaled_memory_outputs_s_times_as_much_and_adam_moves_it_s_times_as_far():
    """--memory-scale s multiplies m by s, as LoRA multiplies its update by alpha/rank. Adam's first
    step moves each weight by lr in the direction of its gradient's sign, whatever the gradient's
    size, so from the same weights and one step on the same loss, the scaled memory's output is
    still exactly s times the unscaled one's: at one lr, its output moves s times as far."""
    torch.manual_seed(0)
    q, a, target = (torch.randn(2, 5, 4, 16) for _ in range(3))
    mems = [gm.GatedMemory(4, 16, gm.GatedMemoryConfig(gate_fixed=1.0, memory_mix="add", memory_scale=s))
            for s in (1.0, 2.0)]
    mems[1].load_state_dict(mems[0].state_dict())
    assert torch.allclose(mems[1].memory(q), 2 * mems[0].memory(q))
    before = mems[0].memory(q).detach()
    for mem in mems:
        opt = torch.optim.Adam(mem.parameters(), lr=1e-2, eps=1e-12)
        (mem(q, a) * target).sum().backward()            # the same pull on the output, for both
        opt.step()
    for name in ("mem_in", "mem_out"):                   # the same weights again
        assert torch.allclose(getattr(mems[0], name), getattr(mems[1], name), rtol=0, atol=1e-7)
    moved = mems[0].memory(q).detach() - before
    assert moved.abs().max() > 1e-2
    assert torch.allclose(mems[1].memory(q) - 2 * before, 2 * moved, atol=1e-5)
    with pytest.raises(ConfigError, match="memory-scale"):
        gm.GatedMemoryConfig(memory_scale=0.0)


def test_a_fixed_gate_has_no_weights_holds_every_token_at_its_value_and_trains_and_reloads(tmp_path):
    """--gate-fixed c: no gate MLP (fewer weights, nothing of it to train or save); g = c for every
    token, so with memory_mix 'add' a head's output is attn + c·m; the memory still trains, the file
    restores it; and a gate outside [0, 1] is refused."""
    torch.manual_seed(0)
    fixed = gm.GatedMemory(4, 16, gm.GatedMemoryConfig(gate_fixed=0.7, memory_mix="add"))
    learned = gm.GatedMemory(4, 16, gm.GatedMemoryConfig(memory_mix="add"))
    assert {n for n, _ in fixed.named_parameters()} == {"mem_in", "mem_out"}
    assert sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in fixed.parameters()) == 4 * (16 * 4 + 4)
    with torch.no_grad():
        fixed.mem_out.normal_(std=0.3)
    fixed.record_gates = True
    q, attn = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 4, 16)
    assert torch.allclose(fixed(q, attn), attn + 0.7 * fixed.memory(q), atol=1e-6)
    assert torch.equal(fixed.last_gates, torch.full((5, 4), 0.7))
    model = with_adapter(gate_fixed=1.0)
    F.cross_entropy(model(IDS)[0, :-1], IDS[0, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gm.trainable_parameters(model).values())
    path = tmp_path / "fixed.safetensors"
    gm.save(model, str(path))
    again = tiny_model()
    load_adapter_file(again, str(path))
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="gate-fixed"):
            gm.GatedMemoryConfig(gate_fixed=bad)


def test_the_output_heads_lora_starts_as_a_no_op_trains_saves_and_switches_off(tmp_path):
    """--head-lora 2 (the released code's rank-2 LoRA on the output head, alpha 4): B = 0, so a
    fresh one adds nothing to the logits; it is trainable beside the memory, gets a gradient, is
    saved and restored with it, and gm.disabled switches it off with the memory."""
    plain, model = with_adapter(), with_adapter(head_lora=2)
    with torch.no_grad():
        assert torch.equal(model(IDS), plain(IDS))
    head = {n for n in gm.trainable_parameters(model) if n.startswith("output_adapter.")}
    assert head == {"output_adapter.A", "output_adapter.B"} and model.output_adapter.scale == 2.0
    assert model.output_adapter.B.shape == (model.cfg.vocab_size, 2)
    F.cross_entropy(model(IDS)[0, :-1], IDS[0, 1:]).backward()
    assert model.output_adapter.B.grad.abs().sum() > 0
    with torch.no_grad():
        model.output_adapter.B.normal_(std=0.5)
        want = model(IDS)
        assert not torch.equal(want, plain(IDS))
        with gm.disabled(model):
            assert torch.equal(model(IDS), tiny_model()(IDS))
        assert torch.equal(model(IDS), want)
    gm.save(model, str(tmp_path / "a.safetensors"))
    fresh = tiny_model()
    load_adapter_file(fresh, str(tmp_path / "a.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(IDS), want)
    gm.remove(fresh)
    assert fresh.output_adapter is None and not gm.adapters(fresh)
