"""Pretraining text: reading it, downloading the published shards, and building shards from your own files.

Shard format (the reference's, karpathy/nanochat `dev/repackage_data_reference.py`): parquet with one `text`
column, zstd level 3, row groups of 1,024 documents, a shard closed once it holds >= 250 M characters and a
whole number of row groups (so only the very last row group of a set is short); ~100 MB a shard.

Contract:
- `iter_documents(paths, split)` yields documents (str) of one split in a deterministic order. A parquet file
  is a whole shard whose split is its name: `val*.parquet` is validation, any other parquet file training
  (the validation shard is fixed by name, never "the last file on disk"). `.jsonl` / `.jsonl.gz` files (a JSON
  object with a "text" field a line) and `.txt` files (documents separated by blank lines) are split by
  document: document i of each file is validation iff i % VAL_EVERY == VAL_EVERY - 1. Directories expand to
  their supported files, sorted by name. `default_pretrain_paths()` is where stages look given no --data:
  <base dir>/base_data, or else, offline, the `pretrain/` folder of $NANOCHAT_DATA_DIR.
- `download_shards(...)` fetches the first n training shards of a published set plus its validation shard
  (the set's last shard, saved as `val_NNNNN.parquet`; train shards keep their `shard_NNNNN.parquet` names).
  Every file lands atomically, is checked (Content-Length, readable parquet footer with a `text` column) and
  retried with exponential backoff; valid shards already present are skipped, corrupt ones fetched again. A
  `SOURCE` file in the directory names the set that filled it, and sets are never mixed.
- `build_shards(...)` turns your own text into shards of the same format, split by the same per-document
  rule as `iter_documents`, so training on the built directory sees the documents training on the inputs would.

    python -m nanochat.dataset download -n 8                      # FineWeb-Edu: 8 train shards + the val shard
    python -m nanochat.dataset download -n 170 --source climbmix  # ClimbMix (the reference's data since 2026)
    NANOCHAT_DATA_URL=http://mirror.local/fineweb python -m nanochat.dataset download -n 8  # a local mirror
    python -m nanochat.dataset build --input my_texts/ notes.jsonl.gz --out ~/.cache/nanochat/base_data

Not here: tokenization and batching (the dataloader), checksums (the shard sets publish none we rely on; size
and parquet footer are what is checked), and resuming a half-downloaded file (a failed file starts over).
"""

import argparse
import functools
import gzip
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TextIO

import pyarrow as pa
import pyarrow.parquet as pq

VAL_EVERY = 100  # in line-oriented sources, document i is validation iff i % VAL_EVERY == VAL_EVERY - 1
SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
SOURCE_MARKER = "SOURCE"  # file in a shard directory naming what filled it: a source name, or "build"
HOW_TO_GET_DATA = (
    "get shards with `python -m nanochat.dataset download -n 8`, or build them from your own text with "
    "`python -m nanochat.dataset build --input FILES --out DIR`"
)


class DatasetError(RuntimeError):
    """A failure whose message is meant for the user; the CLI prints it without a traceback."""


# Published shard sets, shard_00000.parquet ... on the Hugging Face hub: (dataset, number of shards). A set's
# last shard is its validation shard.
SOURCES = {
    # FineWeb-Edu sample-100BT shuffled with seed 42: the reference's data until 2026 (~180 GB in all).
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1823),
    # Nemotron-ClimbMix decoded back to text and shuffled: the reference's data at HEAD.
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6543),
}


# ---------------------------------------------------------------------------- reading


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given, directories replaced by their supported files (sorted). Clear error if none."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(SUFFIXES))
            if not found:
                raise FileNotFoundError(f"no {'/'.join(SUFFIXES)} files in directory {path}; {HOW_TO_GET_DATA}")
            files.extend(found)
        elif os.path.isfile(path):
            if not path.endswith(SUFFIXES):
                raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist; {HOW_TO_GET_DATA}")
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


def is_val_document(index: int) -> bool:
    """The per-document split of line files (and of `build`): every VAL_EVERY-th document is held out."""
    return index % VAL_EVERY == VAL_EVERY - 1


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
            if is_val_document(i) == (split == "val"):
                yield doc


def iter_parquet(path: str) -> Iterator[str]:
    """The `text` column of a parquet file, read one row group at a time."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ValueError(
            f"{path} is not a readable parquet file ({e}); delete it and download or build it again"
        ) from e
    with pf:
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


def iter_line_documents(path: str) -> Iterator[str]:
    """Documents of a .jsonl/.jsonl.gz file (the "text" field of each line) or a .txt file (blank-line separated)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from (_iter_paragraphs(f) if path.endswith(".txt") else _iter_json_lines(f, path))
    except (OSError, EOFError, UnicodeDecodeError) as e:  # permissions, a truncated or non-gzip .gz, not UTF-8
        raise ValueError(f"{path} is not readable as {'gzip ' if opener is gzip.open else ''}UTF-8 text ({e})") from e


def _iter_paragraphs(lines) -> Iterator[str]:
    paragraph = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\n")


def _iter_json_lines(lines, path: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from e
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: 'text' must be a string, got {type(text).__name__}")
        yield text


def check_shard(path: str) -> str | None:
    """None when `path` is a readable parquet file with a `text` column, else what is wrong with it.

    Reads only the footer (a few KB), so checking hundreds of 100 MB shards before a download takes a moment;
    a truncated file has no footer, which is what an interrupted transfer leaves.
    """
    try:
        with pq.ParquetFile(path) as pf:
            names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for corrupt files
        return f"not a readable parquet file ({e})"
    return None if "text" in names else f"no 'text' column (columns: {names})"


def claim_directory(out_dir: str, owner: str) -> None:
    """Mark `out_dir` as filled by `owner` (a source name or "build"); refuse if something else filled it.

    Shard i of one set is not shard i of another and each set has its own validation shard, so a directory
    holding two sets would train on a mix and validate on one of them without saying so.
    """
    from nanochat.common import atomic_write

    marker = os.path.join(out_dir, SOURCE_MARKER)
    found = None
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            found = f.read().strip()
    data_files = sorted(name for name in os.listdir(out_dir) if name.endswith(SUFFIXES))
    if owner == "build" and (found or data_files):  # a rebuild over old shards could leave some of them behind
        held = f"shards made by {found!r}" if found else data_files[0]
        raise DatasetError(f"{out_dir} is not empty (it holds {held}); build into a new directory.")
    if found and found != owner:
        raise DatasetError(
            f"{out_dir} already holds shards made by {found!r} (see {marker}); shard sets cannot be mixed in "
            "one directory. Use another --out, or delete that directory first."
        )
    if not found and data_files:
        raise DatasetError(
            f"{out_dir} already holds {len(data_files)} data files of unknown origin (e.g. {data_files[0]}) and "
            f"no {SOURCE_MARKER} file; use another --out, or, if they are {owner!r} shards, write '{owner}' "
            f"into {marker}."
        )
    if not found:
        atomic_write(marker, lambda f: f.write(f"{owner}\n".encode()))


# ---------------------------------------------------------------------------- downloading


def val_shard_index(source: str) -> int:
    return SOURCES[source][1] - 1


def shard_name(source: str, index: int) -> str:
    """The local name of shard `index`: the set's last shard is saved as val_NNNNN.parquet (fixed by name)."""
    return f"{'val' if index == val_shard_index(source) else 'shard'}_{index:05d}.parquet"


def resolve_base_url(source: str, base_url: str | None = None) -> str:
    """Where shard_NNNNN.parquet files are served: --base-url, else $NANOCHAT_DATA_URL, else the hub."""
    hub = f"https://huggingface.co/datasets/{SOURCES[source][0]}/resolve/main"
    return (base_url or os.environ.get("NANOCHAT_DATA_URL") or hub).rstrip("/")


OFFLINE_HINT = (
    "Offline? Serve the shards from a local mirror and pass --base-url URL (or set NANOCHAT_DATA_URL); "
    "or build shards from your own text with `python -m nanochat.dataset build --input FILES --out DIR`; "
    "or, for the tiny offline run, set NANOCHAT_DATA_DIR to a directory laid out like shared/data "
    "(its pretrain/ folder is read when base_data holds no shards)."
)


def describe_network_error(error: BaseException) -> str:
    """The innermost cause of a requests error without urllib3's wrappers, e.g. "[Errno 111] Connection refused"."""
    while True:
        inner = getattr(error, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in reversed(error.args) if isinstance(arg, BaseException)), None)
        if inner is None:
            break
        error = inner
    # urllib3 prefixes its messages with the connection: "HTTPConnection(host=..., port=...): " or "<...>: ".
    return re.sub(r"^(<[^>]*>|\w+\(.*?\)): ", "", str(error)) or type(error).__name__


class _Stopped(Exception):
    """Another shard failed for good (or the user pressed Ctrl-C): this one gives up quietly."""


class _BadTransfer(Exception):
    """A complete HTTP response whose body is not the shard: short, or not a readable parquet file."""


class Progress:
    """Shards done, bytes received, rate: one line redrawn with \\r on a terminal, else one line a shard."""

    def __init__(self, total_shards: int, out: TextIO):
        self.total_shards, self.out, self.tty = total_shards, out, out.isatty()
        self.done = self.bytes = 0
        self.start = self.last_draw = time.monotonic()
        self.lock = threading.Lock()

    def _line(self) -> str:
        rate = self.bytes / max(time.monotonic() - self.start, 1e-9) / 1e6
        return f"{self.done}/{self.total_shards} shards, {self.bytes / 1e6:,.1f} MB, {rate:,.1f} MB/s"

    def _redraw(self, end: str = "") -> None:
        # \r returns to the start of the line; the padding erases the tail of a longer previous line.
        print(f"\r{self._line():<60}", end=end, file=self.out, flush=True)

    def add_bytes(self, count: int) -> None:
        with self.lock:
            self.bytes += count
            if self.tty and time.monotonic() - self.last_draw > 0.5:  # twice a second, not for every 1 MiB chunk
                self.last_draw = time.monotonic()
                self._redraw()

    def shard_done(self, name: str) -> None:
        with self.lock:
            self.done += 1
            if self.tty:
                self._redraw(end="\n" if self.done == self.total_shards else "")
            else:
                print(f"{self._line()} ({name})", file=self.out, flush=True)

    def note(self, message: str) -> None:
        with self.lock:
            print(("\n" if self.tty else "") + message, file=self.out, flush=True)


def fetch_shard(
    url: str,
    path: str,
    *,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Download `url` to `path` atomically, retrying transient failures; returns the file's size in bytes.

    Retried: connection failures, interrupted transfers, HTTP 408/429/5xx, and bodies that are short or not a
    parquet file with a `text` column; waits backoff_s * 2^k between attempts (1, 2, 4, 8 s by default, the
    reference's schedule halved). Not retried: HTTP 404 and other 4xx, and failures to write the file.
    """
    import requests

    from nanochat.common import atomic_write

    stop = stop or threading.Event()
    name = os.path.basename(path)
    problem, unreachable = "no attempt made", False
    for attempt in range(attempts):
        if attempt:
            delay = backoff_s * 2 ** (attempt - 1)
            if progress:
                progress.note(f"{name}: {problem}; retrying in {delay:g} s (attempt {attempt + 1}/{attempts})")
            if stop.wait(delay):
                raise _Stopped()
        try:
            response = requests.get(url, stream=True, timeout=timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            problem, unreachable = f"cannot connect: {describe_network_error(e)}", True
            continue
        unreachable = False
        with response:
            status = response.status_code
            if status == 404:
                raise DatasetError(f"{name}: not found (HTTP 404) at {url}; check --source, -n and --base-url")
            if status != 200:
                problem = f"HTTP {status} {response.reason}"
                if status in (408, 429) or status >= 500:
                    continue
                raise DatasetError(f"{name}: {problem} from {url}")  # 401/403/...: asking again will not help
            try:
                # temp file + fsync + rename: a shard under its final name is always complete
                atomic_write(path, functools.partial(_save_body, response, progress=progress, stop=stop), by_path=True)
            except _BadTransfer as e:
                problem = str(e)
                continue
            except requests.RequestException as e:  # before OSError: requests' errors subclass it
                problem = f"transfer interrupted: {describe_network_error(e)}"
                continue
            except OSError as e:
                raise DatasetError(f"cannot write {path}: {e} (is the disk full, or the directory read-only?)") from e
            return os.path.getsize(path)
    if unreachable:
        raise DatasetError(f"network unreachable: cannot download {url} ({problem}).\n{OFFLINE_HINT}")
    raise DatasetError(f"{name}: giving up after {attempts} attempts ({problem}) from {url}")


def _save_body(response, temp_path: str, *, progress: Progress | None, stop: threading.Event) -> None:
    """Stream an HTTP body to `temp_path` in 1 MiB chunks, then check it is the whole shard."""
    # Content-Length is the body's size only without a Content-Encoding (requests decodes gzip bodies).
    length = None if response.headers.get("Content-Encoding") else response.headers.get("Content-Length")
    received = 0
    with open(temp_path, "wb") as f:
        for chunk in response.iter_content(chunk_size=1 << 20):
            if stop.is_set():
                raise _Stopped()
            f.write(chunk)
            received += len(chunk)
            if progress:
                progress.add_bytes(len(chunk))
    if length is not None and received != int(length):
        raise _BadTransfer(f"received {received:,} of {int(length):,} bytes")
    bad = check_shard(temp_path)
    if bad:
        raise _BadTransfer(f"downloaded file is {bad}")


@dataclass
class DownloadSummary:
    out_dir: str
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_fetched: int = 0


def download_shards(
    num_train: int,
    source: str = "fineweb-edu",
    out_dir: str | None = None,
    workers: int = 4,
    base_url: str | None = None,
    *,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    out: TextIO | None = None,
) -> DownloadSummary:
    """The first `num_train` training shards of `source` (-1 = all) plus its validation shard, into `out_dir`."""
    from nanochat.common import get_base_dir

    if source not in SOURCES:
        raise DatasetError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    val_index = val_shard_index(source)
    num_train = val_index if num_train < 0 else num_train
    if num_train > val_index:
        raise DatasetError(f"{source} has {val_index} training shards; -n {num_train} asks for more")
    if workers < 1 or attempts < 1:
        raise DatasetError("--workers and --attempts must be at least 1")
    out = out or sys.stdout
    out_dir = out_dir or os.path.join(get_base_dir(), "base_data")
    base_url = resolve_base_url(source, base_url)
    try:
        os.makedirs(out_dir, exist_ok=True)
        claim_directory(out_dir, source)
    except OSError as e:
        raise DatasetError(f"cannot write to {out_dir}: {e}") from e

    summary = DownloadSummary(out_dir)
    todo = []
    for index in [val_index, *range(num_train)]:  # validation first: every run needs it
        name = shard_name(source, index)
        path = os.path.join(out_dir, name)
        bad = check_shard(path) if os.path.exists(path) else "missing"
        if bad is None:
            summary.skipped.append(name)
            continue
        if bad != "missing":
            print(f"{name} is {bad}; fetching it again", file=out)
            os.remove(path)
        todo.append((f"{base_url}/shard_{index:05d}.parquet", path))
    print(
        f"{source}: {len(summary.skipped)} shards present, fetching {len(todo)} from {base_url} into {out_dir}",
        file=out,
    )

    progress = Progress(len(todo), out)
    stop = threading.Event()  # tells the other downloads to give up: one failed for good, or Ctrl-C
    options = dict(attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s, progress=progress, stop=stop)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fetch_shard, url, path, **options): path for url, path in todo}
        try:
            for future in as_completed(futures):
                summary.bytes_fetched += future.result()  # the first failure ends the download
                summary.fetched.append(os.path.basename(futures[future]))
                progress.shard_done(summary.fetched[-1])
        finally:  # the running downloads stop at their next chunk and delete their temp files
            stop.set()
            for future in futures:
                future.cancel()
    return summary


# ---------------------------------------------------------------------------- building


class ShardWriter:
    """Collects documents and writes them as `<prefix>_00000.parquet`, `<prefix>_00001.parquet`, ... in out_dir."""

    def __init__(self, out_dir: str, prefix: str, shard_chars: int, row_group_docs: int, on_write: Callable):
        self.out_dir, self.prefix = out_dir, prefix
        self.shard_chars, self.row_group_docs, self.on_write = shard_chars, row_group_docs, on_write
        self.docs: list[str] = []
        self.chars = 0
        self.paths: list[str] = []
        self.total_docs = self.total_chars = 0

    def add(self, doc: str) -> None:
        self.docs.append(doc)
        self.chars += len(doc)
        # The reference's rule: close on a row-group boundary, so every row group but the set's last is full.
        if self.chars >= self.shard_chars and len(self.docs) % self.row_group_docs == 0:
            self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        from nanochat.common import atomic_write

        path = os.path.join(self.out_dir, f"{self.prefix}_{len(self.paths):05d}.parquet")
        table = pa.table({"text": pa.array(self.docs, type=pa.string())})

        def write(temp_path: str) -> None:
            # zstd 3 without dictionary or statistics, as the reference's shards: text rarely repeats exactly.
            pq.write_table(
                table,
                temp_path,
                row_group_size=self.row_group_docs,
                compression="zstd",
                compression_level=3,
                use_dictionary=False,
                write_statistics=False,
            )

        try:
            atomic_write(path, write, by_path=True)
        except OSError as e:
            raise DatasetError(f"cannot write {path}: {e} (is the disk full, or the directory read-only?)") from e
        self.paths.append(path)
        self.total_docs += len(self.docs)
        self.total_chars += self.chars
        self.on_write(path, len(self.docs), self.chars)
        self.docs, self.chars = [], 0


@dataclass
class BuildSummary:
    train: ShardWriter
    val: ShardWriter
    skipped_empty: int


def build_shards(
    inputs: list[str],
    out_dir: str,
    shard_chars: int = 250_000_000,
    row_group_docs: int = 1024,
    out: TextIO | None = None,
) -> BuildSummary:
    """Shards of your own text in `out_dir`: train `shard_NNNNN.parquet`, validation `val_NNNNN.parquet`.

    Document i of each input file goes to validation iff is_val_document(i), counted before empty documents
    are dropped, so the split is the one `iter_documents` makes of .jsonl/.txt inputs. Parquet inputs are
    read as plain lists of documents: their names do not decide their split here.
    """
    if shard_chars < 1 or row_group_docs < 1:
        raise DatasetError("--shard-chars and --row-group-docs must be positive")
    out = out or sys.stdout
    files = expand_paths(inputs)
    try:
        os.makedirs(out_dir, exist_ok=True)
        claim_directory(out_dir, "build")
    except OSError as e:
        raise DatasetError(f"cannot write to {out_dir}: {e}") from e

    def report(path: str, docs: int, chars: int) -> None:
        print(f"wrote {path}: {docs:,} documents, {chars:,} characters", file=out, flush=True)

    train = ShardWriter(out_dir, "shard", shard_chars, row_group_docs, report)
    val = ShardWriter(out_dir, "val", shard_chars, row_group_docs, report)
    skipped_empty = 0
    for path in files:
        documents = iter_parquet(path) if path.endswith(".parquet") else iter_line_documents(path)
        for i, doc in enumerate(documents):
            if not doc.strip():  # an empty document would add only a BOS token to training
                skipped_empty += 1
                continue
            (val if is_val_document(i) else train).add(doc)
    train.flush()
    val.flush()
    if not train.paths or not val.paths:
        raise DatasetError(
            f"{', '.join(files)}: too few documents to build from ({train.total_docs} train, {val.total_docs} "
            f"validation): document i of each file is held out when i % {VAL_EVERY} == {VAL_EVERY - 1}, so a file "
            f"needs at least {VAL_EVERY} non-empty documents."
        )
    return BuildSummary(train, val, skipped_empty)


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.dataset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="fetch published shards (first n train shards + val)")
    download.add_argument("-n", "--num-files", type=int, default=-1, help="training shards to fetch (-1 = all)")
    download.add_argument("--source", choices=list(SOURCES), default="fineweb-edu", help="which shard set")
    download.add_argument("--out", default=None, help="directory (default: <base dir>/base_data)")
    download.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    download.add_argument(
        "--base-url",
        default=None,
        help="URL of a folder serving shard_NNNNN.parquet, e.g. a mirror "
        "(default: $NANOCHAT_DATA_URL, else the Hugging Face hub)",
    )
    download.add_argument("--attempts", type=int, default=5, help="tries per shard before giving up")
    build = commands.add_parser("build", help="make shards from your own .txt/.jsonl[.gz]/.parquet files")
    build.add_argument("--input", nargs="+", required=True, help="files or directories of them")
    build.add_argument("--out", default=None, help="an empty directory (default: <base dir>/base_data)")
    build.add_argument("--shard-chars", type=int, default=250_000_000, help="characters a shard holds at least")
    build.add_argument("--row-group-docs", type=int, default=1024, help="documents a parquet row group holds")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["download", *argv]  # the reference's launch line: python -m nanochat.dataset -n 8
    args = parser.parse_args(argv)

    try:
        from nanochat.common import get_base_dir

        out_dir = args.out or os.path.join(get_base_dir(), "base_data")
        if args.command == "download":
            result = download_shards(
                args.num_files, args.source, out_dir, args.workers, args.base_url, attempts=args.attempts
            )
            print(
                f"done: {len(result.fetched)} shards fetched ({result.bytes_fetched / 1e6:,.1f} MB), "
                f"{len(result.skipped)} already present, in {result.out_dir}"
            )
        else:
            built = build_shards(args.input, out_dir, args.shard_chars, args.row_group_docs)
            train, val = built.train, built.val
            print(
                f"done: {train.total_docs + val.total_docs:,} documents, {train.total_chars + val.total_chars:,} "
                f"characters -> {len(train.paths)} train shards ({train.total_docs:,} documents) and "
                f"{len(val.paths)} val shards ({val.total_docs:,} documents) in {out_dir}; "
                f"{built.skipped_empty:,} empty documents skipped"
            )
    except (DatasetError, OSError, ValueError) as e:  # OSError covers requests' errors; ValueError pyarrow's
        print(f"\nnanochat.dataset {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nnanochat.dataset {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
