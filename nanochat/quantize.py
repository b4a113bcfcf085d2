"""Weight-only int8 / int4 quantization of a GPT's linear layers, for inference (`--quantize` of chat_cli, chat_web).

Every `nanochat.gpt.Linear` (the blocks and, by default, lm_head) is replaced in place by a module holding
integer weights and float scales; activations and the embedding stay float.
- int8: symmetric, one scale per output row: w ≈ q · scale, q in [-127, 127] (as gpt-fast's int8 handler).
- int4: one (scale, zero) per group of `group_size` input columns: w ≈ (q - 8) · scale + zero, q in [0, 15], two
  per byte: the convention of PyTorch's tinygemm kernels (`_weight_int4pack_mm*`, used by gpt-fast and torchao).

Speed (dev/bench_quantize.py, dev/BENCHMARKS.md): dequantizing every forward is slower than float, so layers use
PyTorch's fused kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm[_for_cpu]`). These private ops change
between releases, so they are found by probing, never by version: each runs on the layer's own weights per input
dtype and is kept only where it matches the reference path (dequantize, then F.linear; `use_kernels=False`
forces it). On CPU they are fast only for bf16/fp16, so fp32 inputs go through bf16 (+0.0000 bpb, BENCHMARKS).

Contract: forward takes and returns any float dtype, as gpt.Linear; inference only (no parameters). Quantizing
twice is refused (ValueError): re-rounding compounds the error. Quantize on the device the model runs on: int4
kernels repack into a device-specific layout, so a quantized state_dict is not a file format.

Not here: activation quantization, calibration (GPTQ, AWQ), quantization-aware training, quantized checkpoints.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import Linear

INT8_MAX = 127  # symmetric range [-127, 127]: -128 is left out so that q and -q are both representable
INT4_LEVELS = 16
INT4_MIDPOINT = 8  # tinygemm subtracts 8 from every stored nibble before scaling
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # probed in this order of preference
# Kernels slower than the reference path, never used. torch 2.15, AVX-512 EPYC, d4 (8, 1) decode step
# (dev/bench_quantize.py): fp32 inputs int8 31.7 ms vs 4.4 ms reference, int4 75.5 vs 16.3; bf16 1.6 and 1.5 ms.
SLOW_KERNELS = {("cpu", torch.float32)}
# Relative error a kernel may have against the reference path: fp32 differs in summation order (~1e-6); bf16 ~4e-3.
KERNEL_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}
PROBE_ROWS = 3  # inputs per probe: a decode-sized batch; small so probing a d20 model takes well under a second
INT4_GROUP_SIZE = 128  # input columns per int4 scale by default (gpt-fast's choice; tinygemm takes 32-256)
SCHEMES = {"int8": 8, "int4": 4}  # the serving flags' names (chat_cli, chat_web --quantize) for quantize_model's bits


# ---------------------------------------------------------------------------- the math (one copy of each)
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> q (out, in) int8 in [-127, 127] and scale (out,) fp32, with weight ≈ q · scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / INT8_MAX  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays exactly zero
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8, scale (out,) -> (out, in) fp32."""
    return q.float() * scale[:, None]


def check_group_size(in_features: int, group_size: int) -> None:
    """ValueError naming the problem and the fix unless `group_size` splits rows of `in_features` evenly."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2 (two int4 values per byte), got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features}: pick a divisor of it "
            "(the tinygemm kernels want 32, 64, 128 or 256), or leave that layer out of int4 quantization"
        )


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> q (out, in) uint8 in [0, 15], scales and zeros (out, in / group_size) fp32, with
    weight ≈ (q - 8) · scale + zero within each group (the group's min maps to 0, its max to 15)."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    w = weight.detach().float().view(out_features, in_features // group_size, group_size)  # (out, groups, G)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (out, groups)
    scale = (high - low) / (INT4_LEVELS - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is stored exactly
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, INT4_LEVELS - 1)
    zero = low + INT4_MIDPOINT * scale  # the value of the middle level 8
    return q.to(torch.uint8).view(out_features, in_features), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) uint8 values in [0, 15] -> (out, in / 2) uint8, column 2j in the high nibble, 2j+1 in the low
    one (the input layout of CUDA's `_convert_weight_to_int4pack` since torch 2.5)."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (out, in / 2) uint8 -> (out, in) uint8."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).view(packed.size(0), -1)


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """packed (out, in / 2) uint8, scales_and_zeros (in / group_size, out, 2) -> (out, in) fp32."""
    q = unpack_int4(packed).float()
    out_features, in_features = q.shape
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # each (out, groups)
    w = (q.view(out_features, -1, group_size) - INT4_MIDPOINT) * scale[..., None] + zero[..., None]
    return w.view(out_features, in_features)


# ---------------------------------------------------------------------------- kernels, found by probing
# device -> the name of its int4 matmul op: (x, packed, group size, scales and zeros); Int4Linear packs for it
INT4_MATMULS = {"cpu": "_weight_int4pack_mm_for_cpu", "cuda": "_weight_int4pack_mm"}


def working_dtypes(kernel, reference_weight: torch.Tensor) -> frozenset:
    """The input dtypes for which `kernel(x)` (x: (M, in) -> (M, out)) runs here and agrees with
    F.linear(x, reference_weight). A missing op, a refused dtype or shape, or a wrong result all mean the
    reference path, so a private op can never make results wrong."""
    device_type = reference_weight.device.type
    generator = torch.Generator(device=reference_weight.device).manual_seed(0)
    x = torch.randn(PROBE_ROWS, reference_weight.size(1), generator=generator, device=reference_weight.device)
    expected = F.linear(x, reference_weight)  # (M, out) fp32
    found = set()
    for dtype in (d for d in KERNEL_DTYPES if (device_type, d) not in SLOW_KERNELS):
        try:
            y = kernel(x.to(dtype)).float()
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):  # op absent or dtype/shape refused
            continue
        error = (y - expected).norm() / expected.norm().clamp(min=1e-12)
        if y.shape == expected.shape and error < KERNEL_TOLERANCE[dtype]:
            found.add(dtype)
    return frozenset(found)


# ---------------------------------------------------------------------------- the quantized layers
class QuantizedLinear(nn.Module):
    """What both layers share: y = x · wᵀ for x (..., in) of any float dtype, through the subclass's `kernel`
    (x (M, in) -> (M, out)) for inputs on `kernel_device` when probing found it working, else through
    `dequantize()` and F.linear (the reference path)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernel_device, self.kernel_dtypes = weight.device.type, frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        if not self.kernel_dtypes or x.device.type != self.kernel_device:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        else:  # the input's dtype if it has a kernel, else the first that has one (cast in and back out)
            dtype = x.dtype if x.dtype in self.kernel_dtypes else min(self.kernel_dtypes, key=KERNEL_DTYPES.index)
            y = self.kernel(x2.to(dtype).contiguous()).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES if d in self.kernel_dtypes)
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=[{kernel}]"


class Int8Linear(QuantizedLinear):
    """w = q · scale, q (out, in) int8, scale (out,) fp32. The kernel reads the plain int8 matrix, so the
    reference path stays available for every other dtype."""

    def __init__(self, weight: torch.Tensor, use_kernels: bool = True):
        super().__init__(weight)
        qweight, scale = quantize_int8(weight)
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) fp32
        if use_kernels:
            self.kernel_dtypes = working_dtypes(self.kernel, self.dequantize())

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.qweight, self.scale.to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)  # (out, in) fp32


class Int4Linear(QuantizedLinear):
    """w = (q - 8) · scale + zero per group of `group_size` input columns; `scales_and_zeros` (in / group_size,
    out, 2) fp32. `qweight` holds the values two per byte, in one layout (`layout`): "portable" (pack_int4's,
    the reference path) or, when probing found a working kernel, the device's opaque kernel layout ("cpu" or
    "cuda"); so int4 costs half a byte per weight either way."""

    def __init__(self, weight: torch.Tensor, group_size: int = 128, use_kernels: bool = True):
        super().__init__(weight)
        self.group_size, self.layout = group_size, "portable"
        q, scale, zero = quantize_int4(weight, group_size)
        # (groups, out, 2): the tinygemm kernels' own layout, so they read it without conversion
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        self.register_buffer("qweight", pack_int4(q))  # (out, in / 2) uint8
        if not use_kernels or self.kernel_device not in INT4_MATMULS:
            return
        reference, portable = self.dequantize(), self.qweight
        try:  # from pack_int4's layout to the kernel's
            if self.kernel_device == "cpu":  # one int32 per value, laid out for the CPU's vector width (AVX2/AVX-512)
                self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(portable).int(), 1)
            else:
                self.qweight = torch.ops.aten._convert_weight_to_int4pack(portable, 8)  # inner_k_tiles 8 (gpt-fast's)
            self.layout = self.kernel_device
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            return  # no packer for this device in this torch, or it refuses the shape
        self.kernel_dtypes = working_dtypes(self.kernel, reference)
        if not self.kernel_dtypes:
            self.qweight, self.layout = portable, "portable"

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        matmul = getattr(torch.ops.aten, INT4_MATMULS[self.layout])  # looked up late: a private op may be absent
        return matmul(x, self.qweight, self.group_size, self.scales_and_zeros.to(x.dtype))

    def dequantize(self) -> torch.Tensor:
        """(out, in) fp32; the kernel layouts are opaque, so only the portable one can be read back."""
        if self.layout != "portable":
            raise RuntimeError(f"weights are in the {self.layout} kernel's opaque layout; quantize with "
                               "use_kernels=False to read them back")  # fmt: skip
        return dequantize_int4(self.qweight, self.scales_and_zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout != "portable" and x.device.type != self.layout:
            raise RuntimeError(
                f"int4 weights were packed for {self.layout} but the input is on {x.device.type}: quantize "
                "after moving the model to the device it runs on"
            )
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}"


# ---------------------------------------------------------------------------- applied from outside
MIN_INPUTS = 32  # narrower Linear layers are not quantized


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = None,
    include_lm_head: bool = True,
    use_kernels: bool = True,
) -> nn.Module:
    """Replace every nanochat.gpt.Linear of `model` in place by its int8 or int4 version; returns the model.

    bits: 8 (per-row scales) or 4 (group_size input columns per scale, default 128). include_lm_head: lm_head is
    most of a small model's decode reads (d4: 84%); its cost, d4 at vocab 8,192 (dev/BENCHMARKS.md): int8 +0.0001
    bpb vs +0.0000 without; int4 +0.0052 vs +0.0020, +0.0021 with lm_head in int8 (as dev/bench_quantize.py does).
    use_kernels=False forces the reference path. ValueError, before any change: other bits, a group size that
    does not divide a layer's inputs, a model already quantized."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 (int8, per-row scales) or 4 (int4, grouped scales), got {bits!r}")
    if bits == 8 and group_size is not None:
        raise ValueError("group_size is for bits=4; int8 uses one scale per output row, so leave it unset")
    group_size = INT4_GROUP_SIZE if group_size is None else group_size
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError(
            "the model is already quantized; quantizing again would round already-rounded weights. Load the "
            "float checkpoint again and quantize it once"
        )
    if isinstance(model, Linear):
        raise ValueError("pass the module that holds the Linear layers (e.g. nn.ModuleList([layer])), not a Linear")
    lm_head = getattr(model, "lm_head", None)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    # Tiny layers (the value-embedding gates: 12 inputs, one output per KV head) stay float: nothing to save, and
    # torch's int8 CPU kernel crashed on a (1, 12) weight here (torch 2.15).
    targets = [(name, m) for name, m in linears if include_lm_head or m is not lm_head]
    targets = [(name, m) for name, m in targets if m.in_features >= MIN_INPUTS]
    if bits == 4:
        for name, m in targets:  # all checks before the first replacement: an error leaves the model as it was
            try:
                check_group_size(m.in_features, group_size)  # a wider layer must split into whole groups
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    for name, m in targets:
        quantized = Int8Linear(m.weight, use_kernels) if bits == 8 else Int4Linear(m.weight, group_size, use_kernels)
        model.set_submodule(name, quantized)
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Weight bytes of `model` (any module): "float" (parameters), "quantized" (integer weights, scales and
    zeros of quantized layers), "total". RoPE tables are buffers, not weights: not counted."""
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = [b for m in model.modules() if isinstance(m, QuantizedLinear) for b in m.buffers(recurse=False)]
    quantized_bytes = sum(b.numel() * b.element_size() for b in buffers)
    return {"float": float_bytes, "quantized": quantized_bytes, "total": float_bytes + quantized_bytes}
