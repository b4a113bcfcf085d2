"""The pretraining dataloader: parquet shards -> tokens -> BOS-aligned, best-fit packed (B, T) batches.

Contract:
- `PretrainLoader(...)` is an infinite iterator over epochs. `next(loader)` returns `(inputs, targets)`, each
  (batch_size, seq_len) int64 on `device`: views of one (B, T+1) tensor, so targets[b, t] == inputs[b, t + 1]
  (not contiguous: flatten with `.reshape`, not `.view`).
- Every row is T+1 tokens, starts with <|bos|> at the start of a document, and is full (no padding). Rows are
  filled best-fit from a buffer of `buffer_docs` tokenized documents: repeatedly the largest that fits the
  space left; when none fits, the shortest is cropped to fill the row and its remainder discarded. Documents
  longer than a row are cropped to one row on entry; one that waited MAX_WAIT_ROW_GROUPS row groups opens
  the next row. `tokens_cropped` / `cropped_fraction` count what was discarded.
- Data: the parquet shards of `split` among `paths` (`val*.parquet` is validation; see nanochat.dataset),
  ordered by file name, read one row group at a time. A shard that cannot be read raises
  nanochat.dataset.ShardError naming it and the row group; missing data a MissingDataError.
- Sharding: in epoch e the row groups of all shards are shuffled by a permutation drawn from (seed, e), and
  rank r reads positions r, r + W, r + 2W, ... of it (W = world size): disjoint row groups that together
  cover the data once per epoch, in a new order each epoch. Every rank must get the same seed. Batches are a
  pure function of the shards, tokenizer, seq_len, buffer_docs, seed, rank and world size (not of timing,
  threads or batch_size, which only cuts the stream of rows into batches).
- Resume: `state_dict()` is small JSON-able data (the cursor, the ids of the buffered documents, counters).
  `PretrainLoader(..., state=saved)` re-reads the buffered documents and yields exactly the rows that would
  have followed. It refuses a loader with another split, seq_len, buffer_docs, seed, rank, world size or set
  of shards (file names and row-group sizes).
- On CUDA a batch is built in pinned memory and copied with one non-blocking copy. Reading and tokenizing
  run `prefetch_row_groups` row groups ahead on a background thread (0 = in the caller's thread).

Does not: read JSON lines or text files (build shards from them with `python -m nanochat.dataset build`);
mask attention at document boundaries (nanochat measured it on top of BOS-aligned best-fit rows at 0.0002
bpb and dropped it); pack chat data (SFT pads rows instead of cropping).
"""

import bisect
import hashlib
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from nanochat.dataset import (
    HOW_TO_GET_DATA,
    DatasetError,
    MissingDataError,
    expand_paths,
    is_val_shard,
    open_shard,
    read_row_group,
)

STATE_FORMAT = 1
# A document that arrived more than this many row groups before the one being read opens the next row: without
# it, documents of awkward lengths wait hundreds of row groups, clogging the buffer and the resume state. Over 3
# epochs of the Wikipedia sample (vocab 32,768) best-fit crops 11.0% with it vs 11.3% without at seq_len 2048,
# 40.2% vs 41.2% at 512, and a state names at most ~7 row groups to re-read on resume (vs 63).
MAX_WAIT_ROW_GROUPS = 4


def find_shards(paths: list[str], split: str) -> list[str]:
    """The parquet shards of `split` among `paths`, ordered by file name. Clear error if there are none."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = [f for f in expand_paths(paths) if f.endswith(".parquet") and is_val_shard(f) == (split == "val")]
    if not shards:
        naming = "named val*.parquet" if split == "val" else "*.parquet not named val*"
        raise MissingDataError(
            f"no {split} parquet shards ({naming}) in {', '.join(paths)}; the pretraining loader reads only "
            f"parquet shards: {HOW_TO_GET_DATA}"
        )
    return sorted(shards, key=lambda path: (os.path.basename(path), path))


def list_row_groups(shards: list[str]) -> list[tuple[str, int, int]]:
    """(shard, row group index, rows) of every non-empty row group, shard by shard. Reads only the footers."""
    row_groups = []
    for shard in shards:
        with open_shard(shard) as parquet_file:
            sizes = [parquet_file.metadata.row_group(i).num_rows for i in range(parquet_file.num_row_groups)]
        # An empty row group would be an epoch position with nothing in it.
        row_groups.extend((shard, index, rows) for index, rows in enumerate(sizes) if rows)
    return row_groups


class RowGroupReader:
    """One rank's row groups in epoch order, read and tokenized into documents cropped to one row. Stateless
    apart from its configuration, so it can run on a worker thread without locks."""

    def __init__(self, row_groups, tokenizer, rank, world_size, seed, row_len, tokenizer_threads, tokenizer_batch):
        self.row_groups, self.tokenizer, self.bos = row_groups, tokenizer, tokenizer.get_bos_token_id()
        self.rank, self.world_size, self.seed, self.row_len = rank, world_size, seed, row_len
        self.tokenizer_threads, self.tokenizer_batch = tokenizer_threads, tokenizer_batch
        self.positions_per_epoch = len(range(rank, len(row_groups), world_size))  # only their order changes

    def after(self, epoch: int, position: int) -> tuple[int, int]:  # the (epoch, position) read next
        return (epoch, position + 1) if position + 1 < self.positions_per_epoch else (epoch + 1, 0)

    def order(self, epoch: int) -> np.ndarray:
        """Global indices of the row groups this rank reads in `epoch`, in reading order."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.row_groups))
        return permutation[self.rank :: self.world_size]

    def load(self, epoch: int, position: int, first_doc: int = 0, doc_indices=None) -> list[tuple[np.ndarray, int]]:
        """(tokens cropped to one row, full token count) of the documents of one row group from `first_doc` on,
        or only those in `doc_indices` (to rebuild a saved buffer)."""
        shard, index, _ = self.row_groups[self.order(epoch)[position]]
        with open_shard(shard) as parquet_file:
            texts = read_row_group(parquet_file, shard, index)  # a corrupt page: ShardError naming both
        texts = [texts[i] for i in doc_indices] if doc_indices is not None else texts[first_doc:]
        documents = []
        for start in range(0, len(texts), self.tokenizer_batch):
            batch = texts[start : start + self.tokenizer_batch]
            for ids in self.tokenizer.encode(batch, prepend=self.bos, num_threads=self.tokenizer_threads):
                # int32 arrays: a ninth of the memory of a list of Python ints, and copied into rows by memcpy.
                documents.append((np.array(ids[: self.row_len], dtype=np.int32), len(ids)))
        return documents


class PretrainLoader:
    """Infinite iterator of (inputs, targets) batches of BOS-aligned, best-fit packed rows; see the module doc."""

    def __init__(self, tokenizer, paths: list[str], split: str, batch_size: int, seq_len: int, device="cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 0, state: dict | None = None,
                 buffer_docs: int = 1000, tokenizer_threads: int = 4, tokenizer_batch_size: int = 128,
                 prefetch_row_groups: int = 2):  # fmt: skip
        for name, value in [("batch_size", batch_size), ("seq_len", seq_len), ("buffer_docs", buffer_docs),
                            ("world_size", world_size), ("tokenizer_threads", tokenizer_threads),
                            ("tokenizer_batch_size", tokenizer_batch_size)]:  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if prefetch_row_groups < 0:
            raise ValueError(f"prefetch_row_groups must be >= 0 (0 = no background thread), got {prefetch_row_groups}")
        if isinstance(paths, str):
            paths = [paths]
        row_groups = list_row_groups(find_shards(paths, split))
        if len(row_groups) < world_size:
            raise DatasetError(
                f"{len(row_groups)} non-empty row groups in the {split} shards cannot be shared by {world_size} "
                f"ranks (each rank needs at least one); add shards or use fewer ranks"
            )
        self.batch_size, self.seq_len, self.buffer_docs = batch_size, seq_len, buffer_docs
        self.device = torch.device(device)
        self.row_len = seq_len + 1  # inputs are the first T tokens of a row, targets the last T
        self._reader = RowGroupReader(
            row_groups, tokenizer, rank, world_size, seed, self.row_len, tokenizer_threads, tokenizer_batch_size
        )
        # Everything a saved state must agree with to continue this stream exactly.
        fingerprint = hashlib.sha256(json.dumps([(os.path.basename(s), i, n) for s, i, n in row_groups]).encode())
        self._identity = {
            "format": STATE_FORMAT, "split": split, "seq_len": seq_len, "buffer_docs": buffer_docs, "seed": seed,
            "rank": rank, "world_size": world_size, "shards": fingerprint.hexdigest()[:16],
        }  # fmt: skip

        # The buffer, sorted by token count. A new document goes before documents of equal length
        # (bisect_left), so its arrangement depends only on which documents it holds and the order they
        # arrived in (stream order): that is what lets a resumed loader rebuild it exactly.
        self._lengths: list[int] = []
        self._entries: list[tuple[np.ndarray, int, tuple[int, int, int]]] = []  # (tokens, full count, id)
        # The same documents by arrival: {stream row group: {doc index: token count}}, oldest first.
        self._arrivals: dict[int, dict[int, int]] = {}
        # Cursor: the next document to enter the buffer, as (epoch, position in the epoch, index in row group).
        self._epoch, self._position, self._doc = 0, 0, 0
        self._row_group: list | None = None  # documents of the row group at the cursor, once loaded
        self._row_group_first_doc = 0  # index of self._row_group[0] in its row group
        self.rows_emitted = self.tokens_cropped = 0
        if state is not None:
            self._restore(state)

        self._prefetch = prefetch_row_groups
        self._executor = ThreadPoolExecutor(1, "nanochat-dataloader") if prefetch_row_groups else None
        self._in_flight: deque[tuple[tuple[int, int, int], Future]] = deque()
        self._next_to_submit = (self._epoch, self._position, self._doc)

    # ------------------------------------------------------------------ stats

    @property
    def epoch(self) -> int:  # of the next document to be read
        return self._epoch

    @property
    def tokens_packed(self) -> int:
        return self.rows_emitted * self.row_len

    @property
    def cropped_fraction(self) -> float:
        """Of the tokens of documents that left the buffer, the share discarded by cropping."""
        consumed = self.tokens_packed + self.tokens_cropped
        return self.tokens_cropped / consumed if consumed else 0.0

    def row_groups(self, epoch: int) -> list[tuple[str, int]]:
        """(shard path, row group index) of the row groups this rank reads in `epoch`, in reading order."""
        return [self._reader.row_groups[g][:2] for g in self._reader.order(epoch)]

    # ------------------------------------------------------------------ batches

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        on_cuda = self.device.type == "cuda"
        # A fresh pinned tensor per batch, not one reused: PyTorch's caching host allocator hands a pinned
        # block out again only after the non-blocking copy that reads it has finished, so a batch cannot be
        # overwritten while it is still in flight (reusing one buffer by hand would race).
        rows = torch.empty((self.batch_size, self.row_len), dtype=torch.int64, pin_memory=on_cuda)  # (B, T+1)
        for row in rows.numpy():
            self._fill_row(row)
        if self.device.type != "cpu":
            rows = rows.to(self.device, non_blocking=on_cuda)
        return rows[:, :-1], rows[:, 1:]

    def _fill_row(self, row: np.ndarray) -> None:
        self._top_up()
        overdue = self._overdue_document()
        filled = 0 if overdue is None else self._place(row, 0, overdue)  # any document fits an empty row
        while filled < self.row_len:
            self._top_up()
            space = self.row_len - filled
            fits = bisect.bisect_right(self._lengths, space) - 1  # the largest buffered document that fits
            if fits >= 0:
                filled = self._place(row, filled, fits)
            else:
                # Nothing fits: every buffered document is longer than the space left, so cropping the
                # shortest discards the fewest tokens (this is the reference's choice too).
                tokens, full_count, _ = self._take(0)
                row[filled:] = tokens[:space]
                filled = self.row_len
                self.tokens_cropped += full_count - space
        self.rows_emitted += 1

    def _place(self, row: np.ndarray, filled: int, index: int) -> int:
        """Put the whole buffered document at `index` into the row from `filled`; returns the new fill."""
        tokens, full_count, _ = self._take(index)
        row[filled : filled + len(tokens)] = tokens
        self.tokens_cropped += full_count - len(tokens)  # nonzero only for documents longer than a row
        return filled + len(tokens)

    def _overdue_document(self) -> int | None:
        """Buffer index of the oldest document if it arrived more than MAX_WAIT_ROW_GROUPS row groups ago."""
        oldest_row_group = next(iter(self._arrivals))
        if self._stream_row_group(self._epoch, self._position) - oldest_row_group <= MAX_WAIT_ROW_GROUPS:
            return None
        doc, length = next(iter(self._arrivals[oldest_row_group].items()))
        doc_id = (*divmod(oldest_row_group, self._reader.positions_per_epoch), doc)
        first, end = bisect.bisect_left(self._lengths, length), bisect.bisect_right(self._lengths, length)
        return next(index for index in range(first, end) if self._entries[index][2] == doc_id)

    def _stream_row_group(self, epoch: int, position: int) -> int:
        """Row groups this rank read before (epoch, position), counted from the start of epoch 0."""
        return epoch * self._reader.positions_per_epoch + position

    def _take(self, index: int):
        del self._lengths[index]
        entry = self._entries.pop(index)
        epoch, position, doc = entry[2]
        row_group = self._stream_row_group(epoch, position)
        del self._arrivals[row_group][doc]
        if not self._arrivals[row_group]:
            del self._arrivals[row_group]
        return entry

    def _insert(self, tokens: np.ndarray, full_count: int, doc_id: tuple[int, int, int]) -> None:
        index = bisect.bisect_left(self._lengths, len(tokens))
        self._lengths.insert(index, len(tokens))
        self._entries.insert(index, (tokens, full_count, doc_id))
        # Documents arrive in stream order, so both levels of this dict stay ordered oldest first.
        self._arrivals.setdefault(self._stream_row_group(*doc_id[:2]), {})[doc_id[2]] = len(tokens)

    def _top_up(self) -> None:
        """Fill the buffer to buffer_docs documents from the stream (which never ends)."""
        while len(self._lengths) < self.buffer_docs:
            if self._row_group is None:
                self._row_group = self._fetch(self._epoch, self._position, self._doc)
                self._row_group_first_doc = self._doc
            tokens, full_count = self._row_group[self._doc - self._row_group_first_doc]
            self._insert(tokens, full_count, (self._epoch, self._position, self._doc))
            self._doc += 1
            if self._doc - self._row_group_first_doc == len(self._row_group):
                # Row group done: move the cursor on now, so a saved state never points past the end of one.
                self._row_group, self._doc = None, 0
                self._epoch, self._position = self._reader.after(self._epoch, self._position)

    # ------------------------------------------------------------------ reading ahead

    def _fetch(self, epoch: int, position: int, first_doc: int) -> list[tuple[np.ndarray, int]]:
        """The documents of one row group, from the background thread when there is one."""
        if self._executor is None:
            return self._reader.load(epoch, position, first_doc)
        # Keep `prefetch_row_groups` row groups in flight, in stream order: the thread only reads ahead, it
        # never decides what comes next, so batches do not depend on its timing.
        while len(self._in_flight) < self._prefetch:
            key = self._next_to_submit
            self._in_flight.append((key, self._executor.submit(self._reader.load, *key)))
            self._next_to_submit = (*self._reader.after(*key[:2]), 0)
        key, future = self._in_flight.popleft()
        assert key == (epoch, position, first_doc), f"read ahead {key}, needed {(epoch, position, first_doc)}"
        return future.result()  # re-raises what the thread raised

    def close(self) -> None:
        """Stop the background thread. The loader still works, reading in the caller's thread from then on."""
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            self._in_flight.clear()

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """JSON-able state; a loader built with `state=` it yields exactly the batches that would have followed."""
        by_row_group: dict[tuple[int, int], list[int]] = {}
        for _, _, (epoch, position, doc) in self._entries:
            by_row_group.setdefault((epoch, position), []).append(doc)
        buffer = [[epoch, position, sorted(docs)] for (epoch, position), docs in sorted(by_row_group.items())]
        return {**self._identity, "epoch": self._epoch, "position": self._position,
                "doc": self._doc, "buffer": buffer, "rows_emitted": self.rows_emitted,
                "tokens_cropped": self.tokens_cropped}  # fmt: skip

    def _restore(self, state: dict) -> None:
        for key, value in self._identity.items():
            if state.get(key) != value:
                what = "the same shards" if key == "shards" else f"the same {key}"
                raise ValueError(
                    f"the loader state was saved with {key}={state.get(key)!r}, this loader has {key}={value!r}: "
                    f"continuing the saved stream exactly needs {what} (start without the state to begin afresh)"
                )
        self._epoch, self._position, self._doc = state["epoch"], state["position"], state["doc"]
        self.rows_emitted, self.tokens_cropped = state["rows_emitted"], state["tokens_cropped"]
        # Documents arrived in stream order, which is the order of (epoch, position, doc): inserting them in
        # that order rebuilds the buffer as it was, ties included.
        for epoch, position, docs in state["buffer"]:
            documents = self._reader.load(epoch, position, doc_indices=docs)
            for doc, (tokens, full_count) in zip(docs, documents, strict=True):
                self._insert(tokens, full_count, (epoch, position, doc))
