"""Weight-only quantization on CPU: decode-step time, weight bytes and bits per byte, float vs int8 vs int4.

    .venv/bin/python -m dev.bench_quantize                                  # speed: d4, d8 at vocab 65,536 and 8,192
    NANOCHAT_BASE_DIR=/tmp/ncbench .venv/bin/python -m dev.bench_quantize --checkpoint-tag d4   # + loss of a checkpoint
    .venv/bin/python -m dev.bench_quantize --depths 4 --vocab-sizes 8192 --repeats 2             # quick

Speed: per (depth, vocab) a randomly initialised model (decode speed does not depend on the values) and its
variants side by side in one process: float in fp32 and in bf16 activations (`compute_dtype`), int8 and int4
(nanochat.quantize) with fp32 and with bf16 activations, and the reference path (dequantize every forward,
`use_kernels=False`). Each variant runs the model on idx (1, 1) and (8, 1) without a KV cache: one decode step's
matmuls, where every weight is read once per step, so time tracks weight bytes. Within a repeat the variants
are interleaved; each figure is the median over repeats of the mean time of a few calls.

Loss: with --checkpoint-tag, the base checkpoint under $NANOCHAT_BASE_DIR is loaded in fp32 and each variant's
bits per byte measured by nanochat.loss_eval.evaluate_bpb on the same val batches.

Contract: prints the hardware, versions, commit and thread count first, then markdown tables; --json writes
every figure. CPU only (the GPU kernels are probed by nanochat.quantize, not timed here). Trains nothing.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from nanochat.common import cpu_model
from nanochat.gpt import GPT, GPTConfig
from nanochat.quantize import quantize_model, weight_bytes

# name -> (bits or None for float, compute dtype, use_kernels, include_lm_head)
SPEED_VARIANTS = {
    "float fp32": (None, torch.float32, True, True),
    "float bf16": (None, torch.bfloat16, True, True),
    "int8 fp32": (8, torch.float32, True, True),
    "int8 bf16": (8, torch.bfloat16, True, True),
    "int8 fp32 reference": (8, torch.float32, False, True),
    "int4 fp32": (4, torch.float32, True, True),
    "int4 bf16": (4, torch.bfloat16, True, True),
    "int4 fp32 reference": (4, torch.float32, False, True),
}
LOSS_VARIANTS = {name: v for name, v in SPEED_VARIANTS.items() if "reference" not in name} | {
    "int8 bf16, lm_head float": (8, torch.bfloat16, True, False),
    "int4 bf16, lm_head float": (4, torch.bfloat16, True, False),
    "int4 bf16, lm_head int8": (4, torch.bfloat16, True, "int8"),
}
DECODE_SHAPES = [(1, 1), (8, 1)]  # (batch, tokens): one decode step for 1 and for 8 sequences


def make_variant(model: GPT, bits, dtype, use_kernels, include_lm_head) -> tuple[GPT, float]:
    """A quantized copy of `model` with its compute dtype set, and the seconds quantization took."""
    variant = copy.deepcopy(model)
    variant.compute_dtype = dtype
    start = time.perf_counter()
    if include_lm_head == "int8":  # mixed: the block matrices at `bits`, lm_head int8 (two separate subtrees)
        quantize_model(variant.blocks, bits, use_kernels=use_kernels)
        variant.lm_head = quantize_model(torch.nn.ModuleList([variant.lm_head]), 8, use_kernels=use_kernels)[0]
    elif bits is not None:
        quantize_model(variant, bits, include_lm_head=include_lm_head, use_kernels=use_kernels)
    return variant, time.perf_counter() - start


def matmul_bytes(model: GPT) -> int:
    """Bytes of the block matrices and lm_head: what a decode step reads, the embedding row aside."""
    return weight_bytes(model.blocks)["total"] + weight_bytes(torch.nn.ModuleList([model.lm_head]))["total"]


def seconds_per_call(model, idx, target_s: float) -> float:
    """Mean seconds of enough calls to fill about `target_s` (at least one)."""
    start = time.perf_counter()
    model(idx)
    first = time.perf_counter() - start
    calls = max(1, min(50, round(target_s / max(first, 1e-6))))
    start = time.perf_counter()
    for _ in range(calls):
        model(idx)
    return (time.perf_counter() - start) / calls


@torch.inference_mode()
def bench_speed(depth: int, vocab_size: int, repeats: int, target_s: float) -> list[dict]:
    torch.manual_seed(0)
    model = GPT.build(GPTConfig.from_depth(depth, vocab_size=vocab_size))
    with torch.no_grad():  # as tests/test_gpt.py's `randomized`: fill the zero-initialised projections too
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if name == "wte.weight" else 0.05)
    variants = {name: make_variant(model, *spec) for name, spec in SPEED_VARIANTS.items()}
    idxs = {shape: torch.randint(0, vocab_size, shape) for shape in DECODE_SHAPES}
    times = {(name, shape): [] for name in variants for shape in DECODE_SHAPES}
    for _ in range(repeats):
        for name, (variant, _) in variants.items():
            for shape, idx in idxs.items():
                times[(name, shape)].append(seconds_per_call(variant, idx, target_s))
    rows = []
    for name, (variant, quantize_s) in variants.items():
        row = {"depth": depth, "vocab_size": vocab_size, "variant": name, "quantize_s": quantize_s}
        row["matmul_bytes"], row["total_bytes"] = matmul_bytes(variant), weight_bytes(variant)["total"]
        for shape in DECODE_SHAPES:
            row[f"ms_B{shape[0]}"] = 1e3 * statistics.median(times[(name, shape)])
        rows.append(row)
        print(f"d{depth} V={vocab_size} {name:<22} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if "ms" in k))
    return rows


@torch.inference_mode()
def bench_loss(tag: str, tokens: int, batch_size: int) -> list[dict]:
    from nanochat.checkpoint import load_model
    from nanochat.dataloader import PretrainLoader
    from nanochat.dataset import default_pretrain_paths
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_tokenizer

    model, meta = load_model("base", "cpu", "eval", tag)
    tokenizer = get_tokenizer()
    token_bytes = torch.tensor(tokenizer.token_bytes())
    seq_len = model.config.sequence_len
    steps = max(1, tokens // (batch_size * seq_len))
    loader = PretrainLoader(tokenizer, default_pretrain_paths(), "val", batch_size, seq_len)
    batches = [next(loader) for _ in range(steps)]  # the same val batches for every variant
    print(f"checkpoint {tag} step {meta['step']}: {meta['model_config']}; {steps * batch_size * seq_len:,} val tokens")
    rows = []
    for name, spec in LOSS_VARIANTS.items():
        variant, _ = make_variant(model, *spec)
        start = time.perf_counter()
        bpb = evaluate_bpb(variant, iter(batches), steps, token_bytes)
        row = {"checkpoint": tag, "step": meta["step"], "variant": name, "val_bpb": bpb}
        row["matmul_bytes"], row["eval_s"] = matmul_bytes(variant), time.perf_counter() - start
        rows.append(row)
        print(f"{name:<26} val bpb {bpb:.4f}  ({row['eval_s']:.1f} s)", flush=True)
    return rows


def print_tables(speed: list[dict], loss: list[dict]) -> None:
    print(
        "\n| model | variant | matmul weights | smaller | all weights | ms/step B=1 | speedup | ms/step B=8 | speedup |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in speed:
        base = next(b for b in speed if (b["depth"], b["vocab_size"]) == (r["depth"], r["vocab_size"]))
        print(
            f"| d{r['depth']} V={r['vocab_size']} | {r['variant']} | {r['matmul_bytes'] / 2**20:.1f} MiB | "
            f"{base['matmul_bytes'] / r['matmul_bytes']:.2f}x | {r['total_bytes'] / 2**20:.1f} MiB | "
            f"{r['ms_B1']:.2f} | {base['ms_B1'] / r['ms_B1']:.2f}x | "
            f"{r['ms_B8']:.2f} | {base['ms_B8'] / r['ms_B8']:.2f}x |"
        )
    if loss:
        print("\n| checkpoint | variant | matmul weights | val bpb | vs fp32 |")
        print("|---|---|---:|---:|---:|")
        for r in loss:
            delta = r["val_bpb"] - loss[0]["val_bpb"]
            print(
                f"| {r['checkpoint']} step {r['step']} | {r['variant']} | {r['matmul_bytes'] / 2**20:.2f} MiB | "
                f"{r['val_bpb']:.4f} | {delta:+.4f} |"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[65536, 8192])
    # Benchmark
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds over all variants; medians")
    parser.add_argument("--target-s", type=float, default=0.1, help="seconds of calls per timed figure")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: on 2 cores shared with other jobs, 2 threads made medians swing several-fold)",
    )  # fmt: skip
    # Evaluation
    parser.add_argument("--checkpoint-tag", default=None, help="base checkpoint for the loss table (None = skip)")
    parser.add_argument("--eval-tokens", type=int, default=2**16, help="val tokens per loss figure")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="sequences per forward in the loss eval")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    hardware = (
        f"{cpu_model()}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(f"hardware: {hardware}; commit {commit}; {vars(args)}", flush=True)
    speed = [r for d in args.depths for v in args.vocab_sizes for r in bench_speed(d, v, args.repeats, args.target_s)]
    loss = bench_loss(args.checkpoint_tag, args.eval_tokens, args.eval_batch_size) if args.checkpoint_tag else []
    print_tables(speed, loss)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hardware, "commit": commit, "speed": speed, "loss": loss}, f, indent=2)


if __name__ == "__main__":
    main()
