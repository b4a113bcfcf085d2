"""Inference benchmark of nanochat's Engine: prefill, time to first token, decode speed and memory per batch size.

For one model (a checkpoint, or random weights at a given depth): prefill tokens/s of `Engine.prefill` (batch 1,
in the engine's chunks); per decode batch size B (one prompt, B greedy samples, as `Engine.generate` serves
them) the time to first token, the median time per decode step (TPOT), decode tokens/s per sequence and in
aggregate, peak memory, and the memory traffic per step (weight bytes + B x KV bytes read) as GB/s and, on a GPU
that nanochat.common's table knows, as MBU (traffic / TPOT / peak bandwidth), beside the batch-1 roofline.

    python -m dev.infer_bench --source sft                                          # GPU: latest sft checkpoint
    python -m dev.infer_bench --source base --model-tag d12 --step 5000 --json d12.json
    python -m dev.infer_bench --depth 20 --compile-decode                           # the CUDA-graph decode path
    python -m dev.infer_bench --depth 4 --vocab-size 65536 --batch-sizes 1 8 --decode-tokens 32  # tiny, CPU

Contract: the engine is measured as it is (its own KV cache, prefill once then B rows; eager unless
--compile-decode), decoding at temperature 0 with a stand-in tokenizer whose special tokens the model can never
sample, so every row decodes exactly --decode-tokens tokens. Prompts are random token ids (speed does not depend
on them); weights are in the compute dtype. Batch sizes whose KV cache would not fit in free memory are skipped;
an out-of-memory error ends the sweep. Prints a table and, with --json, writes every figure. Does not test
quality or serve requests.
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch

from nanochat.common import DTYPES, Runtime, autodetect_device_type, autodetect_dtype, describe_environment, gpu_peaks
from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, GPTConfig

GIB = 2**30


class NeverStops:
    """Stands in for the tokenizer: every special token gets id -1, which the model can never sample, so the
    engine decodes exactly max_tokens tokens per row (no stop token, no calculator call)."""

    def encode_special(self, name: str) -> int:
        return -1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(depth: int, vocab_size: int, sequence_len: int, device, dtype, seed: int = 0) -> GPT:
    """A GPT at `depth` with every weight random (init zeroes lm_head and the output projections, which would
    make every logit equal), in `dtype`, in eval mode."""
    config = GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len)
    torch.manual_seed(seed)
    model = GPT.build(config, device)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "wte.weight":
                parameter.normal_(0.0, parameter.size(1) ** -0.5)
    return model.to(dtype).eval()


def weight_bytes_per_step(model: GPT, batch_size: int) -> int:
    """Bytes of weights one decode step reads: every matrix as stored, plus B embedding rows."""
    matrices = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name != "wte.weight")
    return matrices + batch_size * model.wte.weight[0].numel() * model.wte.weight.element_size()


def kv_bytes_per_position(model: GPT) -> int:
    """Bytes of keys and values one position holds over all layers, in the engine's cache dtype."""
    c = model.config
    dtype = model.compute_dtype or model.wte.weight.dtype
    return 2 * c.n_layer * c.n_kv_head * c.head_dim * torch.empty((), dtype=dtype).element_size()


def meminfo(field: str, path: str = "/proc/self/status") -> int | None:
    """A kB field of /proc (Linux) in bytes, None where there is none."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window; returns what `peak_memory_bytes` will measure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:  # Linux: writing 5 to clear_refs resets the RSS high-water mark, VmHWM (proc(5), since Linux 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "rss_high_water"
    except OSError:
        return "rss_high_water_since_start"  # ru_maxrss cannot be reset: a peak over the whole process


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return meminfo("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss: kB on Linux


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory still free for the KV cache and activations: the GPU's free memory, or the host's MemAvailable."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else meminfo("MemAvailable", "/proc/meminfo")


def time_generate(engine: Engine, prompt: list[int], batch_size: int, decode_tokens: int, device):
    """Timestamps (seconds since the call) of each token column `Engine.generate` yields, greedy, B rows, and
    the number of tokens each row sampled."""
    stamps, sampled = [], [0] * batch_size
    synchronize(device)
    start = time.perf_counter()
    for _column, masks in engine.generate(prompt, batch_size, max_tokens=decode_tokens, temperature=0):
        synchronize(device)  # generate already waits on the device (.tolist()); this makes it explicit
        stamps.append(time.perf_counter() - start)
        sampled = [count + mask for count, mask in zip(sampled, masks)]
    return stamps, sampled


def bench_batch(engine, prompt, batch_size: int, args, device, peak_bandwidth) -> dict:
    time_generate(engine, prompt, batch_size, min(4, args.decode_tokens), device)  # warmup: allocator, kernels
    memory_kind = reset_peak_memory(device)
    ttfts, step_times, rates = [], [], []
    for _ in range(args.repeats):
        stamps, sampled = time_generate(engine, prompt, batch_size, args.decode_tokens, device)
        if sampled != [args.decode_tokens] * batch_size:
            raise RuntimeError(f"rows sampled {sampled} tokens, not {args.decode_tokens} each")
        ttfts.append(stamps[0])
        steps = [b - a for a, b in zip(stamps, stamps[1:])]  # one forward + one sample each
        step_times += steps
        rates.append(len(steps) / (stamps[-1] - stamps[0]))  # decode only: first token to last
    tpot, per_sequence = statistics.median(step_times), statistics.median(rates)
    # Keys read per step: the engine attends over every cached position, prompt_len + k at step k (1-based).
    kv_bytes = batch_size * kv_bytes_per_position(engine.model) * (len(prompt) + args.decode_tokens / 2)
    bytes_per_step = weight_bytes_per_step(engine.model, batch_size) + kv_bytes
    result = {
        "batch_size": batch_size,
        "decode_tokens": args.decode_tokens,
        "decode_tokens_per_row": sampled,  # as counted in the last run (every run is checked)
        "repeats": args.repeats,
        "ttft_s_median": statistics.median(ttfts),
        "tpot_s_median": tpot,
        "tpot_s_min": min(step_times),
        "decode_tokens_per_s_per_sequence": per_sequence,
        "decode_tokens_per_s_aggregate": per_sequence * batch_size,
        "bytes_per_step": bytes_per_step,
        "memory_bytes_per_s": bytes_per_step / tpot,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": memory_kind,
    }
    if peak_bandwidth:
        result["mbu"] = bytes_per_step / tpot / peak_bandwidth
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model: a checkpoint, or random weights at a depth
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--source", default=None, help="stage whose checkpoint to load: base | mid | sft | rl")
    which.add_argument("--depth", type=int, default=None, help="random weights at this depth instead of a checkpoint")
    parser.add_argument("--model-tag", default=None, help="checkpoint directory, e.g. d20 (default: largest depth)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last complete one)")
    parser.add_argument("--vocab-size", type=int, default=65536, help="with --depth: vocabulary (2^16 as speedrun)")
    parser.add_argument("--sequence-len", type=int, default=2048, help="with --depth: the model's context")
    # Benchmark
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (clamped to context - decode)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per row (>= 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="decode rows")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (and of prefill); medians")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward (Engine's)")
    parser.add_argument("--compile-decode", action="store_true", help="Engine(compile_decode=True): CUDA graphs")
    parser.add_argument("--device-type", default=None, help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: nanochat.common's choice")
    parser.add_argument("--seed", type=int, default=0, help="random weights and prompt")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    # Derived values
    device_type = args.device_type or autodetect_device_type()
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device(device_type)
    dtype = getattr(torch, args.dtype) if args.dtype else autodetect_dtype(device_type)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.prompt_len < 1:
        parser.error("--batch-sizes, --repeats and --prompt-len must be >= 1")
    if args.decode_tokens < 2:
        parser.error("--decode-tokens must be >= 2: decode speed is timed from the first token to the last")
    batch_sizes = sorted(set(args.batch_sizes))

    # ------------------------------------------------------------------------ model
    if args.source is not None:
        from nanochat.checkpoint import load_model

        model, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step, dtype=dtype)
        model_name = f"{args.source} {args.model_tag or ''} step {meta['step']}".replace("  ", " ")
    else:
        model = random_model(args.depth, args.vocab_size, args.sequence_len, device, dtype, args.seed)
        model_name = f"random d{args.depth}"
    config = model.config
    prompt_len = min(args.prompt_len, config.sequence_len - args.decode_tokens)
    if prompt_len < 1:
        parser.error(f"--decode-tokens {args.decode_tokens} leaves no room for a prompt in {config.sequence_len}")
    prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(args.seed))
    prompt = prompt.tolist()
    engine = Engine(model, NeverStops(), prefill_chunk=args.prefill_chunk, compile_decode=args.compile_decode)

    environment = describe_environment(Runtime(device, dtype)) | {"torch_threads": torch.get_num_threads()}
    peaks = gpu_peaks(environment["gpu"]) if device.type == "cuda" else None
    peak_bandwidth = peaks[1] if peaks else None
    weights_1, kv_per_position = weight_bytes_per_step(model, 1), kv_bytes_per_position(model)
    print(f"infer_bench: {json.dumps(environment)}")
    print(
        f"model: {model_name}, {model.num_params() / 1e6:.1f}M params, {dtype}, {config}\n"
        f"prompt {prompt_len} tokens (asked {args.prompt_len}), decode {args.decode_tokens} tokens, "
        f"{args.repeats} repeats; weights read per step {weights_1 / 1e6:.1f} MB, KV {kv_per_position / 1024:.1f} KiB "
        "per position"
    )
    roofline = None
    if peak_bandwidth:
        roofline = peak_bandwidth / (weights_1 + kv_per_position * (prompt_len + args.decode_tokens / 2))
        print(f"batch-1 roofline: {roofline:,.0f} tok/s at {peak_bandwidth / 1e12:.2f} TB/s ({environment['gpu']})")

    # ------------------------------------------------------------------------ prefill: one warmup, then timed
    prefill_times = []
    for i in range(args.repeats + 1):
        cache = KVCache.for_model(model, 1, prompt_len)
        synchronize(device)
        start = time.perf_counter()
        engine.prefill(cache, prompt)
        synchronize(device)
        prefill_times += [time.perf_counter() - start] if i > 0 else []
    prefill_s = statistics.median(prefill_times)
    prefill = {"prompt_len": prompt_len, "prefill_s_median": prefill_s, "prefill_tokens_per_s": prompt_len / prefill_s}
    print(f"prefill: {prefill['prefill_tokens_per_s']:,.0f} tok/s ({prefill_s * 1e3:.1f} ms)")

    # ------------------------------------------------------------------------ decode sweep
    results, skipped = [], []
    for batch_size in batch_sizes:
        # The engine holds a B-row cache of prompt + decode positions beside the batch-1 prompt cache, plus
        # fp32 logits (B, V) a few times over; a quarter of free memory is kept back for everything else.
        needed = kv_per_position * ((prompt_len + args.decode_tokens) * batch_size + prompt_len)
        needed += 4 * batch_size * config.padded_vocab_size * 4
        free = free_memory_bytes(device)
        if free is not None and needed > 0.75 * free:
            print(f"B={batch_size}: skipped, needs ~{needed / GIB:.2f} GiB of {free / GIB:.2f} GiB free")
            skipped.append(batch_size)
            continue
        try:
            r = bench_batch(engine, prompt, batch_size, args, device, peak_bandwidth)
        except torch.OutOfMemoryError:
            print(f"B={batch_size}: out of memory; larger batch sizes skipped")
            skipped += [b for b in batch_sizes if b >= batch_size]
            torch.cuda.empty_cache() if device.type == "cuda" else None
            break
        results.append(r)
        mbu = f", MBU {r['mbu']:.1%}" if "mbu" in r else ""
        print(
            f"B={batch_size:<3} TTFT {r['ttft_s_median'] * 1e3:8.1f} ms  TPOT {r['tpot_s_median'] * 1e3:7.2f} ms  "
            f"{r['decode_tokens_per_s_per_sequence']:8,.1f} tok/s/seq  {r['decode_tokens_per_s_aggregate']:10,.1f} "
            f"tok/s  {r['memory_bytes_per_s'] / 1e9:7.1f} GB/s{mbu}  "
            f"peak {r['peak_memory_bytes'] / GIB:.2f} GiB",
            flush=True,
        )

    # ------------------------------------------------------------------------ report
    mbu = " MBU |" if peak_bandwidth else ""
    print(f"\n| batch | TTFT (ms) | TPOT (ms) | tok/s per seq | tok/s aggregate | GB/s | peak mem (GiB) |{mbu}")
    print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peak_bandwidth else ""))
    for r in results:
        print(
            f"| {r['batch_size']} | {r['ttft_s_median'] * 1e3:.1f} | {r['tpot_s_median'] * 1e3:.2f} | "
            f"{r['decode_tokens_per_s_per_sequence']:,.1f} | {r['decode_tokens_per_s_aggregate']:,.1f} | "
            f"{r['memory_bytes_per_s'] / 1e9:.1f} | {r['peak_memory_bytes'] / GIB:.2f} |"
            + (f" {r['mbu']:.1%} |" if peak_bandwidth else "")
        )
    if roofline and results and results[0]["batch_size"] == 1:
        achieved = results[0]["decode_tokens_per_s_per_sequence"]
        print(f"batch 1: {achieved:,.0f} tok/s = {achieved / roofline:.1%} of the {roofline:,.0f} tok/s roofline")
    if args.json:
        settings = {k: getattr(args, k) for k in ("decode_tokens", "repeats", "prefill_chunk", "compile_decode")}
        report = {
            "environment": environment,
            "model": {
                "name": model_name,
                "config": config.to_dict(),
                "params": model.num_params(),
                "dtype": str(dtype).removeprefix("torch."),
                "weight_bytes_per_step_batch1": weights_1,
                "kv_bytes_per_position": kv_per_position,
            },
            "settings": settings
            | {
                "prompt_len": prompt_len,
                "prompt_len_asked": args.prompt_len,
                "batch_sizes": batch_sizes,
                "temperature": 0,
            },  # fmt: skip
            "peak_bandwidth_bytes_per_s": peak_bandwidth,
            "roofline_batch1_tokens_per_s": roofline,
            "prefill": prefill,
            "decode": results,
            "skipped_batch_sizes": skipped,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
