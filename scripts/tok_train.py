"""Train the BPE tokenizer on pretraining text and save it to <base dir>/tokenizer/tokenizer.json.

Reads the training split of --data (see nanochat/dataset.py), caps each document, stops after --max-chars
characters, trains with rustbpe (progress lines with an ETA while reading and merging) and checks that the
result round-trips text. Writes tokenizer.json, train_stats.json and the report card's
<base dir>/report/tok_train.json. Refuses, writing nothing, text too small to reach --vocab-size, and
replacing a tokenizer that checkpoints in <base dir>/*_checkpoints were trained with unless --force.

    python -m scripts.tok_train                                      # shards in <base dir>/base_data
    NANOCHAT_DATA_DIR=/path/to/data python -m scripts.tok_train      # offline: <data dir>/pretrain
    python -m scripts.tok_train --data my_texts.jsonl.gz --max-chars 20000000 --vocab-size 4096  # tiny, CPU

Does not download data (nanochat.download) or evaluate compression (scripts.tok_eval).
"""

import argparse
import glob
import json
import os
import time

from nanochat import dataset
from nanochat.common import atomic_write, get_base_dir
from nanochat.report import write_stage_summary
from nanochat.tokenizer import FILENAME, SPECIAL_TOKENS, Tokenizer

# Text that must survive encode -> decode unchanged: mixed scripts, emoji with joiners, odd whitespace,
# and special-token lookalikes, which must stay plain text.
ROUND_TRIP_TEXT = (
    "Hello, world! It's 2026; we've got 12345 tokens.\n\n\tIndented\r\nWindows line\u00a0nbsp "
    "日本語のテキスト, 한국어 문장, Ελληνικά, العربية, हिन्दी 🙂👨‍👩‍👧 e\u0301 <|bos|> <|assistant_end|>"
)


def checkpoints_trained_with(out_dir: str) -> list[str]:
    """Checkpoint directories (<base>/*_checkpoints/<tag>) beside the tokenizer in `out_dir`, if there is one."""
    if not os.path.exists(os.path.join(out_dir, FILENAME)):
        return []
    base_dir = os.path.dirname(os.path.abspath(out_dir))
    return sorted({os.path.dirname(p) for p in glob.glob(os.path.join(base_dir, "*_checkpoints", "*", "meta_*.json"))})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    dataset.add_data_argument(parser, "text to train on (its training split)")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000,
                        help="characters to train on at most (2B as the reference speedrun)")  # fmt: skip
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept from the start of each document")
    # Tokenizer
    # 32,768, not 65,536: 0.965 vs 0.969 validation bpb at d12 with half the embedding (karpathy/nanochat ccf4b7f)
    parser.add_argument("--vocab-size", type=int, default=32_768,
                        help="256 bytes + merges + 9 special tokens")  # fmt: skip
    parser.add_argument("--out", default=None, help="output directory (default: <base dir>/tokenizer)")
    parser.add_argument("--force", action="store_true", help="replace a tokenizer checkpoints were trained with")
    args = parser.parse_args(argv)

    data = args.data or dataset.default_pretrain_paths()
    out_dir = args.out or os.path.join(get_base_dir(), "tokenizer")
    if args.max_chars <= 0 or args.doc_cap <= 0:
        parser.error("--max-chars and --doc-cap must be positive")
    users = checkpoints_trained_with(out_dir)
    if users and not args.force:
        parser.exit(1, f"tok_train: the checkpoints in {', '.join(users)} were trained with "
                       f"{os.path.join(out_dir, FILENAME)}; a new tokenizer would make them unusable. Train into "
                       "another --out, or pass --force to replace it anyway.\n")  # fmt: skip
    try:
        dataset.expand_paths(data)
    except dataset.DatasetError as e:
        parser.exit(1, f"tok_train: {e}\nOr set NANOCHAT_DATA_DIR to a data directory with a pretrain/ folder.\n")
    print(f"tok_train: vocab {args.vocab_size:,}, max {args.max_chars:,} chars, doc cap {args.doc_cap:,}, data {data}")

    # ---------------------------------------------------------------- train
    stats = {"chars": 0, "documents": 0}
    progress = dataset.Progress("tok_train: reading")  # then rustbpe prints the merges' progress

    def texts():
        for text in dataset.take_chars(dataset.iter_documents(data, "train"), args.max_chars, args.doc_cap):
            stats["chars"] += len(text)
            stats["documents"] += 1
            if progress.due():
                progress.show(stats["chars"] / args.max_chars, f"of --max-chars ({stats['documents']:,} documents)")
            yield text

    start = time.time()
    try:
        tokenizer = Tokenizer.train_from_iterator(texts(), args.vocab_size, verbose=True)
    except ValueError as e:  # unreadable data (a DatasetError), bad vocab size
        parser.exit(1, f"tok_train: {e}\n")
    train_seconds = time.time() - start
    trained = f"{stats['documents']:,} documents, {stats['chars']:,} chars"
    print(f"trained on {trained} in {train_seconds:.1f}s")
    if tokenizer.get_vocab_size() < args.vocab_size:  # the text ran out of pairs to merge
        parser.exit(1, f"tok_train: {trained} from {' '.join(data)} reach a vocabulary of only "
                       f"{tokenizer.get_vocab_size():,}, not --vocab-size {args.vocab_size:,} (too few distinct "
                       "pairs to merge); give more text (--data, --max-chars) or a smaller --vocab-size. Nothing "
                       "was written.\n")  # fmt: skip

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
    atomic_write(os.path.join(out_dir, "train_stats.json"), lambda f: f.write(json.dumps(result, indent=2).encode()))
    write_stage_summary("tok_train", result)  # compression is measured by scripts.tok_eval
    print(f"saved {path}: " + ", ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
