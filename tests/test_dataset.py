"""nanochat.dataset reading: parquet shards, JSON lines, text files, splits and errors."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import VAL_EVERY, iter_documents


def write_parquet(path, texts, row_group_size=4):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size, compression="zstd")


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


def test_text_files_are_split_on_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert list(iter_documents([str(path)], "train")) == ["first doc\nline two", "second doc"]


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
