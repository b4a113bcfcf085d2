"""Pretraining text: reading it, and building shards from your own files (downloading: nanochat/download.py).

Shard format (the reference's, karpathy/nanochat `dev/repackage_data_reference.py`): parquet with one `text`
column, zstd level 3, row groups of 1,024 documents, a shard closed once it holds >= 250 M characters and a
whole number of row groups (so only the very last row group of a set is short); ~100 MB a shard.

Contract:
- `iter_documents(paths, split)` yields the documents of one split in a fixed order. A parquet shard's split
  is its name (`val*.parquet` is validation). In `.jsonl[.gz]` files (a "text" field a line) document i of
  each file is validation iff i % VAL_EVERY == VAL_EVERY - 1; a `.txt` file is one document, the .txt files
  numbered together (with --paragraphs, its blank-line separated paragraphs are its documents). Directories
  expand to their files, by name. Given no --data, stages read `default_pretrain_paths()`.
- Every problem the user can fix is a `DatasetError` (a ValueError) with a one-line message naming the file
  and the fix: `MissingDataError` (also a FileNotFoundError) when there is nothing to read, `ShardError` when
  a shard (or one of its row groups) cannot be read. Stages print it and exit 1.
- `build_shards(...)` writes your text as shards split by the same rule, in a temporary directory renamed to
  --out at the end (a failed build leaves nothing behind), with a progress line and ETA every few seconds.

    python -m nanochat.dataset build --input my_texts/ notes.jsonl.gz --out ~/.cache/nanochat/base_data
"""

import argparse
import functools
import gzip
import io
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_write, get_base_dir

VAL_EVERY = 100  # in line-oriented sources, document i is validation iff i % VAL_EVERY == VAL_EVERY - 1
SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
SOURCE_MARKER = "SOURCE"  # file in a shard directory naming what filled it: a source name, or "build"
HOW_TO_GET_DATA = (
    "get shards with `python -m nanochat.download -n 8`, or build them from your own text with "
    "`python -m nanochat.dataset build --input FILES --out DIR`"
)
REFETCH = "delete it and run `python -m nanochat.download` again (or rebuild with `python -m nanochat.dataset build`)"
PROGRESS_EVERY_S = 5.0  # long data stages print a progress line at most this often (issue 16: ETA in logs)


class DatasetError(ValueError):
    """Bad or missing data, with a one-line message meant for the user (print it, no traceback)."""


class MissingDataError(DatasetError, FileNotFoundError):
    """Nothing to read where data was expected."""


class ShardError(DatasetError):
    """A parquet file that cannot be read: the message names it (and the row group) and how to get it again."""


class Progress:
    """Lines `<label>: 42.0% <note>, 3.1 min elapsed, ETA 4.3 min`; `due()` once PROGRESS_EVERY_S have passed."""

    def __init__(self, label: str, out=None):
        self.label, self.out = label, out or sys.stdout
        self.started = self.printed = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.printed >= PROGRESS_EVERY_S

    def show(self, fraction: float, note: str = "") -> None:
        self.printed = time.monotonic()
        minutes, fraction = (self.printed - self.started) / 60, min(fraction, 1.0)
        eta = f"ETA {minutes * (1 - fraction) / fraction:.1f} min" if fraction > 0 else "ETA unknown"
        print(f"{self.label}: {fraction:.1%} {note}, {minutes:.1f} min elapsed, {eta}", file=self.out, flush=True)


class InputPosition:
    """How far a reader is through `files`, in bytes on disk: the files before `index`, plus the offset in the
    open text file (`handle`; a parquet input counts when it is done)."""

    def __init__(self, files: list[str]):
        self.sizes, self.index, self.handle = [os.path.getsize(f) for f in files], 0, None

    def fraction(self) -> float:
        offset = self.handle.tell() if self.handle is not None and not self.handle.closed else 0
        return (sum(self.sizes[: self.index]) + offset) / max(1, sum(self.sizes))


# ---------------------------------------------------------------------------- reading


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given, directories replaced by their supported files (sorted). Clear error if none."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(SUFFIXES))
            if not found:
                raise MissingDataError(f"no {'/'.join(SUFFIXES)} files in directory {path}; {HOW_TO_GET_DATA}")
            files.extend(found)
        elif os.path.isfile(path):
            if not path.endswith(SUFFIXES):
                raise DatasetError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise MissingDataError(f"{path} does not exist; {HOW_TO_GET_DATA}")
    return files


def default_pretrain_paths() -> list[str]:
    """<base dir>/base_data when it holds data, else $NANOCHAT_DATA_DIR/pretrain when that is set."""
    shards = os.path.join(get_base_dir(), "base_data")
    data_dir = os.environ.get("NANOCHAT_DATA_DIR")
    has_shards = os.path.isdir(shards) and any(name.endswith(SUFFIXES) for name in os.listdir(shards))
    if not has_shards and data_dir:
        return [os.path.join(data_dir, "pretrain")]
    return [shards]


def add_data_argument(parser: argparse.ArgumentParser, purpose: str) -> None:
    """The --data flag of the stages that read pretraining text, with its default stated once."""
    parser.add_argument("--data", nargs="+", default=None, help=f"{purpose}: parquet shards, .jsonl[.gz] or .txt "
                        "files, or directories of them (default: <base dir>/base_data, else "
                        "$NANOCHAT_DATA_DIR/pretrain)")  # fmt: skip


def is_val_shard(path: str) -> bool:
    return os.path.basename(path).startswith("val")


def is_val_document(index: int) -> bool:
    """The per-document split of line files (and of `build`): every VAL_EVERY-th document is held out."""
    return index % VAL_EVERY == VAL_EVERY - 1


def iter_documents(paths: list[str], split: str = "train", paragraphs: bool = False) -> Iterator[str]:
    """Documents of `split` ("train" or "val") from the given files and directories, in order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    files = expand_paths(paths)
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet and split == "val" and not any(is_val_shard(f) for f in parquet) and len(parquet) == len(files):
        raise MissingDataError(f"no validation shard (a file named val*.parquet) among {len(parquet)} parquet files")
    # Shards of the other split are dropped unread: every other file is split document by document.
    files = [f for f in files if not f.endswith(".parquet") or is_val_shard(f) == (split == "val")]
    yield from (doc for is_val, doc in split_documents(files, paragraphs) if is_val == (split == "val"))


def split_documents(files: list[str], paragraphs=False, shards_by_name=True, position: InputPosition | None = None):
    """(is validation, document) for every document of `files`, in order, by the module's rule (without
    `shards_by_name`, a parquet file's documents are numbered like a .jsonl file's). Updates `position`."""
    txt_files = 0
    for index, path in enumerate(files):
        if position is not None:
            position.index, position.handle = index, None
        if path.endswith(".parquet") and shards_by_name:
            yield from ((is_val_shard(path), doc) for doc in iter_parquet(path))
        elif path.endswith(".txt") and not paragraphs:
            yield is_val_document(txt_files), next(iter_file_documents(path, whole=True))
            txt_files += 1
        else:
            reader = iter_parquet(path) if path.endswith(".parquet") else iter_file_documents(path, False, position)
            yield from ((is_val_document(i), doc) for i, doc in enumerate(reader))


def take_chars(documents: Iterable[str], max_chars: int, doc_cap: int | None = None) -> Iterator[str]:
    """Documents each cut to `doc_cap` characters, until `max_chars` characters in all have been yielded."""
    total = 0
    for doc in documents:
        doc = doc[: min(doc_cap or max_chars, max_chars - total)]
        if doc:
            yield doc
            total += len(doc)
        if total >= max_chars:
            return


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # pyarrow's messages span lines


def open_shard(path: str) -> pq.ParquetFile:
    """A parquet file with a `text` column (reads only the footer), or a ShardError saying what is wrong."""
    try:
        parquet_file = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as e:  # truncated (no footer), not parquet, unreadable
        raise ShardError(f"{path} is not a readable parquet file ({one_line(e)}); {REFETCH}") from e
    if "text" not in parquet_file.schema_arrow.names:
        parquet_file.close()
        raise ShardError(f"{path} has no 'text' column (columns: {parquet_file.schema_arrow.names})")
    return parquet_file


def read_row_group(parquet_file: pq.ParquetFile, path: str, index: int) -> list[str]:
    """The documents of one row group; a corrupt page (the footer can be intact) is a ShardError naming it."""
    try:
        return parquet_file.read_row_group(index, columns=["text"]).column("text").to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:  # pyarrow says only "Corrupt ... data" or similar
        raise ShardError(
            f"{path}: row group {index} of {parquet_file.num_row_groups} is corrupt ({one_line(e)}); {REFETCH}"
        ) from e


def iter_parquet(path: str) -> Iterator[str]:
    """The `text` column of a parquet file, read one row group at a time."""
    with open_shard(path) as parquet_file:
        for i in range(parquet_file.num_row_groups):
            yield from read_row_group(parquet_file, path, i)


def iter_file_documents(path: str, whole: bool = False, position: InputPosition | None = None) -> Iterator[str]:
    """The "text" field of each line of a .jsonl[.gz] file, or a .txt file's paragraphs (or the whole file)."""
    gzipped = path.endswith(".gz")
    try:
        with open(path, "rb") as raw:
            if position is not None:
                position.handle = raw  # its offset is how far the (decompressed) text has been read
            f = io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if gzipped else raw, encoding="utf-8")
            if whole:
                yield f.read()
            else:
                yield from (_iter_paragraphs(f) if path.endswith(".txt") else _iter_json_lines(f, path))
    except (OSError, EOFError, UnicodeDecodeError) as e:  # permissions, a truncated or non-gzip .gz, not UTF-8
        raise DatasetError(f"{path} is not readable as {'gzip UTF-8' if gzipped else 'UTF-8'} text ({e})") from e


def _iter_paragraphs(lines) -> Iterator[str]:
    paragraph = []
    for line in itertools.chain(lines, ["\n"]):  # a final blank line closes the last paragraph
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\n")
            paragraph = []


def _iter_json_lines(lines, path: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise DatasetError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from e
        if not isinstance(text, str):
            raise DatasetError(f"{path}:{lineno}: 'text' must be a string, got {type(text).__name__}")
        yield text


# ---------------------------------------------------------------------------- building


class ShardWriter:
    """Collects documents and writes them as `<prefix>_00000.parquet`, `<prefix>_00001.parquet`, ... in out_dir."""

    def __init__(self, out_dir: str, prefix: str, shard_chars: int, row_group_docs: int, out):
        self.out_dir, self.prefix, self.shard_chars, self.row_group_docs = out_dir, prefix, shard_chars, row_group_docs
        self.out, self.docs, self.names = out, [], []
        self.chars = self.total_docs = self.total_chars = 0

    def add(self, doc: str) -> None:
        self.docs.append(doc)
        self.chars += len(doc)
        # The reference's rule: close on a row-group boundary, so every row group but the set's last is full.
        if self.chars >= self.shard_chars and len(self.docs) % self.row_group_docs == 0:
            self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        name = f"{self.prefix}_{len(self.names):05d}.parquet"
        table = pa.table({"text": pa.array(self.docs, type=pa.string())})
        # zstd 3, no dictionary or statistics: the reference's shards
        write = functools.partial(pq.write_table, table, row_group_size=self.row_group_docs, compression="zstd",
                                  compression_level=3, use_dictionary=False, write_statistics=False)  # fmt: skip
        atomic_write(os.path.join(self.out_dir, name), write, by_path=True)
        print(f"wrote {name}: {len(self.docs):,} documents, {self.chars:,} characters", file=self.out, flush=True)
        self.names.append(name)
        self.total_docs, self.total_chars = self.total_docs + len(self.docs), self.total_chars + self.chars
        self.docs, self.chars = [], 0


def build_shards(inputs: list[str], out_dir: str, shard_chars: int = 250_000_000, row_group_docs: int = 1024,
                 paragraphs: bool = False, out=None) -> dict:  # fmt: skip
    """Shards of your own text in `out_dir` (absent or empty): train `shard_NNNNN.parquet`, validation `val_...`,
    split as `iter_documents` splits the inputs (but a parquet input's name does not decide). Returns counts."""
    if shard_chars < 1 or row_group_docs < 1:
        raise DatasetError("--shard-chars and --row-group-docs must be positive")
    out = out or sys.stdout
    files = expand_paths(inputs)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        # A rebuild over old shards could leave some of them behind.
        held = sorted(os.listdir(out_dir))[0] if os.path.isdir(out_dir) else "a file"
        raise DatasetError(f"{out_dir} is not empty (it holds {held}); build into a new directory.")
    # Build beside out_dir and rename at the end, so a failed or interrupted build leaves nothing behind.
    temp_dir = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.{os.getpid()}.building")
    try:
        os.makedirs(temp_dir)
        train = ShardWriter(temp_dir, "shard", shard_chars, row_group_docs, out)
        val = ShardWriter(temp_dir, "val", shard_chars, row_group_docs, out)
        skipped_empty, position, progress = 0, InputPosition(files), Progress("build", out)
        for is_val, doc in split_documents(files, paragraphs, shards_by_name=False, position=position):
            if not doc.strip():  # an empty document would add only a BOS token to training
                skipped_empty += 1
                continue
            (val if is_val else train).add(doc)
            if progress.due():
                chars = train.total_chars + train.chars + val.total_chars + val.chars
                progress.show(position.fraction(), f"of the input read ({chars:,} characters kept)")
        train.flush()
        val.flush()
        if not train.names or not val.names:
            raise DatasetError(
                f"{' '.join(inputs)}: too few documents to build from ({train.total_docs} train, {val.total_docs} "
                f"validation): document i is held out when i % {VAL_EVERY} == {VAL_EVERY - 1}, so a file (or the "
                f".txt files together, one document each; --paragraphs splits them at blank lines) needs at least "
                f"{VAL_EVERY} non-empty documents."
            )
        atomic_write(os.path.join(temp_dir, SOURCE_MARKER), lambda f: f.write(b"build\n"))
        os.rename(temp_dir, out_dir)  # replaces an empty out_dir; refused (OSError) if one appeared meanwhile
    except OSError as e:
        raise DatasetError(f"cannot write {out_dir}: {e} (is the disk full, or the directory read-only?)") from e
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return {
        "train_paths": [os.path.join(out_dir, name) for name in train.names],
        "val_paths": [os.path.join(out_dir, name) for name in val.names],
        "train_docs": train.total_docs, "val_docs": val.total_docs,
        "chars": train.total_chars + val.total_chars, "skipped_empty": skipped_empty,
    }  # fmt: skip


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="make shards from your own .txt/.jsonl[.gz]/.parquet files")
    build.add_argument("--input", nargs="+", required=True, help="files or directories of them")
    build.add_argument("--out", default=None, help="an absent or empty directory (default: <base dir>/base_data)")
    build.add_argument("--shard-chars", type=int, default=250_000_000, help="characters a shard holds at least")
    build.add_argument("--row-group-docs", type=int, default=1024, help="documents a parquet row group holds")
    build.add_argument("--paragraphs", action="store_true", help="split .txt files at blank lines, a document a "
                       "paragraph (default: a .txt file is one document)")  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    if argv and (argv[0] == "download" or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))):
        parser.exit(2, "nanochat.dataset: downloading moved to `python -m nanochat.download -n 8`\n")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.join(get_base_dir(), "base_data")
    try:
        built = build_shards(args.input, out_dir, args.shard_chars, args.row_group_docs, args.paragraphs)
    except DatasetError as e:
        parser.exit(1, f"nanochat.dataset build: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\nnanochat.dataset build: interrupted\n")
    print(
        f"done: {built['train_docs'] + built['val_docs']:,} documents, {built['chars']:,} characters -> "
        f"{len(built['train_paths'])} train shards ({built['train_docs']:,} documents) and {len(built['val_paths'])} "
        f"val shards ({built['val_docs']:,} documents) in {out_dir}; {built['skipped_empty']:,} empty documents skipped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
