"""Benchmark of the pretraining dataloader on its own: tokens per second of batches produced, on CPU.

Answers, for dev/BENCHMARKS.md ("Pretraining dataloader"):
1. How many tokens per second does one PretrainLoader deliver at batch 8 x 2048 and 32 x 512, with reading
   ahead on a background thread and without, how long does its first batch take, and how long does a
   training loop wait for each batch?
2. Does one loader keep up with training? The CPU training step consumes ~200-700 tokens/s (depth 4-8); one
   H100 at depth 20 about 100K tokens/s. The table prints the margin over both.
3. What fraction of tokens does best-fit packing crop at each seq_len, against greedy BOS-aligned packing
   (documents in order, each row starts at <|bos|>, the document that overflows a row is cropped)?

Contract:
- Shards are built for the run in a temporary directory from the Wikipedia sample (28,560 articles, default
  $NANOCHAT_DATA_DIR/pretrain/enwiki-sample.jsonl.gz, or --data) in the real shards' layout: row groups
  of 1,024 documents, zstd; the first 1,024 articles are the validation shard, the rest three train shards.
- The tokenizer is trained on the whole sample at --vocab-size (default 65,536, the real run's).
- Throughput: each run builds a fresh loader on the train split (seed 0, one rank), times its first batch
  apart (startup: footers, the first row groups, filling the buffer), then times batches until the loader
  starts reading epoch 1, so the timed window starts and ends with a full buffer and covers every row group.
  --repeats runs each; the table gives the median. Crop fractions are the same epoch's.
- Stalls: a training step is simulated by a sleep as long as one H100 at depth 20 takes for the batch; the
  table gives the time spent waiting in next(), the part of the loader a training loop does not overlap.
- Greedy crop fractions come from the token counts of all train documents in shard order, over one epoch.

Does not: time the host-to-device copy (this machine has no GPU; on CUDA the loader adds one pinned
non-blocking copy per batch), run several ranks, or write dev/BENCHMARKS.md.

    .venv/bin/python -m dev.bench_dataloader                         # full run, ~2 min on 2 busy cores
    .venv/bin/python -m dev.bench_dataloader --max-docs 4000 --vocab-size 4096 --repeats 1 --step-steps 5  # smoke
"""

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
import torch

from nanochat.common import cpu_model
from nanochat.dataloader import PretrainLoader
from nanochat.tokenizer import Tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join("pretrain", "enwiki-sample.jsonl.gz")  # the Wikipedia sample, in $NANOCHAT_DATA_DIR
DOCS_PER_ROW_GROUP = 1024  # as in the real shards
ROW_GROUPS_PER_SHARD = 10
CPU_STEP_TOKENS_PER_S = 700  # the fastest CPU training step we have (depth 4), tokens/s
H100_STEP_TOKENS_PER_S = 100_000  # one H100 at depth 20, tokens/s


def hardware() -> str:
    model = cpu_model()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{model}, {os.cpu_count()} logical cores, load average {load} (1/5/15 min) at start"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def build_shards(texts: list[str], directory: str) -> None:
    """The real shards' layout: row groups of 1,024 documents; the first row group's worth is validation."""
    val, train = texts[:DOCS_PER_ROW_GROUP], texts[DOCS_PER_ROW_GROUP:]
    pq.write_table(pa.table({"text": val}), os.path.join(directory, "val_00000.parquet"), compression="zstd")
    per_shard = DOCS_PER_ROW_GROUP * ROW_GROUPS_PER_SHARD
    for shard, start in enumerate(range(0, len(train), per_shard)):
        table = pa.table({"text": train[start : start + per_shard]})
        path = os.path.join(directory, f"shard_{shard:05d}.parquet")
        pq.write_table(table, path, row_group_size=DOCS_PER_ROW_GROUP, compression="zstd")


def greedy_cropped_fraction(lengths: list[int], row_len: int) -> float:
    """Crop fraction of greedy BOS-aligned packing: documents in order, the one that overflows a row is cropped."""
    packed = cropped = filled = 0
    for length in lengths:
        space = row_len - filled
        if length < space:
            filled += length
            continue
        cropped += length - space
        packed += row_len
        filled = 0
    return cropped / (packed + cropped)


def make_loader(tokenizer, directory, batch_size, seq_len, prefetch, tokenizer_threads) -> PretrainLoader:
    return PretrainLoader(
        tokenizer, [directory], "train", batch_size, seq_len,
        tokenizer_threads=tokenizer_threads, prefetch_row_groups=prefetch,
    )  # fmt: skip


def time_one_epoch(loader) -> dict:
    """Tokens/s of batches over the first epoch, timed after the first batch (which fills the buffer)."""
    start = time.perf_counter()
    next(loader)
    first_batch_s = time.perf_counter() - start
    batches = 0
    start = time.perf_counter()
    while loader.epoch == 0:
        next(loader)
        batches += 1
    elapsed = time.perf_counter() - start
    loader.close()
    tokens = batches * loader.batch_size * loader.seq_len  # input tokens, as a training step counts them
    return {
        "tokens_per_s": tokens / elapsed,
        "ms_per_batch": 1000 * elapsed / batches,
        "first_batch_s": first_batch_s,
        "cropped_fraction": loader.cropped_fraction,
    }


def time_beside_a_step(loader, step_s: float, steps: int) -> dict:
    """Seconds spent in next() when each batch is followed by a training step of step_s (simulated by a sleep,
    which releases the GIL as waiting on a GPU does)."""
    next(loader)
    waits = []
    for _ in range(steps):
        time.sleep(step_s)
        start = time.perf_counter()
        next(loader)
        waits.append(time.perf_counter() - start)
    loader.close()
    return {"mean_wait_ms": 1000 * statistics.mean(waits), "max_wait_ms": 1000 * max(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data_dir = os.environ.get("NANOCHAT_DATA_DIR") or "$NANOCHAT_DATA_DIR"
    parser.add_argument("--data", default=os.path.join(data_dir, SAMPLE), help="JSON-lines file, a 'text' a line")
    parser.add_argument("--max-docs", type=int, default=-1, help="use only the first N documents (-1 = all)")
    parser.add_argument("--vocab-size", type=int, default=65_536, help="tokenizer vocabulary size")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per configuration; the median is shown")
    parser.add_argument("--step-steps", type=int, default=80, help="simulated training steps per stall measurement")
    parser.add_argument("--tokenizer-threads", type=int, default=4, help="threads of tiktoken's batch encode")
    parser.add_argument("--configs", nargs="+", default=["8x2048", "32x512"], help="batch x seq_len")
    args = parser.parse_args()
    if not os.path.isfile(args.data):
        parser.error(f"no data file {args.data}: pass --data FILE or set NANOCHAT_DATA_DIR")
    configs = [tuple(int(x) for x in config.split("x")) for config in args.configs]

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"hardware: {hardware()}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, tiktoken {tiktoken.__version__}, "
        f"pyarrow {pa.__version__}; git {git_commit()}"
    )
    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    texts = texts[: args.max_docs] if args.max_docs >= 0 else texts
    start = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
    print(f"tokenizer: vocab {tokenizer.get_vocab_size():,} trained on {len(texts):,} documents in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="nanochat-bench-dataloader-") as directory:
        build_shards(texts, directory)
        train_texts = texts[DOCS_PER_ROW_GROUP:]
        lengths = [len(ids) for ids in tokenizer.encode(train_texts, prepend="<|bos|>", num_threads=4)]
        print(f"data: {len(train_texts):,} train documents, {sum(lengths):,} tokens with <|bos|>, "
              f"{-(-len(train_texts) // DOCS_PER_ROW_GROUP)} row groups of <= {DOCS_PER_ROW_GROUP} documents; "
              f"loader: buffer_docs=1000, tokenizer_threads={args.tokenizer_threads}, seed 0, one rank")  # fmt: skip

        print(f"\n1. Loader alone: one epoch per run after the first batch, median of {args.repeats} runs")
        header = (
            f"{'batch':>9} {'prefetch':>8} {'tokens/s':>10} {'ms/batch':>9} {'1st batch s':>11} "
            f"{'x CPU step':>10} {'x H100 d20':>10} {'cropped':>8} {'greedy':>7}"
        )
        print(header)
        print("-" * len(header))
        for batch_size, seq_len in configs:
            greedy = greedy_cropped_fraction(lengths, seq_len + 1)
            for prefetch in (2, 0):
                settings = (tokenizer, directory, batch_size, seq_len, prefetch, args.tokenizer_threads)
                runs = [time_one_epoch(make_loader(*settings)) for _ in range(args.repeats)]
                median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                print(
                    f"{f'{batch_size}x{seq_len}':>9} {prefetch:>8} {median['tokens_per_s']:>10,.0f} "
                    f"{median['ms_per_batch']:>9.1f} {median['first_batch_s']:>11.2f} "
                    f"{median['tokens_per_s'] / CPU_STEP_TOKENS_PER_S:>10,.0f} "
                    f"{median['tokens_per_s'] / H100_STEP_TOKENS_PER_S:>10.1f} "
                    f"{median['cropped_fraction']:>8.1%} {greedy:>7.1%}"
                )

        print(f"\n2. Beside a simulated H100 d20 step (sleep of batch tokens / {H100_STEP_TOKENS_PER_S:,} tokens/s), "
              f"{args.step_steps} steps: time the training loop waits in next()")  # fmt: skip
        header = f"{'batch':>9} {'prefetch':>8} {'step ms':>8} {'mean wait ms':>12} {'max wait ms':>11} {'stall':>6}"
        print(header)
        print("-" * len(header))
        for batch_size, seq_len in configs:
            step_s = batch_size * seq_len / H100_STEP_TOKENS_PER_S
            for prefetch in (2, 0):
                loader = make_loader(tokenizer, directory, batch_size, seq_len, prefetch, args.tokenizer_threads)
                waits = time_beside_a_step(loader, step_s, args.step_steps)
                stall = waits["mean_wait_ms"] / (1000 * step_s + waits["mean_wait_ms"])
                print(
                    f"{f'{batch_size}x{seq_len}':>9} {prefetch:>8} {1000 * step_s:>8.0f} "
                    f"{waits['mean_wait_ms']:>12.2f} {waits['max_wait_ms']:>11.2f} {stall:>6.1%}"
                )
    print(
        "\nprefetch: row groups read and tokenized ahead on a background thread (0 = in the caller's thread). "
        f"x CPU step / x H100 d20: loader tokens/s over a training step's consumption ({CPU_STEP_TOKENS_PER_S} "
        f"and {H100_STEP_TOKENS_PER_S:,} tokens/s). cropped: best-fit's discarded share of the tokens of documents "
        "that left the buffer during the epoch (the ~1,000 still buffered at its end not counted); greedy: greedy "
        "BOS-aligned packing over the same epoch. stall: share of a step's wall time spent waiting for the batch."
    )


if __name__ == "__main__":
    main()
