"""nanochat.dataset reading: parquet shards, JSON lines, text files, splits and errors."""

import gzip
import io
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from nanochat import dataset
from nanochat.dataset import VAL_EVERY, DatasetError, ShardError, build_shards, iter_documents


def write_parquet(path, texts, row_group_size=4):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size, compression="zstd")


def corrupt_row_group(path, index: int) -> None:
    """Overwrite the page header of row group `index` with garbage; the footer stays intact."""
    offset = pq.ParquetFile(path).metadata.row_group(index).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = bytes(b ^ 0xFF for b in data[offset : offset + 8])
    path.write_bytes(bytes(data))


def test_parquet_split_is_chosen_by_file_name(tmp_path):
    write_parquet(tmp_path / "shard_00000.parquet", [f"train {i}" for i in range(10)])
    write_parquet(tmp_path / "shard_00001.parquet", [f"more {i}" for i in range(3)])
    write_parquet(tmp_path / "val_00000.parquet", ["held out"])
    train = list(iter_documents([str(tmp_path)], "train"))
    assert train == [f"train {i}" for i in range(10)] + [f"more {i}" for i in range(3)]
    assert list(iter_documents([str(tmp_path)], "val")) == ["held out"]


def test_parquet_without_a_val_shard_is_an_error_for_val(tmp_path):
    write_parquet(tmp_path / "shard_00000.parquet", ["a"])
    with pytest.raises(FileNotFoundError, match="no validation shard"):
        list(iter_documents([str(tmp_path)], "val"))


def test_jsonl_gz_split_every_hundredth_document(tmp_path, wiki_path):
    docs_train = list(iter_documents([wiki_path], "train"))
    docs_val = list(iter_documents([wiki_path], "val"))
    assert len(docs_train) + len(docs_val) == 28_560
    assert len(docs_val) == 28_560 // VAL_EVERY
    with gzip.open(wiki_path, "rt") as f:
        hundredth = [json.loads(line)["text"] for i, line in enumerate(f) if i == VAL_EVERY - 1][0]
    assert docs_val[0] == hundredth


def test_a_text_file_is_one_document_unless_split_into_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond paragraph\n")
    (tmp_path / "b.txt").write_text("another file")
    assert list(iter_documents([str(tmp_path)])) == ["first doc\nline two\n\n\nsecond paragraph\n", "another file"]
    paragraphs = list(iter_documents([str(tmp_path)], paragraphs=True))
    assert paragraphs == ["first doc\nline two", "second paragraph", "another file"]


def test_a_corrupt_page_names_the_shard_the_row_group_and_the_fix(tmp_path):
    shard = tmp_path / "shard_00000.parquet"
    write_parquet(shard, [f"document {i}" for i in range(16)])
    corrupt_row_group(shard, 2)
    documents = iter_documents([str(tmp_path)], "train")
    assert [next(documents) for _ in range(8)] == [f"document {i}" for i in range(8)]  # row groups 0 and 1 read
    expected = rf"^{shard}: row group 2 of 4 is corrupt \(.*\); delete it and run `python -m nanochat.download`"
    with pytest.raises(ShardError, match=expected):
        next(documents)


def test_bad_inputs_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents([str(tmp_path / "nope.jsonl")]))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(iter_documents([str(tmp_path / "data.csv")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        list(iter_documents([str(bad)]))
    corrupt = tmp_path / "shard_00000.parquet"
    corrupt.write_bytes(b"PAR1 truncated")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        list(iter_documents([str(corrupt)]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        list(iter_documents([str(empty)]))
    with pytest.raises(ValueError, match="split must be"):
        list(iter_documents([str(bad)], "test"))


# ---------------------------------------------------------------------------- building shards


def test_build_shards_from_the_wikipedia_sample(tmp_path, wiki_path, wiki_docs, monkeypatch):
    out_dir, log = tmp_path / "built", io.StringIO()
    monkeypatch.setattr(dataset, "PROGRESS_EVERY_S", 0.0)  # a progress line per document
    summary = build_shards([wiki_path], str(out_dir), shard_chars=5_000_000, row_group_docs=64, out=log)
    # Progress lines with an ETA, their share of the input growing within the one (gzipped) file.
    lines = re.findall(r"^build: ([\d.]+)% of the input read .* ETA [\d.]+ min$", log.getvalue(), re.M)
    shares = [float(share) for share in lines]
    assert len(shares) > 1000 and shares == sorted(shares) and shares[0] < 10 and shares[-1] > 90, shares[::1000]
    train_paths, val_paths = summary["train_paths"], summary["val_paths"]
    assert len(train_paths) > 5 and len(val_paths) == 1  # 56 M characters; validation holds 1% of them
    assert sorted(os.listdir(out_dir)) == sorted(["SOURCE"] + [os.path.basename(p) for p in train_paths + val_paths])
    assert os.path.basename(val_paths[0]) == "val_00000.parquet"

    shards = {path: pq.read_table(path)["text"].to_pylist() for path in train_paths + val_paths}
    train = [doc for path in train_paths for doc in shards[path]]
    val = shards[val_paths[0]]
    # Every document exactly once, in order, and validation is exactly documents 99, 199, 299, ...
    assert train == [doc for i, doc in enumerate(wiki_docs) if i % VAL_EVERY != VAL_EVERY - 1]
    assert val == wiki_docs[VAL_EVERY - 1 :: VAL_EVERY]
    assert summary["train_docs"] + summary["val_docs"] == len(wiki_docs) == 28_560

    for path in train_paths + val_paths:
        meta = pq.ParquetFile(path).metadata
        assert meta.schema.names == ["text"]
        assert {meta.row_group(i).column(0).compression for i in range(meta.num_row_groups)} == {"ZSTD"}
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        last_of_set = path in (train_paths[-1], val_paths[-1])
        assert all(size == 64 for size in (sizes[:-1] if last_of_set else sizes)), (path, sizes)
    for path in train_paths[:-1]:  # closed once they held 5 M characters, at a row-group boundary
        assert sum(map(len, shards[path])) >= 5_000_000
        assert sum(map(len, shards[path][:-64])) < 5_000_000

    # Training on the built directory sees what training on the original file sees.
    assert list(iter_documents([str(out_dir)], "train")) == list(iter_documents([wiki_path], "train"))
    assert list(iter_documents([str(out_dir)], "val")) == list(iter_documents([wiki_path], "val"))


def test_build_skips_empty_documents_and_keeps_the_split_of_each_file(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": "" if i == 5 else f"note {i}"}) + "\n" for i in range(250)))
    essays = tmp_path / "essays.txt"
    essays.write_text("\n\n".join(f"essay {i}\nsecond line" for i in range(120)))
    out_dir = tmp_path / "built"
    summary = build_shards([str(tmp_path)], str(out_dir), shard_chars=1_000, row_group_docs=8, paragraphs=True)
    assert summary["skipped_empty"] == 1
    inputs = [str(essays), str(notes)]  # the order the directory expands to
    assert list(iter_documents([str(out_dir)], "val")) == list(iter_documents(inputs, "val", paragraphs=True))
    train = [d for d in iter_documents(inputs, "train", paragraphs=True) if d]
    assert list(iter_documents([str(out_dir)], "train")) == train
    with pytest.raises(DatasetError, match="is not empty .*build into a new directory"):  # a second build there
        build_shards([str(notes)], str(out_dir))


def test_build_makes_one_document_of_each_text_file_by_default(tmp_path):
    """11 books once became 8,729 documents: a .txt file is one document unless --paragraphs says otherwise."""
    books = tmp_path / "books"
    books.mkdir()
    texts = [f"Book {i}.\n\nChapter one.\n\nChapter two, the end.\n" for i in range(120)]
    for i, text in enumerate(texts):
        (books / f"book_{i:03d}.txt").write_text(text)
    summary = build_shards([str(books)], str(tmp_path / "built"), row_group_docs=8)
    assert (summary["train_docs"], summary["val_docs"]) == (119, 1)
    val = list(iter_documents([str(tmp_path / "built")], "val"))
    assert val == [texts[99]] == list(iter_documents([str(books)], "val"))
    assert len(list(iter_documents([str(books)], "train", paragraphs=True))) == 360
    with pytest.raises(DatasetError, match="--paragraphs splits them"):  # 11 books: no validation document
        build_shards([str(books / f"book_{i:03d}.txt") for i in range(11)], str(tmp_path / "few"))
    result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "build", "--help"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    assert "--paragraphs" in result.stdout and "a .txt file is one document" in " ".join(result.stdout.split())


def test_build_errors_name_the_problem(tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    with pytest.raises(DatasetError, match="at least 100 non-empty documents"):
        build_shards([str(few)], str(tmp_path / "a"))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"text": "fine"}\n' * 10)[:-12])  # truncated gzip stream
    with pytest.raises(ValueError, match=f"{broken} is not readable as gzip UTF-8 text"):
        build_shards([str(broken)], str(tmp_path / "b"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nanochat.download"):
        list(iter_documents([str(tmp_path / "empty")]))  # an empty shard directory says how to fill it


def test_a_failed_build_leaves_nothing_behind_and_can_be_run_again(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    lines = [json.dumps({"text": f"document {i} " * 50}) for i in range(300)]
    (inputs / "docs.jsonl").write_text("\n".join(lines[:250] + ["{not json"] + lines[250:]))
    out_dir = tmp_path / "built"
    with pytest.raises(DatasetError, match="docs.jsonl:251: expected a JSON object"):  # after shards were written
        build_shards([str(inputs)], str(out_dir), shard_chars=2_000, row_group_docs=4)
    assert sorted(os.listdir(tmp_path)) == ["inputs"]  # neither a partial --out nor a temporary directory
    (inputs / "docs.jsonl").write_text("\n".join(lines))
    summary = build_shards([str(inputs)], str(out_dir), shard_chars=2_000, row_group_docs=4)
    assert summary["train_docs"] + summary["val_docs"] == 300 and len(summary["train_paths"]) > 1
