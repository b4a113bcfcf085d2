"""scripts.tok_train and scripts.tok_eval run for real on a slice of the Wikipedia sample."""

import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from nanochat.tokenizer import Tokenizer, get_tokenizer


def run_script(module, *args, base_dir, returncode=0):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == returncode, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


def test_tok_train_then_tok_eval_on_jsonl(tmp_path, wiki_path):
    out = run_script(
        "scripts.tok_train",
        "--data",
        wiki_path,
        "--max-chars",
        "3000000",
        "--doc-cap",
        "5000",
        "--vocab-size",
        "2048",
        base_dir=tmp_path,
    )
    assert "saved" in out
    stats = json.loads((tmp_path / "tokenizer" / "train_stats.json").read_text())
    assert stats["vocab_size"] == 2048 and stats["train_chars"] == 3_000_000
    tokenizer = get_tokenizer(str(tmp_path))
    assert tokenizer.get_vocab_size() == 2048

    out = run_script("scripts.tok_eval", "--data", wiki_path, base_dir=tmp_path)
    results = json.loads((tmp_path / "tokenizer" / "eval.json").read_text())["results"]
    assert set(results) == {"prose", "code", "math", "korean", "chinese", "spanish", "heldout"}
    # English prose compresses far better than Korean with a tokenizer trained on English Wikipedia.
    assert results["prose"]["ours"]["bytes_per_token"] > 3 * results["korean"]["ours"]["bytes_per_token"]
    assert results["heldout"]["bytes"] > 100_000


def test_tok_train_reads_parquet_shards_and_caps_documents(tmp_path, wiki_docs):
    data = tmp_path / "base_data"
    data.mkdir()
    pq.write_table(pa.table({"text": wiki_docs[:300]}), data / "shard_00000.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": wiki_docs[300:330]}), data / "val_00000.parquet")
    run_script("scripts.tok_train", "--doc-cap", "1000", "--vocab-size", "1000", base_dir=tmp_path)
    stats = json.loads((tmp_path / "tokenizer" / "train_stats.json").read_text())
    assert stats["train_documents"] == 300
    assert stats["train_chars"] == sum(min(len(doc), 1000) for doc in wiki_docs[:300])


def test_tok_train_finds_offline_data_through_nanochat_data_dir(tmp_path, wiki_path, monkeypatch):
    data_dir = os.path.dirname(os.path.dirname(wiki_path))  # the folder laid out like shared/data
    monkeypatch.setenv("NANOCHAT_DATA_DIR", data_dir)
    out = run_script("scripts.tok_train", "--max-chars", "200000", "--vocab-size", "512", base_dir=tmp_path)
    assert os.path.join(data_dir, "pretrain") in out
    assert json.loads((tmp_path / "tokenizer" / "train_stats.json").read_text())["train_chars"] == 200_000


def test_tok_train_never_replaces_the_tokenizer_with_a_worse_one_or_under_checkpoints(tmp_path, wiki_path, wiki_docs):
    """Too little text for the vocabulary is refused, and so is replacing the tokenizer of trained checkpoints
    (their token ids would mean other text) unless --force; in both refusals tokenizer.json is untouched."""
    saved = Tokenizer.train_from_iterator(wiki_docs[:200], 600).save(str(tmp_path / "tokenizer"))
    original = open(saved, "rb").read()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\t\n\n")
    out = run_script("scripts.tok_train", "--data", str(tmp_path / "empty.txt"), str(tmp_path / "blank.txt"),
                     "--vocab-size", "600", base_dir=tmp_path, returncode=1)  # fmt: skip
    # blank.txt is one document of whitespace: a few merges, far from 600
    assert re.search(r"1 documents, 6 chars from .* reach a vocabulary of only 2\d\d, not --vocab-size 600", out)
    assert open(saved, "rb").read() == original

    checkpoint = tmp_path / "base_checkpoints" / "d4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta_000100.json").write_text("{}")
    args = ["--data", wiki_path, "--max-chars", "200000", "--vocab-size", "512"]
    out = run_script("scripts.tok_train", *args, base_dir=tmp_path, returncode=1)
    assert f"the checkpoints in {checkpoint} were trained with" in out and "--force" in out
    assert open(saved, "rb").read() == original
    run_script("scripts.tok_train", *args, "--force", base_dir=tmp_path)
    assert get_tokenizer(str(tmp_path)).get_vocab_size() == 512


def test_tok_train_without_data_says_where_it_looked(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    env.pop("NANOCHAT_DATA_DIR", None)
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tok_train"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "base_data does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_tok_eval_compares_with_reference_encodings(tmp_path, wiki_docs, monkeypatch, capsys):
    """The comparison path, with two of our own tokenizers standing in for GPT-2/GPT-4 (offline here)."""
    from scripts import tok_eval

    Tokenizer.train_from_iterator(wiki_docs[:200], 2000).save(str(tmp_path / "tokenizer"))
    small = Tokenizer.train_from_iterator(wiki_docs[:200], 600)
    monkeypatch.setattr(tok_eval, "load_reference", lambda name: (small, None) if name == "gpt2" else (None, "offline"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok_eval.main(["--data", str(tmp_path / "missing")])
    printed = capsys.readouterr().out
    assert "cannot load tiktoken's cl100k_base (offline)" in printed
    assert "no held-out pretraining text" in printed
    results = json.loads((tmp_path / "tokenizer" / "eval.json").read_text())
    assert results["encoders"] == ["ours", "gpt2"]
    prose = results["results"]["prose"]
    assert prose["ours"]["tokens"] < prose["gpt2"]["tokens"]  # the 2000-token vocab beats the 600-token one
    assert "vs gpt2" in printed and "vs gpt4" not in printed


def test_tok_train_shows_progress_with_an_eta(tmp_path, wiki_path, monkeypatch, capfd):
    from nanochat import dataset
    from scripts import tok_train

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(dataset, "PROGRESS_EVERY_S", 0.0)  # a line per document read
    tok_train.main(["--data", wiki_path, "--max-chars", "1000000", "--vocab-size", "1024"])
    printed = "".join(capfd.readouterr())  # rustbpe writes to the stderr file descriptor
    reading = re.findall(r"^tok_train: reading: ([\d.]+)% of --max-chars .* ETA [\d.]+ min$", printed, re.M)
    assert len(reading) > 100 and float(reading[-1]) == 100.0
    merging = re.findall(r"^rustbpe: \d+/759 merges .* ETA [\d.]+ min$", printed, re.M)
    assert len(merging) == 11  # every 10% of the merges, and the last


@pytest.mark.parametrize("args", [["--max-chars", "0"], ["--doc-cap", "-5"]])
def test_tok_train_rejects_nonpositive_limits(tmp_path, args):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tok_train", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "must be positive" in result.stderr
