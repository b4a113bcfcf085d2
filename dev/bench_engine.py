"""Decode speed on CPU of nanochat's Engine beside the naive `GPT.generate` and transformers' `generate`.

For each depth the script builds a GPT with random weights (decode speed does not depend on the weights) and a
tokenizer trained here on the Wikipedia sample at --vocab-size (only its size matters for speed), exports both
with nanochat.hf_export into a temp dir and loads them back with transformers (NanoChatForCausalLM, no custom
code). Then, in one process, with the same prompt, the same number of new tokens, fp32 and the same torch
threads, it times greedy decoding by
- engine: `Engine.generate(prompt, num_samples=B, temperature=0)`, B = 1 and 8 (one prompt, B rows);
- naive: `GPT.generate(prompt, temperature=0)`, B = 1 only (it has no batch, and recomputes the whole
  sequence for every token: the slow reference the engine is tested against);
- transformers: `model.generate(ids, do_sample=False, max_new_tokens=N, min_new_tokens=N)`, B = 8 being 8
  copies of the prompt (its KV cache, its default attention, sdpa).
Every implementation decodes exactly N tokens per row: the engine gets a stand-in tokenizer whose special
tokens it can never sample (dev/infer_bench.py's NeverStops), transformers' min_new_tokens masks its eos
tokens, the naive sampler has no stop rule. The implementations take turns inside each repeat, so a shared
machine's load falls on all of them alike; medians over repeats are reported.

decode tok/s per sequence = (N - 1) / (time of the last new token - time of the first), the timestamps taken
where each implementation hands a token over (the engine's and GPT.generate's yields, a transformers streamer's
put), so prefill is excluded; aggregate = B x that. end-to-end tok/s = B x N / the whole call, prefill included.

    .venv/bin/python -m dev.bench_engine                                   # depth 4 and 8, batch 1 and 8
    .venv/bin/python -m dev.bench_engine --threads 1 --json /tmp/bench_engine.json
    .venv/bin/python -m dev.bench_engine --depths 4 --profile              # + torch.profiler and cProfile of it
    .venv/bin/python -m dev.bench_engine --quantize 8 4                    # + the engine on int8 / int4 weights

Needs $NANOCHAT_DATA_DIR/pretrain/enwiki-sample.jsonl.gz (or --data-dir; for the tokenizer and the prompt) and
transformers >= 5.
Not a quality test: it checks only that the three greedy decoders agree on the first tokens.
"""

import argparse
import copy
import cProfile
import gzip
import io
import json
import os
import pstats
import statistics
import tempfile
import time

import torch

from dev.infer_bench import NeverStops, random_model
from nanochat.common import Runtime, describe_environment
from nanochat.engine import Engine
from nanochat.hf_export import export
from nanochat.tokenizer import Tokenizer

WIKI_SAMPLE = os.path.join("pretrain", "enwiki-sample.jsonl.gz")  # under the data directory


# ---------------------------------------------------------------------------- one timed run per implementation


def run_engine(engine: Engine, prompt, batch_size: int, new_tokens: int):
    """(token timestamps, tokens of row 0, seconds of the whole call)."""
    stamps, tokens = [], []
    start = time.perf_counter()
    for column, _masks in engine.generate(prompt, batch_size, max_tokens=new_tokens, temperature=0):
        stamps.append(time.perf_counter())
        tokens.append(column[0])
    return stamps, tokens, time.perf_counter() - start


def run_naive(model, prompt, batch_size: int, new_tokens: int):
    assert batch_size == 1, "GPT.generate has no batch"
    stamps, tokens = [], []
    start = time.perf_counter()
    for token in model.generate(prompt, max_tokens=new_tokens, temperature=0):
        stamps.append(time.perf_counter())
        tokens.append(token)
    return stamps, tokens, time.perf_counter() - start


class Stamps:
    """A transformers streamer (the BaseStreamer protocol: put, end) that timestamps each new token column."""

    def __init__(self):
        self.stamps, self.tokens, self.prompt_seen = [], [], False

    def put(self, value):
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())
        self.tokens.append(int(value.reshape(-1)[0]))

    def end(self):
        pass


def run_transformers(hf_model, prompt, batch_size: int, new_tokens: int, bos_id: int):
    ids = torch.tensor([prompt] * batch_size)
    streamer = Stamps()
    start = time.perf_counter()
    with torch.no_grad():
        output = hf_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=bos_id,  # there is no pad token; never used, as no row stops early
            streamer=streamer,
        )
    total = time.perf_counter() - start
    assert output.shape == (batch_size, len(prompt) + new_tokens), output.shape
    return streamer.stamps, streamer.tokens, total


def summarise(runs: list, batch_size: int, new_tokens: int) -> dict:
    per_sequence = [(len(stamps) - 1) / (stamps[-1] - stamps[0]) for stamps, _, _ in runs]
    end_to_end = [batch_size * new_tokens / total for _, _, total in runs]
    for stamps, _, _ in runs:
        assert len(stamps) == new_tokens, f"{len(stamps)} tokens decoded, not {new_tokens}"
    return {
        "decode_tokens_per_s_per_sequence": statistics.median(per_sequence),
        "decode_tokens_per_s_aggregate": batch_size * statistics.median(per_sequence),
        "end_to_end_tokens_per_s": statistics.median(end_to_end),
        "decode_tokens_per_s_all_repeats": per_sequence,
    }


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two greedy outputs (fp32 rounding may flip a near-tie argmax)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------------------- prototype (--patch)


def patch_lm_head(model) -> None:
    """Prototype for nanochat/gpt.py, not applied there: compute the unembedding of a few rows as
    (W @ x^T)^T instead of F.linear(x, W) = x @ W^T. On CPU, for the (65,536 x C) lm_head and B <= 64 rows, the
    tall-skinny product reads W once in a layout the BLAS partitions well across threads; F.linear's wide
    (B x 65,536) product measured up to ~1.8x slower at B = 8 with 2 threads (see the bench_engine section of
    dev/BENCHMARKS.md). The block matrices are left alone (they fit in cache, and there F.linear was faster)."""
    head = model.lm_head

    def forward(x):
        rows = x.shape[:-1].numel()
        if rows > 64:
            return torch.nn.functional.linear(x, head.weight.to(x.dtype))
        flat = x.reshape(rows, x.size(-1))  # (rows, C)
        return (head.weight.to(x.dtype) @ flat.T).T.reshape(*x.shape[:-1], head.weight.size(0))

    head.forward = forward


# ---------------------------------------------------------------------------- profiling


def profile_engine(engine: Engine, prompt, batch_size: int, new_tokens: int) -> None:
    """Where a decode's time goes: torch.profiler's ops by self time, then cProfile's Python functions."""
    from torch.profiler import ProfilerActivity, profile

    run_engine(engine, prompt, batch_size, new_tokens)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_engine(engine, prompt, batch_size, new_tokens)
    print(f"\n--- torch.profiler, engine, B={batch_size}, {new_tokens} tokens (prefill included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
    profiler = cProfile.Profile()
    profiler.enable()
    run_engine(engine, prompt, batch_size, new_tokens)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
    print(f"--- cProfile, engine, B={batch_size} (tottime)\n{out.getvalue()}")


# ---------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8], help="random-weight models to compare")
    parser.add_argument("--vocab-size", type=int, default=65536, help="tokenizer and model vocabulary (2^16)")
    # Benchmark
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (a Wikipedia article's start)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per row by every implementation")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="engine and transformers rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every implementation once)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--data-dir", default=os.environ.get("NANOCHAT_DATA_DIR"), help="default: $NANOCHAT_DATA_DIR")
    parser.add_argument("--profile", action="store_true", help="also profile the engine at each batch size")
    parser.add_argument(
        "--patch-lm-head",
        action="store_true",
        help="prototype: also time an engine whose lm_head computes (W @ x^T)^T, interleaved with the rest",
    )
    parser.add_argument(
        "--quantize",
        type=int,
        nargs="*",
        default=[],
        choices=[4, 8],
        help="also time the engine on weight-only int8 / int4 copies of the model (nanochat/quantize.py)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("set NANOCHAT_DATA_DIR or --data-dir to the data directory (it holds pretrain/enwiki-sample...)")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), torch.float32
    environment = describe_environment(Runtime(device, dtype))
    import transformers

    environment.update(torch_threads=torch.get_num_threads(), transformers=transformers.__version__)
    environment["patch_lm_head"] = args.patch_lm_head
    environment["load_average_start"] = os.getloadavg()
    print(f"bench_engine: {json.dumps(environment)}")

    # ------------------------------------------------------------------------ tokenizer and prompt
    with gzip.open(os.path.join(args.data_dir, WIKI_SAMPLE), "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    tokenizer = Tokenizer.train_from_iterator(docs, args.vocab_size)
    prompt = tokenizer.encode(docs[0], prepend="<|bos|>")[: args.prompt_len]
    bos_id = tokenizer.get_bos_token_id()
    print(f"tokenizer: {tokenizer.get_vocab_size():,} tokens; prompt {len(prompt)} tokens, {args.new_tokens} new")

    results = []
    for depth in args.depths:
        # -------------------------------------------------------------------- models
        model = random_model(depth, tokenizer.get_vocab_size(), 2048, device, dtype)
        engine = Engine(model, NeverStops())
        with tempfile.TemporaryDirectory() as export_dir:
            export(model, tokenizer, export_dir)
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).eval()
        print(f"\nd{depth}: {model.num_params() / 1e6:.1f}M params, {model.config}")
        print(f"transformers: {type(hf_model).__name__}, attention {hf_model.config._attn_implementation}")

        runners = {
            "engine": lambda b, engine=engine: run_engine(engine, prompt, b, args.new_tokens),
            "naive": lambda b, model=model: run_naive(model, prompt, b, args.new_tokens),
            "transformers": lambda b, hf=hf_model: run_transformers(hf, prompt, b, args.new_tokens, bos_id),
        }
        if args.patch_lm_head:  # a second copy of the model, so the unpatched engine runs beside it
            patched = copy.deepcopy(model)
            patch_lm_head(patched)
            patched_engine = Engine(patched, NeverStops())
            runners["engine+lm_head_patch"] = lambda b, e=patched_engine: run_engine(e, prompt, b, args.new_tokens)
        for bits in args.quantize:  # the same weights rounded to int8 / int4, decoded by the same engine
            from nanochat.quantize import quantize_model

            quantized = copy.deepcopy(model)
            quantize_model(quantized, bits=bits)
            quantized_engine = Engine(quantized, NeverStops())
            runners[f"engine int{bits}"] = lambda b, e=quantized_engine: run_engine(e, prompt, b, args.new_tokens)
        cases = [(name, b) for b in args.batch_sizes for name in runners if not (name == "naive" and b != 1)]

        # -------------------------------------------------------------------- warmup, agreement
        first = {case: runners[case[0]](case[1]) for case in cases}
        tokens = {case: run[1] for case, run in first.items()}
        pairs = [("engine", other) for other in runners if other != "engine"]
        same = {f"{a}_vs_{b}": agreement(tokens[(a, 1)], tokens[(b, 1)]) for a, b in pairs}
        print(f"greedy tokens in common (of {args.new_tokens}): {same}")

        # -------------------------------------------------------------------- timed rounds
        runs = {case: [] for case in cases}
        for repeat in range(args.repeats):
            for case in cases:  # interleaved: load on a shared machine falls on every implementation alike
                runs[case].append(runners[case[0]](case[1]))
            print(f"  round {repeat + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)
        for (name, batch_size), case_runs in runs.items():
            r = {"depth": depth, "implementation": name, "batch_size": batch_size, "params": model.num_params()}
            r.update(summarise(case_runs, batch_size, args.new_tokens))
            results.append(r)
        this_depth = results[-len(cases) :]
        for r in this_depth:
            reference = next(
                x for x in this_depth if x["implementation"] == "transformers" and x["batch_size"] == r["batch_size"]
            )
            r["greedy_tokens_in_common_at_batch_1"] = same
            r["vs_transformers"] = r["decode_tokens_per_s_per_sequence"] / reference["decode_tokens_per_s_per_sequence"]
            r["end_to_end_vs_transformers"] = r["end_to_end_tokens_per_s"] / reference["end_to_end_tokens_per_s"]

        if args.profile:
            for batch_size in args.batch_sizes:
                profile_engine(engine, prompt, batch_size, args.new_tokens)

    # ------------------------------------------------------------------------ report
    environment["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {environment['load_average_end']}")
    print(
        "\n| depth | batch | implementation | decode tok/s per seq | decode tok/s aggregate | vs transformers | "
        "end-to-end tok/s | vs transformers |"
    )
    print("|---:|---:|:---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['depth']} | {r['batch_size']} | {r['implementation']} | "
            f"{r['decode_tokens_per_s_per_sequence']:,.1f} | {r['decode_tokens_per_s_aggregate']:,.1f} | "
            f"{r['vs_transformers']:.2f}x | "
            f"{r['end_to_end_tokens_per_s']:,.1f} | {r['end_to_end_vs_transformers']:.2f}x |"
        )
    if args.json:
        settings = {k: getattr(args, k) for k in ("depths", "vocab_size", "new_tokens", "batch_sizes", "repeats")}
        settings["prompt_len"] = len(prompt)
        with open(args.json, "w") as f:
            json.dump({"environment": environment, "settings": settings, "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
