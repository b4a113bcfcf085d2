"""Reading pretraining text: parquet shards with a `text` column, JSON lines and plain text files.

Contract: `iter_documents(paths, split)` yields documents (str) in a deterministic order, one split of them:
- a parquet file is a whole shard; its split is its name: files named `val*.parquet` hold the validation
  split, every other parquet file the training split (the validation shard is fixed by name, never "the
  last file on disk");
- `.jsonl` / `.jsonl.gz` files (one JSON object with a "text" field a line) and `.txt` files (documents
  separated by blank lines) are split by document: every `VAL_EVERY`-th document is validation.
Directories expand to the supported files they contain, sorted by name. `default_pretrain_paths()` is where
stages look when given no --data: the shards in <base dir>/base_data, or else, offline, the `pretrain/`
folder of $NANOCHAT_DATA_DIR (a local directory laid out like shared/data).

Not here (yet): downloading shards and building them from your own files.
"""

import gzip
import json
import os
from collections.abc import Iterator

import pyarrow.parquet as pq

VAL_EVERY = 100  # in line-oriented sources, document i is validation iff i % VAL_EVERY == VAL_EVERY - 1
SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given, directories replaced by their supported files (sorted). Clear error if none."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(SUFFIXES))
            if not found:
                raise FileNotFoundError(f"no {'/'.join(SUFFIXES)} files in directory {path}")
            files.extend(found)
        elif os.path.isfile(path):
            if not path.endswith(SUFFIXES):
                raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


def default_pretrain_paths() -> list[str]:
    """<base dir>/base_data when it holds data, else $NANOCHAT_DATA_DIR/pretrain when that is set."""
    from nanochat.common import get_base_dir

    shards = os.path.join(get_base_dir(), "base_data")
    data_dir = os.environ.get("NANOCHAT_DATA_DIR")
    has_shards = os.path.isdir(shards) and any(name.endswith(SUFFIXES) for name in os.listdir(shards))
    if not has_shards and data_dir:
        return [os.path.join(data_dir, "pretrain")]
    return [shards]


def is_val_shard(path: str) -> bool:
    return os.path.basename(path).startswith("val")


def iter_documents(paths: list[str], split: str = "train") -> Iterator[str]:
    """Documents of `split` ("train" or "val") from the given files and directories, in order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = expand_paths(paths)
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet and split == "val" and not any(is_val_shard(f) for f in parquet) and len(parquet) == len(files):
        raise FileNotFoundError(f"no validation shard (a file named val*.parquet) among {len(parquet)} parquet files")
    for path in files:
        if path.endswith(".parquet"):
            if is_val_shard(path) == (split == "val"):
                yield from iter_parquet(path)
            continue
        for i, doc in enumerate(iter_line_documents(path)):
            if (i % VAL_EVERY == VAL_EVERY - 1) == (split == "val"):
                yield doc


def iter_parquet(path: str) -> Iterator[str]:
    """The `text` column of a parquet file, read one row group at a time."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ValueError(
            f"{path} is not a readable parquet file ({e}); delete it and download or build it again"
        ) from e
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
    for i in range(pf.num_row_groups):
        yield from pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


def iter_line_documents(path: str) -> Iterator[str]:
    """Documents of a .jsonl/.jsonl.gz file (the "text" field of each line) or a .txt file (blank-line separated)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith(".txt"):
            paragraph = []
            for line in f:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "".join(paragraph).rstrip("\n")
                    paragraph = []
            if paragraph:
                yield "".join(paragraph).rstrip("\n")
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from e
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: 'text' must be a string, got {type(text).__name__}")
            yield text
