"""Downloading the published pretraining shard sets (reading and building shards: nanochat/dataset.py).

Contract: `download_shards(...)` fetches the first n training shards of a set plus its validation shard (the
set's last shard, saved as `val_NNNNN.parquet`; train shards keep their `shard_NNNNN.parquet` names). Every
file lands atomically, is checked (Content-Length, then every page read back, so a corrupt page is caught
here rather than hours into training) and retried with exponential backoff; shards already present are
skipped when their footer reads, fetched again when not; a line a shard shows the ETA. A `SOURCE` file in the
directory names the set that filled it, and sets are never mixed.

    python -m nanochat.download -n 8                          # ClimbMix: 8 train shards + the val shard
    python -m nanochat.download -n 8 --source fineweb-edu     # FineWeb-Edu (the reference's data until 2026)
    NANOCHAT_DATA_URL=http://mirror.local/fineweb python -m nanochat.download -n 8  # a local mirror

Not here: checksums (the shard sets publish none we rely on), and resuming a half-downloaded file (a failed
file starts over).
"""

import argparse
import functools
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from nanochat import dataset
from nanochat.common import atomic_write, get_base_dir
from nanochat.dataset import REFETCH, SOURCE_MARKER, SUFFIXES, DatasetError, ShardError

# Published shard sets (shard_00000.parquet ...) on the Hugging Face hub: (dataset, number of shards).
SOURCES = {
    # FineWeb-Edu sample-100BT shuffled with seed 42: the reference's data until 2026 (~180 GB in all).
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1823),
    # Nemotron-ClimbMix decoded back to text and shuffled: the reference's data at HEAD.
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6543),
}
# ClimbMix took the reference's time to GPT-2 capability from 2h46m to 2h01m at equal code (karpathy/nanochat
# dev/LEADERBOARD.md, 2026-03-04); FineWeb, DCLM and Olmo-3 mixes all lost to it there.
DEFAULT_SOURCE = "climbmix"
OFFLINE_HINT = (
    "Offline? Serve the shards from a local mirror and pass --base-url URL (or set NANOCHAT_DATA_URL); "
    "or build shards from your own text with `python -m nanochat.dataset build --input FILES --out DIR`; "
    "or, for the tiny offline run, set NANOCHAT_DATA_DIR to a directory whose pretrain/ folder holds "
    ".jsonl.gz/.txt/.parquet files (read when base_data holds no shards)."
)


def resolve_base_url(source: str, base_url: str | None = None) -> str:
    """Where shard_NNNNN.parquet files are served: `base_url`, else $NANOCHAT_DATA_URL, else the hub."""
    hub = f"https://huggingface.co/datasets/{SOURCES[source][0]}/resolve/main"
    return (base_url or os.environ.get("NANOCHAT_DATA_URL") or hub).rstrip("/")


def check_shard(path: str, every_page: bool = False) -> str | None:
    """None when `path` is a readable shard, else what is wrong with it. The footer alone takes a moment
    (an interrupted transfer leaves none); `every_page` also decompresses every data page (~1 s a shard)."""
    try:
        with dataset.open_shard(path) as parquet_file:
            for index in range(parquet_file.num_row_groups if every_page else 0):
                dataset.read_row_group(parquet_file, path, index)
    except ShardError as e:
        return str(e).removesuffix(f"; {REFETCH}")
    return None


def claim_directory(out_dir: str, owner: str) -> None:
    """Mark `out_dir` as filled by source `owner`; refuse if something else filled it (two sets in one directory
    would train on a mix and validate on one of them without saying so)."""
    marker = os.path.join(out_dir, SOURCE_MARKER)
    found = Path(marker).read_text(encoding="utf-8").strip() if os.path.exists(marker) else None
    data_files = sorted(name for name in os.listdir(out_dir) if name.endswith(SUFFIXES))
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


def describe_network_error(error: BaseException) -> str:
    """The innermost cause of a requests error without urllib3's wrappers, e.g. "[Errno 111] Connection refused"."""
    while True:
        reason = getattr(error, "reason", None)
        causes = [reason, *reversed(error.args)]  # urllib3 keeps the cause in .reason or among the args
        inner = next((cause for cause in causes if isinstance(cause, BaseException)), None)
        if inner is None:
            break
        error = inner
    # urllib3 prefixes its messages with the connection: "HTTPConnection(host=..., port=...): " or "<...>: ".
    return re.sub(r"^(<[^>]*>|\w+\(.*?\)): ", "", str(error)) or type(error).__name__


class _Stopped(Exception):
    """Another shard failed for good (or the user pressed Ctrl-C): this one gives up quietly."""


class _BadTransfer(Exception):
    """A complete HTTP response whose body is not the shard: short, or not a readable parquet file."""


def fetch_shard(url: str, path: str, *, attempts=5, backoff_s=1.0, timeout_s=30.0, out=None, stop=None) -> int:
    """Download `url` to `path` atomically, retrying transient failures; returns the file's size in bytes.
    Retried: connection failures, interrupted transfers, HTTP 408/429/5xx, and bodies that are short or not a
    readable shard; waits backoff_s * 2^k between attempts (1, 2, 4, 8 s by default, the reference's schedule
    halved). Not retried: HTTP 404 and other 4xx, and failures to write the file."""
    import requests

    stop = stop or threading.Event()
    name = os.path.basename(path)
    problem, unreachable = "no attempt made", False
    for attempt in range(attempts):
        if attempt:
            delay = backoff_s * 2 ** (attempt - 1)
            if out:
                print(f"{name}: {problem}; retrying in {delay:g} s (attempt {attempt + 1}/{attempts})", file=out)
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
                atomic_write(path, functools.partial(_save_body, response, stop=stop), by_path=True)
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


def _save_body(response, temp_path: str, *, stop: threading.Event) -> None:
    """Stream an HTTP body to `temp_path` in 1 MiB chunks, then check it is the whole shard."""
    # Content-Length is the body's size only without a Content-Encoding (requests decodes gzip bodies).
    length = None if response.headers.get("Content-Encoding") else response.headers.get("Content-Length")
    with open(temp_path, "wb") as f:
        for chunk in response.iter_content(chunk_size=1 << 20):
            if stop.is_set():
                raise _Stopped()
            f.write(chunk)
        received = f.tell()
    if length is not None and received != int(length):
        raise _BadTransfer(f"received {received:,} of {int(length):,} bytes")
    if bad := check_shard(temp_path, every_page=True):
        raise _BadTransfer(f"downloaded body is not a valid shard ({bad})")


@dataclass
class DownloadSummary:
    out_dir: str
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_fetched: int = 0


def download_shards(num_train: int, source: str = DEFAULT_SOURCE, out_dir: str | None = None, workers: int = 4,
                   base_url: str | None = None, *, attempts: int = 5, backoff_s: float = 1.0, timeout_s: float = 30.0,
                   out: TextIO | None = None) -> DownloadSummary:  # fmt: skip
    """The first `num_train` training shards of `source` (-1 = all) plus its validation shard, into `out_dir`,
    from `base_url`, else $NANOCHAT_DATA_URL, else the Hugging Face hub."""
    if source not in SOURCES:
        raise DatasetError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    val_index = SOURCES[source][1] - 1
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
        name = f"{'val' if index == val_index else 'shard'}_{index:05d}.parquet"  # the val shard is fixed by name
        path = os.path.join(out_dir, name)
        bad = check_shard(path) if os.path.exists(path) else "missing"
        if bad is None:
            summary.skipped.append(name)
            continue
        if bad != "missing":
            print(f"{bad}; fetching it again", file=out)
            os.remove(path)
        todo.append((f"{base_url}/shard_{index:05d}.parquet", path))
    print(f"{source}: {len(summary.skipped)} shards present, fetching {len(todo)} from {base_url} into {out_dir}",
          file=out)  # fmt: skip

    stop = threading.Event()  # tells the other downloads to give up: one failed for good, or Ctrl-C
    options = dict(attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s, out=out, stop=stop)
    progress = dataset.Progress("download", out)  # a line a shard, with the ETA
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fetch_shard, url, path, **options): path for url, path in todo}
        try:
            for future in as_completed(futures):
                summary.bytes_fetched += future.result()  # the first failure ends the download
                summary.fetched.append(os.path.basename(futures[future]))
                megabytes, done = summary.bytes_fetched / 1e6, len(summary.fetched)
                rate = megabytes / (time.monotonic() - progress.started)
                progress.show(done / len(todo), f"({done}/{len(todo)} shards, {megabytes:,.1f} MB, {rate:,.1f} "
                              f"MB/s, {summary.fetched[-1]})")  # fmt: skip
        finally:  # the running downloads stop at their next chunk and delete their temp files
            stop.set()
            for future in futures:
                future.cancel()
    return summary


def check_source(base_url: str | None = None, source: str = DEFAULT_SOURCE, timeout_s: float = 5.0) -> str:
    """Where pretraining text will come from: $NANOCHAT_DATA_DIR/pretrain, else the shard server if it answers
    at all (any HTTP status). A DatasetError saying what to do when neither is usable."""
    data_dir = os.environ.get("NANOCHAT_DATA_DIR")
    if data_dir:
        dataset.expand_paths([os.path.join(data_dir, "pretrain")])  # MissingDataError naming what is absent
        return f"offline: {os.path.join(data_dir, 'pretrain')}"
    import requests

    url = resolve_base_url(source, base_url)
    try:
        requests.head(url, timeout=timeout_s, allow_redirects=False)
    except requests.RequestException as e:
        raise DatasetError(
            f"cannot reach {url} ({describe_network_error(e)}) and NANOCHAT_DATA_DIR is not set, so there is no "
            f"pretraining text. {OFFLINE_HINT}"
        ) from None
    return f"online: {url}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanochat.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="training shards to fetch (-1 = all)")
    parser.add_argument("--source", choices=list(SOURCES), default=DEFAULT_SOURCE, help="which shard set")
    parser.add_argument("--out", default=None, help="directory (default: <base dir>/base_data)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base-url", default=None, help="URL of a folder serving shard_NNNNN.parquet, e.g. a "
                        "mirror (default: $NANOCHAT_DATA_URL, else the Hugging Face hub)")  # fmt: skip
    parser.add_argument("--attempts", type=int, default=5, help="tries per shard before giving up")
    parser.add_argument("--check", action="store_true", help="fetch nothing: exit 1, saying what to do, when "
                        "neither $NANOCHAT_DATA_DIR/pretrain nor the shard server is usable")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.check:
            print(f"nanochat.download: pretraining text: {check_source(args.base_url, args.source)}")
            return 0
        result = download_shards(args.num_files, args.source, args.out, args.workers, args.base_url,
                                 attempts=args.attempts)  # fmt: skip
    except (DatasetError, OSError) as e:  # OSError: requests' errors
        parser.exit(1, f"\nnanochat.download: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\nnanochat.download: interrupted\n")
    print(f"done: {len(result.fetched)} shards fetched ({result.bytes_fetched / 1e6:,.1f} MB), "
          f"{len(result.skipped)} already present, in {result.out_dir}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
