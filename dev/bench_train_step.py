"""Benchmark of one full training step (forward, backward, optimizer) of the GPT, eager vs torch.compile.

For each (depth, sequence length) the script builds the model at the tokenizer's vocabulary, runs warmup steps
(which include compilation), then times `--steps` steps and reports the median step time, tokens/s and, on a GPU
the table in nanochat/common.py knows, MFU = estimate_flops() x tokens/s / peak bf16 FLOP/s. Eager and
compiled runs of one configuration happen in the same process, one after the other, on the same batch.

    .venv/bin/python -m dev.bench_train_step                        # CPU: depth 4 and 8, seq 512 and 1024, fp32
    .venv/bin/python -m dev.bench_train_step --depths 12 20 --seq-lens 2048 --batch-size 16 --compile on  # GPU, bf16
    .venv/bin/python -m dev.bench_train_step --depths 8 --seq-lens 512 --threads 1 --baseline c99b11e  # optimizer A/B

--baseline REV also times the optimizer of git revision REV (its nanochat/optim.py, imported as a separate module)
on its own copy of the model, the two stepped alternately so load on a shared machine hits both alike. Every
step is split into forward, backward, the AdamW groups and the Muon groups, in process CPU seconds (with one
thread, the CPU time the step needed whatever else runs) as well as wall seconds.

Contract: random token ids (speed does not depend on the data), the house optimizer (nanochat.optim) with its
default learning rates, the compute dtype from nanochat.common unless --dtype is given. Prints a table and,
with --json, writes every figure. Does not train anything meaningful or touch checkpoints.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch

from nanochat import optim
from nanochat.common import DTYPES, autodetect_device_type, autodetect_dtype, cpu_model, gpu_peaks
from nanochat.gpt import GPT, GPTConfig

PHASES = ("forward", "backward", "adamw", "muon")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_at(revision: str):
    """nanochat/optim.py as of git `revision`, imported under its own module name."""
    source = subprocess.run(["git", "show", f"{revision}:nanochat/optim.py"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(), f"optim_{revision}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"optim_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Variant:
    """One model with one optimizer module's build_optimizer, its groups split by kind so each kind is timed."""

    def __init__(self, name, module, args, depth, seq_len, compiled, device, dtype):
        torch.manual_seed(0)
        config = GPTConfig.from_depth(depth=depth, vocab_size=args.vocab_size, sequence_len=seq_len)
        self.name, self.device, self.model = name, device, GPT.build(config, device)
        self.model.compute_dtype = dtype
        groups = module.build_optimizer(self.model).param_groups
        self.optimizers = {kind: module.MuonAdamW([g for g in groups if g["kind"] == kind]) for kind in PHASES[2:]}
        self.forward = torch.compile(self.model, dynamic=False) if compiled else self.model
        self.times: dict[str, list[float]] = {key: [] for key in ("wall", "cpu", *PHASES)}

    def step(self, idx, targets, record: bool) -> None:
        marks = [(time.perf_counter(), time.process_time())]

        def mark():
            synchronize(self.device)
            marks.append((time.perf_counter(), time.process_time()))

        loss = self.forward(idx, targets)
        mark()
        loss.backward()
        mark()
        for optimizer in self.optimizers.values():
            optimizer.step()
            mark()
        self.model.zero_grad(set_to_none=True)
        mark()
        if record:
            self.times["wall"].append(marks[-1][0] - marks[0][0])
            self.times["cpu"].append(marks[-1][1] - marks[0][1])
            for phase, (before, after) in zip(PHASES, zip(marks, marks[1:])):
                self.times[phase].append(after[1] - before[1])


def bench_config(args, depth: int, seq_len: int, compiled: bool, device, dtype, modules: dict) -> list[dict]:
    """Warmup then timed steps of every variant, alternating which goes first; one result per variant."""
    variants = [Variant(name, m, args, depth, seq_len, compiled, device, dtype) for name, m in modules.items()]
    idx = torch.randint(0, args.vocab_size, (args.batch_size, seq_len), device=device)
    targets = torch.roll(idx, -1, dims=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_start = time.perf_counter()
    for _ in range(args.warmup):
        for v in variants:
            v.step(idx, targets, record=False)
    warmup_s = (time.perf_counter() - warmup_start) / len(variants)
    for i in range(args.steps):
        for v in variants[:: 1 if i % 2 == 0 else -1]:
            v.step(idx, targets, record=True)
    tokens_per_step = args.batch_size * seq_len
    results = []
    for v in variants:
        median = {key: statistics.median(values) for key, values in v.times.items()}
        result = {
            "optimizer": v.name,
            "depth": depth,
            "seq_len": seq_len,
            "batch_size": args.batch_size,
            "compiled": compiled,
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "params": v.model.num_params(),
            "flops_per_token": v.model.estimate_flops(),
            "step_s_median": median["wall"],
            "step_s_min": min(v.times["wall"]),
            "tokens_per_s": tokens_per_step / median["wall"],
            "tokens_per_cpu_s": tokens_per_step / median["cpu"],
            "cpu_s_per_phase": {phase: median[phase] for phase in PHASES},
            "warmup_and_compile_s": warmup_s,
        }
        peaks = gpu_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        if peaks:
            result["mfu"] = result["flops_per_token"] * result["tokens_per_s"] / peaks[0]
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        results.append(result)
    return results


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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--baseline", default=None, help="git revision whose optimizer to time alongside today's")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device_type = args.device_type or autodetect_device_type()
    device = torch.device("cuda" if device_type == "cuda" else device_type)
    dtype = getattr(torch, args.dtype) if args.dtype else autodetect_dtype(device_type)
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    modules = {"today": optim, **({args.baseline: optimizer_at(args.baseline)} if args.baseline else {})}
    print(f"hardware: {hardware(device)}; commit {commit}")

    results = []
    for depth in args.depths:
        for seq_len in args.seq_lens:
            for compiled in modes:
                for r in bench_config(args, depth, seq_len, compiled, device, dtype, modules):
                    results.append(r)
                    mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
                    print(
                        f"{r['optimizer']:<8} d{depth:<3} T={seq_len:<5} B={args.batch_size} {r['dtype']:<8} "
                        f"compile={str(compiled):<5} {r['step_s_median']:8.3f} s/step  {r['tokens_per_s']:8,.0f} "
                        f"tok/s  {r['tokens_per_cpu_s']:8,.0f} tok/CPU-s{mfu}  (warmup+compile "
                        f"{r['warmup_and_compile_s']:.0f} s)",
                        flush=True,
                    )
    on_gpu = device.type == "cuda"
    print(
        "\n| optimizer | depth | seq | params | compile | s/step (median) | tokens/s | tokens/CPU-s | vs eager | "
        "vs baseline | CPU s: forward / backward / AdamW / Muon |" + (" MFU |" if on_gpu else "")
    )
    print("|:---|---:|---:|---:|:---|---:|---:|---:|---:|---:|:---|" + ("---:|" if on_gpu else ""))
    by_key = {(r["optimizer"], r["depth"], r["seq_len"], r["compiled"]): r["tokens_per_cpu_s"] for r in results}
    for r in results:
        eager = by_key.get((r["optimizer"], r["depth"], r["seq_len"], False))
        baseline = by_key.get((args.baseline, r["depth"], r["seq_len"], r["compiled"]))
        phases = " / ".join(f"{r['cpu_s_per_phase'][phase]:.3f}" for phase in PHASES)
        vs_baseline = f"{r['tokens_per_cpu_s'] / baseline:.2f}x" if baseline else "-"
        line = (
            f"| {r['optimizer']} | {r['depth']} | {r['seq_len']} | {r['params'] / 1e6:.1f}M | "
            f"{'yes' if r['compiled'] else 'no'} | {r['step_s_median']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_cpu_s']:,.0f} | {r['tokens_per_cpu_s'] / eager:.2f}x | "
            f"{vs_baseline} | {phases} |"
        )
        print(line + (f" {r['mfu']:.1%} |" if "mfu" in r else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hardware(device), "commit": commit, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
