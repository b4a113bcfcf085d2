"""Benchmark of one full training step (forward, backward, optimizer) of the GPT, eager vs torch.compile.

For each (depth, sequence length) the script builds the model at the tokenizer's vocabulary, runs warmup steps
(which include compilation), then times `--steps` steps and reports the median step time, tokens/s and, on a GPU
the table in nanochat/common.py knows, MFU = estimate_flops() x tokens/s / peak bf16 FLOP/s. Eager and
compiled runs of one configuration happen in the same process, one after the other, on the same batch.

    .venv/bin/python -m dev.bench_train_step                        # CPU: depth 4 and 8, seq 512 and 1024, fp32
    .venv/bin/python -m dev.bench_train_step --depths 12 20 --seq-lens 2048 --batch-size 16 --compile on  # GPU, bf16

Contract: random token ids (speed does not depend on the data), the house optimizer (nanochat.optim) with its
default learning rates, the compute dtype from nanochat.common unless --dtype is given. Prints a table and,
with --json, writes every figure. Does not train anything meaningful or touch checkpoints.
"""

import argparse
import json
import os
import statistics
import subprocess
import time

import torch

from nanochat.common import DTYPES, autodetect_device_type, autodetect_dtype, cpu_model, gpu_peaks
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, step_fn, idx, targets, warmup: int, steps: int, device) -> list[float]:
    """Seconds per step for `steps` steps after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step_fn(idx, targets)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bench_config(args, depth: int, seq_len: int, compiled: bool, device, dtype) -> dict:
    torch.manual_seed(0)
    config = GPTConfig.from_depth(depth=depth, vocab_size=args.vocab_size, sequence_len=seq_len)
    model = GPT.build(config, device)
    model.compute_dtype = dtype
    optimizer = build_optimizer(model)
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step(idx, targets):
        loss = forward(idx, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    idx = torch.randint(0, args.vocab_size, (args.batch_size, seq_len), device=device)
    targets = torch.roll(idx, -1, dims=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    times = time_steps(model, step, idx, targets, args.warmup, args.steps, device)
    total = time.perf_counter() - start
    median = statistics.median(times)
    tokens_per_step = args.batch_size * seq_len
    result = {
        "depth": depth,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "compiled": compiled,
        "dtype": str(dtype).removeprefix("torch."),
        "params": model.num_params(),
        "flops_per_token": model.estimate_flops(),
        "step_s_median": median,
        "step_s_min": min(times),
        "tokens_per_s": tokens_per_step / median,
        "warmup_and_compile_s": total - sum(times),
    }
    peaks = gpu_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if peaks:
        result["mfu"] = result["flops_per_token"] * result["tokens_per_s"] / peaks[0]
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def hardware(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--vocab-size", type=int, default=65536, help="the tokenizer's vocabulary (2^16 as speedrun)")
    # Benchmark
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--compile", choices=["both", "on", "off"], default="both")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: nanochat.common's choice")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    device_type = args.device_type or autodetect_device_type()
    device = torch.device("cuda" if device_type == "cuda" else device_type)
    dtype = getattr(torch, args.dtype) if args.dtype else autodetect_dtype(device_type)
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"hardware: {hardware(device)}; commit {commit}")

    results = []
    for depth in args.depths:
        for seq_len in args.seq_lens:
            for compiled in modes:
                r = bench_config(args, depth, seq_len, compiled, device, dtype)
                results.append(r)
                mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
                print(
                    f"d{depth:<3} T={seq_len:<5} B={args.batch_size} {r['dtype']:<8} compile={str(compiled):<5} "
                    f"{r['step_s_median']:8.3f} s/step  {r['tokens_per_s']:10,.0f} tok/s{mfu}  "
                    f"(warmup+compile {r['warmup_and_compile_s']:.0f} s)",
                    flush=True,
                )
    on_gpu = device.type == "cuda"
    print("\n| depth | seq | params | compile | s/step (median) | tokens/s | vs eager |" + (" MFU |" if on_gpu else ""))
    print("|---:|---:|---:|:---|---:|---:|---:|" + ("---:|" if on_gpu else ""))
    eager = {(r["depth"], r["seq_len"]): r["tokens_per_s"] for r in results if not r["compiled"]}
    for r in results:
        base = eager.get((r["depth"], r["seq_len"]))
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        line = (
            f"| {r['depth']} | {r['seq_len']} | {r['params'] / 1e6:.1f}M | {'yes' if r['compiled'] else 'no'} | "
            f"{r['step_s_median']:.3f} | {r['tokens_per_s']:,.0f} | {ratio} |"
        )
        print(line + (f" {r['mfu']:.1%} |" if "mfu" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hardware(device), "commit": commit, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
