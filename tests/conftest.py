"""Shared fixtures: the real datasets in ../shared/data, resolved relative to the repository, and a small
tokenizer trained on them."""

import gzip
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
WIKI_PATH = os.path.join(SHARED_DATA, "pretrain", "enwiki-sample.jsonl.gz")


def require(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: these tests read the real datasets in ../shared/data beside the repo")
    return path


@pytest.fixture(scope="session")
def wiki_path() -> str:
    return require(WIKI_PATH)


@pytest.fixture(scope="session")
def wiki_docs(wiki_path) -> list[str]:
    """All 28,560 Wikipedia articles of the sample, in file order."""
    with gzip.open(wiki_path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def small_tokenizer(wiki_docs):
    """A 512-token tokenizer (256 bytes, 247 merges, 9 specials) trained on the first 300 articles."""
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(wiki_docs[:300], 512)
