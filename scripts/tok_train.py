"""Train the BPE tokenizer on pretraining text and save it to <base dir>/tokenizer/tokenizer.json.

Reads the training split of parquet shards (`text` column) or JSON-lines / text files (see
nanochat/dataset.py), caps each document, stops after --max-chars characters, trains with rustbpe and
checks that the result round-trips text. Writes tokenizer.json, train_stats.json and the report card's
<base dir>/report/tok_train.json.

    python -m scripts.tok_train                                   # shards in <base dir>/base_data
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.tok_train  # offline: <data dir>/pretrain
    python -m scripts.tok_train --data ../shared/data/pretrain/enwiki-sample.jsonl.gz --vocab-size 4096  # tiny, CPU

Does not download data (nanochat.dataset) or evaluate compression (scripts.tok_eval).
"""

import argparse
import json
import os
import time

from nanochat.common import get_base_dir
from nanochat.dataset import default_pretrain_paths, expand_paths, iter_documents
from nanochat.report import write_stage_summary
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

# Text that must survive encode -> decode unchanged: mixed scripts, emoji with joiners, odd whitespace,
# and special-token lookalikes, which must stay plain text.
ROUND_TRIP_TEXT = (
    "Hello, world! It's 2026; we've got 12345 tokens.\n\n\tIndented\r\nWindows line\u00a0nbsp "
    "日本語のテキスト, 한국어 문장, Ελληνικά, العربية, हिन्दी 🙂👨‍👩‍👧 e\u0301 <|bos|> <|assistant_end|>"
)


def capped(texts, max_chars: int, doc_cap: int):
    """Each text cut to `doc_cap` characters, stopping once `max_chars` characters have been yielded."""
    total = 0
    for text in texts:
        text = text[: min(doc_cap, max_chars - total)]
        if text:
            yield text
            total += len(text)
        if total >= max_chars:
            return


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    parser.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="parquet shards, .jsonl[.gz] or .txt files, or directories of them "
        "(default: <base dir>/base_data, else $NANOCHAT_DATA_DIR/pretrain)",
    )
    parser.add_argument(
        "--max-chars",
        type=int,
        default=2_000_000_000,
        help="train on at most this many characters (default 2B, as the reference speedrun)",
    )
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept from the start of each document")
    # Tokenizer
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=65_536,
        help="total vocabulary: 256 bytes + merges + 9 special tokens (2^16 as the reference d20)",
    )
    parser.add_argument("--out", default=None, help="output directory (default: <base dir>/tokenizer)")
    args = parser.parse_args(argv)

    data = args.data or default_pretrain_paths()
    out_dir = args.out or os.path.join(get_base_dir(), "tokenizer")
    if args.max_chars <= 0 or args.doc_cap <= 0:
        parser.error("--max-chars and --doc-cap must be positive")
    try:
        expand_paths(data)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(
            1,
            f"tok_train: {e}\nPass --data with parquet shards, .jsonl[.gz] or .txt files, put shards in {data[0]}, "
            "or set NANOCHAT_DATA_DIR to a local data directory with a pretrain/ folder.\n",
        )
    print(f"tok_train: vocab {args.vocab_size:,}, max {args.max_chars:,} chars, doc cap {args.doc_cap:,}, data {data}")

    # ---------------------------------------------------------------- train
    stats = {"chars": 0, "documents": 0}

    def texts():
        for text in capped(iter_documents(data, "train"), args.max_chars, args.doc_cap):
            stats["chars"] += len(text)
            stats["documents"] += 1
            yield text

    start = time.time()
    try:
        tokenizer = Tokenizer.train_from_iterator(texts(), args.vocab_size, verbose=True)
    except (FileNotFoundError, ValueError) as e:  # unreadable data, bad vocab size
        parser.exit(1, f"tok_train: {e}\n")
    train_seconds = time.time() - start
    print(f"trained on {stats['documents']:,} documents, {stats['chars']:,} chars in {train_seconds:.1f}s")

    # ---------------------------------------------------------------- check and save
    encoded = tokenizer.encode(ROUND_TRIP_TEXT)
    if tokenizer.decode(encoded) != ROUND_TRIP_TEXT:
        raise SystemExit("tokenizer failed the encode/decode round trip; this is a bug, please report it")
    if any(tokenizer.encode_special(name) in encoded for name in SPECIAL_TOKENS):
        raise SystemExit("plain text produced a special token; this is a bug, please report it")
    path = tokenizer.save(out_dir)
    token_bytes = [n for n in tokenizer.token_bytes() if n > 0]
    result = {
        "vocab_size": tokenizer.get_vocab_size(),
        "train_chars": stats["chars"],
        "train_documents": stats["documents"],
        "train_seconds": round(train_seconds, 3),
        "doc_cap": args.doc_cap,
        "mean_token_bytes": round(sum(token_bytes) / len(token_bytes), 3),
        "max_token_bytes": max(token_bytes),
    }
    with open(os.path.join(out_dir, "train_stats.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_stage_summary("tok_train", result)  # compression is measured by scripts.tok_eval
    print(f"saved {path}: " + ", ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
