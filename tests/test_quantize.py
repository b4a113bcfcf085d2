"""nanochat.quantize on CPU: round-trip error bounds, layers against the float matmul, kernels against the
reference path, whole-model logits and greedy tokens, byte counts, errors, and inference_mode.

Expected values are computed here from the float weights (per-row / per-group min and max, the float
matmul), never from the module's own dequantize, so a wrong scale, a swapped nibble or a kernel that reads the
wrong layout fails a test.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import randomized
from nanochat.gpt import GPTConfig, Linear
from nanochat.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weight_bytes,
)


def small(**kwargs) -> GPTConfig:
    # n_embd 128 so the default int4 group size (128) divides every layer's inputs (128 and 4·128).
    return GPTConfig(
        **{"sequence_len": 32, "vocab_size": 100, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 128, **kwargs}
    )


def weights(out_features=96, in_features=256, seed=0) -> torch.Tensor:
    """Gaussian weights with a few outliers and one all-zero row, the cases that break naive scale choices."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator) * 0.05
    w[3, 7] = 1.5
    w[5, 200] = -2.0
    w[9] = 0.0
    return w


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------- round trips


def test_int8_round_trip_is_within_half_a_step_of_each_row():
    w = weights()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (96,)
    expected_scale = w.abs().max(dim=1).values / 127
    nonzero = expected_scale > 0
    assert torch.allclose(scale[nonzero], expected_scale[nonzero])
    error = (dequantize_int8(q, scale) - w).abs()  # (out, in)
    assert (error <= expected_scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert q.abs().max() == 127 and (q[9] == 0).all() and (dequantize_int8(q, scale)[9] == 0).all()
    assert q[3, 7] == 127 and q[5, 200] == -127  # each row's largest weight sits on the end of the range


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_round_trip_is_within_half_a_step_of_each_group(group_size):
    w = weights()
    q, scale, zero = quantize_int4(w, group_size)
    groups = w.view(96, -1, group_size)
    low, high = groups.min(dim=-1).values, groups.max(dim=-1).values  # (out, groups)
    step = (high - low) / 15
    assert q.dtype == torch.uint8 and q.max() <= 15 and scale.shape == (96, 256 // group_size)
    packed = pack_int4(q)
    assert packed.shape == (96, 128) and packed.dtype == torch.uint8  # two values per byte
    assert torch.equal(unpack_int4(packed), q)
    assert packed[0, 0] == q[0, 0] * 16 + q[0, 1]  # column 0 in the high nibble
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (groups, out, 2)
    error = (dequantize_int4(packed, scales_and_zeros, group_size) - w).abs().view(96, -1, group_size)
    assert (error <= step[..., None] / 2 + 1e-6).all()
    assert (error[9] == 0).all()  # a constant group is exact
    assert error.max() > step.min() / 10  # the bound is not met vacuously


# ---------------------------------------------------------------------------- one layer


def float_layer(w: torch.Tensor) -> Linear:
    layer = Linear(w.size(1), w.size(0))
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_layer_stays_within_the_rounding_bound_of_the_float_matmul(use_kernels, dtype):
    """|x·(w + e)ᵀ - x·wᵀ| ≤ Σ_k |x_k| · scale_n / 2 per output n, with the scale from the float weights."""
    w = weights()
    layer = Int8Linear(w, use_kernels=use_kernels)
    x = torch.randn(2, 3, 256)  # (B, T, in): any leading shape
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 3, 96)
    bound = x.abs().sum(-1, keepdim=True) * (w.abs().max(dim=1).values / 127 / 2)  # (B, T, out)
    exact = F.linear(x, w)
    rounding = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype] * exact.abs().max()
    assert ((y.float() - exact).abs() <= bound + rounding).all()


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_layer_stays_within_the_rounding_bound_of_the_float_matmul(use_kernels, dtype):
    w = weights()
    layer = Int4Linear(w, group_size=32, use_kernels=use_kernels)
    x = torch.randn(2, 3, 256)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 3, 96)
    groups = w.view(96, 8, 32)
    half_step = (groups.max(-1).values - groups.min(-1).values) / 15 / 2  # (out, groups)
    bound = x.abs().view(2, 3, 8, 32).sum(-1) @ half_step.T  # (B, T, out): Σ_k |x_k| · step(n, group(k)) / 2
    exact = F.linear(x, w)
    rounding = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype] * exact.abs().max()
    assert ((y.float() - exact).abs() <= bound + rounding).all()


def test_float64_inputs_use_the_reference_path_and_stay_float64():
    w = weights()
    for layer in (Int8Linear(w), Int4Linear(w, group_size=64, use_kernels=False)):
        x = torch.randn(4, 256, dtype=torch.float64)
        y = layer(x)
        assert y.dtype == torch.float64 and relative_error(y, layer(x.float())) < 1e-5


def test_this_torch_has_the_cpu_kernels_and_they_are_used():
    """The speed claims in dev/BENCHMARKS.md rest on these; a torch without them still works (reference path)."""
    w = weights()
    int8, int4 = Int8Linear(w), Int4Linear(w, group_size=32)
    if not int8.kernel_dtypes or int4.layout == "portable":
        pytest.skip(f"torch {torch.__version__} lacks the int8/int4 CPU kernels here: reference path only")
    assert torch.bfloat16 in int8.kernel_dtypes and torch.bfloat16 in int4.kernel_dtypes
    assert torch.float32 not in int8.kernel_dtypes | int4.kernel_dtypes  # slower than the reference path on CPU
    assert int4.layout == "cpu" and int4.qweight.numel() == 96 * 256 // 2  # repacked, still half a byte/weight
    with pytest.raises(RuntimeError, match="opaque layout"):
        int4.dequantize()


# ---------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_and_reference_path_give_the_same_logits(bits, dtype):
    model = randomized(small())
    model.compute_dtype = dtype
    fast = quantize_model(copy.deepcopy(model), bits)
    reference = quantize_model(copy.deepcopy(model), bits, use_kernels=False)
    assert all(m.layout == "portable" for m in reference.modules() if isinstance(m, Int4Linear))
    idx = torch.randint(0, 100, (2, 16))
    # 3e-2, not 1e-5, for fp32 too: on CPU the kernels take fp32 activations rounded to bf16 (SLOW_KERNELS).
    assert relative_error(fast(idx), reference(idx)) < 3e-2


def test_int8_model_is_close_to_float_and_mostly_picks_the_same_greedy_token():
    model = randomized(small(), seed=1)
    quantized = quantize_model(copy.deepcopy(model), bits=8)
    idx = torch.randint(0, 100, (8, 32))
    expected, logits = model(idx), quantized(idx)
    assert logits.dtype == torch.float32 and logits.shape == (8, 32, 100)
    assert relative_error(logits, expected) < 0.02
    agreement = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement > 0.9, agreement
    assert torch.allclose(quantized(idx, idx), model(idx, idx), rtol=0.02)  # the loss path works too


def test_int4_model_is_close_to_float_but_looser_than_int8():
    model = randomized(small(), seed=1)
    idx = torch.randint(0, 100, (8, 32))
    expected = model(idx)
    error8 = relative_error(quantize_model(copy.deepcopy(model), bits=8)(idx), expected)
    error4 = relative_error(quantize_model(copy.deepcopy(model), bits=4)(idx), expected)
    assert error4 < 0.2 and error8 < error4 / 4, (error8, error4)  # 16 levels vs 255: ~16x coarser steps


def test_every_block_matrix_is_quantized_and_embedding_stays_float():
    model = quantize_model(randomized(small()), bits=8, include_lm_head=False)
    assert not any(type(m) is Linear for m in model.blocks.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 6  # q, k, v, proj, fc, proj per block
    assert type(model.lm_head) is Linear and model.wte.weight.dtype == torch.float32
    assert isinstance(quantize_model(randomized(small()), bits=4).lm_head, Int4Linear)  # included by default


def test_weight_bytes_drop_about_4x_for_int8_and_8x_for_int4():
    config = small()
    model = randomized(config)
    matrices = [m.weight for m in model.modules() if isinstance(m, Linear)]
    fp32_matrix_bytes = 4 * sum(w.numel() for w in matrices)
    embedding_bytes = 4 * model.wte.weight.numel()
    assert weight_bytes(model) == {"float": 4 * model.num_params(), "quantized": 0, "total": 4 * model.num_params()}
    int8 = weight_bytes(quantize_model(copy.deepcopy(model), bits=8))
    int8_expected = sum(w.numel() + 4 * w.size(0) for w in matrices)  # 1 byte per weight + an fp32 scale per row
    assert int8 == {"float": embedding_bytes, "quantized": int8_expected, "total": embedding_bytes + int8_expected}
    int4 = weight_bytes(quantize_model(copy.deepcopy(model), bits=4))
    int4_expected = sum(w.numel() // 2 + 2 * 4 * w.numel() // 128 for w in matrices)  # nibbles + fp32 scale, zero
    assert int4["quantized"] == int4_expected
    assert 3.9 < fp32_matrix_bytes / int8["quantized"] <= 4
    assert 7.0 < fp32_matrix_bytes / int4["quantized"] < 8  # 4.5 bits per weight with group 128
    assert weight_bytes(model.blocks)["float"] == 4 * sum(p.numel() for p in model.blocks.parameters())


# ---------------------------------------------------------------------------- errors and modes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, "bits must be 8 .* or 4"),
        ({"bits": 16}, "bits must be 8 .* or 4"),
        ({"bits": 4, "group_size": 48}, r"group_size 48 does not divide in_features 128: pick a divisor"),
        ({"bits": 4, "group_size": 7}, "even number"),
        ({"bits": 8, "group_size": 64}, "group_size is for bits=4"),
    ],
)
def test_bad_arguments_are_clear_errors_and_leave_the_model_untouched(kwargs, message):
    model = randomized(small())
    with pytest.raises(ValueError, match=message):
        quantize_model(model, **kwargs)
    assert sum(type(m) is Linear for m in model.modules()) == 2 * 6 + 1


def test_quantizing_twice_is_refused():
    model = quantize_model(randomized(small()), bits=8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, bits=4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, bits=8)


def test_quantized_model_runs_under_inference_mode_and_generates():
    model = randomized(small())
    quantized = quantize_model(copy.deepcopy(model), bits=4)
    idx = torch.randint(0, 100, (2, 8))
    with torch.inference_mode():
        inside = quantized(idx)
    assert torch.equal(inside, quantized(idx))
    with torch.inference_mode():  # quantizing inside inference_mode gives weights usable outside it
        quantized_inside = quantize_model(copy.deepcopy(model), bits=8)
    with torch.no_grad():
        assert relative_error(quantized_inside(idx), model(idx)) < 0.02
    assert len(list(quantized.generate([1, 2, 3], 4, temperature=0))) == 4


@pytest.mark.parametrize("bits", [8, 4])
def test_new_parts_quantize_with_their_gates_left_float(bits):
    """The 2026 parts: block matrices are quantized, the 12-input value-embedding gates stay float (torch's int8
    kernel crashed on a (1, 12) weight), and the logits stay close to the float model's."""
    config = small(n_kv_head=1, value_embeds=True, resid_scalars=True, backout=True, window_pattern="SL",
                   short_window=4)  # fmt: skip
    model = randomized(config, seed=2)
    quantized = quantize_model(copy.deepcopy(model), bits=bits, group_size=32 if bits == 4 else None)
    gates = [block.attn.ve_gate for block in quantized.blocks if block.attn.ve_gate is not None]
    assert gates and all(type(gate) is Linear for gate in gates)
    assert all(not isinstance(m, Linear) or m in gates for m in quantized.blocks.modules())
    idx = torch.randint(0, 100, (4, 32))
    assert relative_error(quantized(idx), model(idx)) < (0.02 if bits == 8 else 0.2)
