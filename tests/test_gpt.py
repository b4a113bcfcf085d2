"""nanochat.gpt on CPU: shapes, causality, GQA, the KV-cache interface, FLOPs, init and the config dial."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomized
from nanochat.gpt import GPT, AttentionMasks, GPTConfig, apply_rotary, rms_norm


def small(**kwargs) -> GPTConfig:
    return GPTConfig(
        **{"sequence_len": 32, "vocab_size": 100, "n_layer": 2, "n_head": 4, "n_kv_head": 4, "n_embd": 64, **kwargs}
    )


class ListCache:
    """The simplest cache the model's protocol allows: one growing tensor pair per layer, rows aligned. Kept
    independent of nanochat/engine.py so the protocol itself is tested here."""

    def __init__(self, n_layer, max_len=32):
        self.kv = [None] * n_layer
        self.pos = 0
        self.max_len = max_len

    def prepare(self, T):
        positions = torch.arange(self.pos, self.pos + T)[None, :]
        mask = torch.ones(T, self.pos + T, dtype=torch.bool).tril(diagonal=self.pos)  # token i sees <= pos + i
        return positions, mask

    def insert_kv(self, layer_idx, k, v):
        if self.kv[layer_idx] is not None:
            k = torch.cat([self.kv[layer_idx][0], k], dim=2)
            v = torch.cat([self.kv[layer_idx][1], v], dim=2)
        self.kv[layer_idx] = (k, v)
        if layer_idx == len(self.kv) - 1:
            self.pos = k.size(2)
        return k, v


def test_shapes_dtypes_and_padded_vocab():
    model = randomized(small())
    idx = torch.randint(0, 100, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 100) and logits.dtype == torch.float32
    assert model.wte.weight.shape[0] == model.lm_head.weight.shape[0] == 128  # padded to a multiple of 64
    assert logits.abs().max() <= 15.0  # soft-capped
    loss = model(idx, idx)
    assert loss.ndim == 0
    per_token = model(idx, idx, loss_reduction="none")
    assert per_token.shape == (3 * 17,) and torch.allclose(per_token.mean(), loss)


def test_ignore_index_is_minus_one():
    model = randomized(small())
    idx = torch.randint(0, 100, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    per_token = model(idx, targets, loss_reduction="none").view(2, 8)
    assert (per_token[:, :4] == 0).all() and (per_token[:, 4:] > 0).all()
    assert torch.allclose(model(idx, targets), per_token[:, 4:].mean())


def test_fresh_model_predicts_uniformly():
    model = GPT.build(small())
    idx = torch.randint(0, 100, (2, 10))
    assert math.isclose(model(idx, idx).item(), math.log(100), rel_tol=1e-6)  # zero lm_head


def test_causal_future_tokens_never_change_past_logits():
    model = randomized(small())
    idx = torch.randint(0, 100, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 100
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_head):
    gqa = randomized(small(n_kv_head=n_kv_head))
    mha = GPT.build(small(n_kv_head=4))
    repeat = 4 // n_kv_head
    with torch.no_grad():
        state = {}
        for name, p in gqa.state_dict().items():
            if name.endswith(("attn.c_k.weight", "attn.c_v.weight")):
                # (n_kv_head * head_dim, n_embd) -> each KV head used by `repeat` consecutive query heads
                p = p.view(n_kv_head, 16, 64).repeat_interleave(repeat, dim=0).reshape(64, 64)
            state[name] = p
        mha.load_state_dict(state)
    idx = torch.randint(0, 100, (2, 12))
    assert torch.allclose(gqa(idx), mha(idx), atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_with_position_offset_equals_uncached(n_kv_head):
    """Prefill a prefix, then a chunk of several tokens, then single tokens: same logits as one pass."""
    model = randomized(small(n_kv_head=n_kv_head))
    idx = torch.randint(0, 100, (2, 16))
    full = model(idx)
    cache = ListCache(model.config.n_layer)
    pieces = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:12], kv_cache=cache)]
    pieces += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(12, 16)]
    assert cache.pos == 16
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_rope_table_limit_is_a_clear_error():
    model = randomized(small())
    cache = ListCache(2, max_len=model.cos.size(1) + 1)
    with pytest.raises(ValueError, match="exceeds the RoPE table"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds the RoPE table"):
        model(torch.zeros(1, model.cos.size(1) + 1, dtype=torch.long))


def test_logits_to_keep_returns_the_last_positions():
    model = randomized(small())
    idx = torch.randint(0, 100, (2, 9))
    kept = model(idx, logits_to_keep=3)
    assert kept.shape == (2, 3, 100) and torch.allclose(kept, model(idx)[:, -3:], atol=1e-5)


def test_rotary_is_a_rotation_and_relative():
    """Rotation keeps norms, and q·k after RoPE depends only on the distance between positions."""
    model = GPT.build(small())
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def at(x, pos):
        return apply_rotary(x, model.cos[:, pos : pos + 1], model.sin[:, pos : pos + 1])

    assert torch.allclose(at(q, 9).norm(), q.norm(), atol=1e-5)
    dot = lambda i, j: (at(q, i) * at(k, j)).sum()
    assert torch.allclose(dot(5, 3), dot(12, 10), atol=1e-4)
    assert not torch.allclose(dot(5, 3), dot(5, 4), atol=1e-3)


def test_estimate_flops_by_hand():
    config = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = GPT.build(config)
    # Per layer: q 32x32, k 32x16, v 32x16, proj 32x32, mlp 32x128 + 128x32 -> 1024+512+512+1024+4096+4096
    per_layer = 11264
    lm_head = 128 * 32  # padded vocab
    expected = 6 * (2 * per_layer + lm_head) + 12 * 2 * 2 * 16 * 64
    assert model.estimate_flops() == expected
    assert model.num_params() == 2 * per_layer + lm_head + 128 * 32


def test_init_scales_and_zeros():
    model = GPT.build(GPTConfig.from_depth(depth=2, vocab_size=512, sequence_len=32))
    assert torch.count_nonzero(model.lm_head.weight) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0
        fan_out, fan_in = block.mlp.c_fc.weight.shape  # 512 x 128: std = 128^-0.5
        assert abs(block.mlp.c_fc.weight.std().item() - fan_in**-0.5) < 0.01
        assert abs(block.attn.c_q.weight.std().item() - fan_in**-0.5) < 0.01
    assert abs(model.wte.weight.std().item() - 1.0) < 0.02


def test_build_materialises_on_the_device_from_meta():
    model = GPT.build(small())
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())
    assert torch.isfinite(model.cos).all() and model.cos.size(1) == 10 * 32


def test_depth_dial():
    for depth, width, heads in [(1, 128, 1), (4, 256, 2), (12, 768, 6), (20, 1280, 10), (26, 1664, 13), (3, 256, 2)]:
        config = GPTConfig.from_depth(depth=depth, vocab_size=65536)
        assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (depth, width, heads, heads)
    assert GPTConfig.from_depth(depth=20, vocab_size=65536, n_kv_head=5).n_kv_head == 5
    # The reference's d20 has 560,988,160 parameters (shared/reference/nanochat.md 1.5).
    with torch.device("meta"):
        assert GPT(GPTConfig.from_depth(depth=20, vocab_size=65536)).num_params() == 560_988_160


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_kv_head": 3}, "must divide n_head"),
        ({"n_head": 3}, "divisible by n_head"),
    ],
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(**kwargs)


def test_config_dict_round_trip_fills_old_keys_and_rejects_unknown():
    config = small(rope_base=100000.0)
    assert GPTConfig.from_dict(config.to_dict()) == config
    old = config.to_dict()
    del old["logit_softcap"]
    assert GPTConfig.from_dict({**old, "mlp": "relu2"}) == config  # older checkpoints name their MLP
    with pytest.raises(ValueError, match="SwiGLU"):
        GPTConfig.from_dict({**old, "mlp": "swiglu"})
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({**config.to_dict(), "n_experts": 8})


def test_compute_dtype_runs_fp32_weights_in_bf16():
    model = randomized(small())
    idx = torch.randint(0, 100, (2, 10))
    reference = model(idx)
    model.compute_dtype = torch.bfloat16
    logits = model(idx)
    assert logits.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.5 and not torch.equal(logits, reference)


def test_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT.build(small())
    idx = torch.randint(0, 100, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 4.5 and loss.item() < 0.5, (first, loss.item())


def test_reference_generate_is_greedy_at_zero_temperature_and_seeded_otherwise():
    model = randomized(small())
    prompt = [1, 2, 3]
    greedy = list(model.generate(prompt, 6, temperature=0))
    ids = torch.tensor([prompt])
    for token in greedy:  # each greedy token is the argmax given everything before it
        assert model(ids)[0, -1].argmax().item() == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    sampled = list(model.generate(prompt, 8, temperature=1.0, top_k=5, seed=7))
    assert sampled == list(model.generate(prompt, 8, temperature=1.0, top_k=5, seed=7))
    assert sampled != list(model.generate(prompt, 8, temperature=1.0, top_k=5, seed=8))


def test_rms_norm_has_no_parameters():
    x = torch.randn(3, 8) * 5
    y = rms_norm(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-4)
    assert torch.allclose(y, F.rms_norm(x, (8,)))


# ---------------------------------------------------------------------------- the 2026 parts

NEW_PARTS = {"value_embeds": True, "resid_scalars": True, "backout": True, "window_pattern": "SSL", "short_window": 3,
             "qk_scale": 1.2, "n_layer": 4, "init": "tuned"}  # fmt: skip


@pytest.mark.parametrize("window", [1, 3, 8, None])
def test_windowed_attention_equals_a_dense_masked_reference(window):
    """Each query at position p sees keys p - window < j <= p, computed here with an explicit score matrix."""
    config = small(window_pattern="SL" if window else "L", short_window=window or 0, qk_scale=1.2, n_kv_head=2)
    model = randomized(config)
    attn, T = model.blocks[0].attn, 12
    assert attn.window == window
    x = torch.randn(2, T, 64)
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    fast = attn(x, None, cos, sin, AttentionMasks(torch.arange(T)[None], None))

    q = rms_norm(apply_rotary(attn.c_q(x).view(2, T, 4, 16), cos, sin)).transpose(1, 2) * 1.2
    k = rms_norm(apply_rotary(attn.c_k(x).view(2, T, 2, 16), cos, sin)).transpose(1, 2) * 1.2
    v = attn.c_v(x).view(2, T, 2, 16).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # GQA: each KV head serves 2 query heads
    scores = q @ k.transpose(-1, -2) / 4.0  # / sqrt(head_dim)
    p, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= p) & (p - j < (window or T))
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    slow = attn.c_proj((weights @ v).transpose(1, 2).reshape(2, T, 64))
    assert torch.allclose(fast, slow, atol=1e-5)


def test_window_pattern_tiles_with_the_last_layer_full():
    config = small(n_layer=6, window_pattern="SSL", short_window=5, value_embeds=True)
    assert [config.layer_window(i) for i in range(6)] == [5, 5, None, 5, 5, None]
    assert [config.has_value_embed(i) for i in range(6)] == [False, True, False, True, False, True]
    with pytest.raises(ValueError, match="needs short_window"):
        small(window_pattern="S")
    with pytest.raises(ValueError, match="letters S"):
        small(window_pattern="SX", short_window=2)


def test_new_parts_cached_decode_equals_uncached():
    model = randomized(small(**NEW_PARTS))
    idx = torch.randint(0, 100, (1, 20))
    full = model(idx)
    cache = ListCache(4)
    pieces = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:8], kv_cache=cache), model(idx[:, 8:], kv_cache=cache)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_new_parts_init_roles_and_every_group_trains(tmp_path):
    """Every new parameter sits in exactly one optimizer role, moves in one step, and survives a save/load."""
    from nanochat.checkpoint import build_model, save_checkpoint
    from nanochat.optim import build_optimizer

    config = small(**NEW_PARTS)
    model = GPT.build(config)
    assert torch.allclose(model.resid_lambdas, torch.linspace(1.15, 1.05, 4))
    assert torch.allclose(model.x0_lambdas, torch.linspace(0.20, 0.05, 4))
    assert model.backout_lambda.item() == pytest.approx(0.2)
    assert sorted(model.value_embeds) == ["1", "3"]  # alternate layers, the last included
    assert abs(model.lm_head.weight.std().item() - 0.001) < 2e-4  # tuned init: lm_head small, not zero
    roles = model.parameter_roles()
    assert {"value_embedding", "resid_scalars", "x0_scalars", "gates"} <= set(roles)
    in_roles = [id(p) for params in roles.values() for p in params]
    assert sorted(in_roles) == sorted(id(p) for p in model.parameters())  # each parameter exactly once

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model)
    idx = torch.arange(100).view(4, 25)  # every token id, so every embedding row gets a gradient
    for _ in range(2):  # zero c_proj blocks every gradient before it in step 1; step 2 reaches them
        model(idx, targets=idx).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert [name for name, p in model.named_parameters() if torch.equal(p, before[name])] == []

    save_checkpoint(str(tmp_path), 1, model)
    loaded = build_model(str(tmp_path), 1, phase="eval")[0]
    assert loaded.config == config
    assert torch.equal(loaded(idx), model(idx))


def test_classic_checkpoint_config_loads_with_the_new_parts_off():
    classic_keys = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "rope_base")
    config = GPTConfig.from_dict({k: v for k, v in small().to_dict().items() if k in classic_keys})
    assert (config.value_embeds, config.resid_scalars, config.backout) == (False, False, False)
    assert (config.window_pattern, config.qk_scale, config.init) == ("L", 1.0, "classic")
    assert set(GPT.build(config).state_dict()) == set(GPT.build(small()).state_dict())
