"""nanochat.dataloader: BOS-aligned best-fit rows, sharding across ranks, exact resume, determinism, errors.

Rows are checked against the documents themselves: every row is cut at its <|bos|> tokens (plain text never
encodes to <|bos|>) and each piece is matched to the document it came from, so the tests need no hook inside
the loader.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_dataset import corrupt_row_group

from nanochat.dataloader import MAX_WAIT_ROW_GROUPS, PretrainLoader
from nanochat.dataset import ShardError
from nanochat.tokenizer import Tokenizer

SEQ_LEN = 256
BATCH = 4
BUFFER = 32  # smaller than an epoch's 240 documents, so the buffer turns over and crosses epochs
DOCS_PER_SHARD, ROW_GROUP = 80, 16  # 3 shards x 5 row groups


@pytest.fixture(scope="module")
def tokenizer(wiki_docs) -> Tokenizer:
    return Tokenizer.train_from_iterator(wiki_docs[:300], 1000)


@pytest.fixture(scope="module")
def corpus(wiki_docs, tmp_path_factory):
    """(shard directory, train documents): 240 real articles cut to 100-1,000 characters (about 40-450 tokens),
    so that some fill a 257-token row alone, some share one and some are longer than a row."""
    docs = [text[: 100 + (i * 97) % 900] for i, text in enumerate(wiki_docs[2000:2240])]
    assert len(set(docs)) == len(docs)
    directory = tmp_path_factory.mktemp("shards")
    for shard in range(3):
        table = pa.table({"text": docs[shard * DOCS_PER_SHARD : (shard + 1) * DOCS_PER_SHARD]})
        pq.write_table(table, directory / f"shard_{shard:05d}.parquet", row_group_size=ROW_GROUP)
    pq.write_table(pa.table({"text": wiki_docs[2500:2520]}), directory / "val_00000.parquet", row_group_size=ROW_GROUP)
    return str(directory), docs


@pytest.fixture(scope="module")
def doc_tokens(tokenizer, corpus) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in tokenizer.encode(corpus[1], prepend="<|bos|>", num_threads=2)]


def make_loader(tokenizer, corpus, **overrides) -> PretrainLoader:
    options = dict(split="train", batch_size=BATCH, seq_len=SEQ_LEN, buffer_docs=BUFFER, tokenizer_threads=2)
    return PretrainLoader(tokenizer, [corpus[0]], **{**options, **overrides})


def take(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(count)]


def batches_of_first_epoch(loader) -> tuple[list, list]:
    """(batches taken while only epoch-0 documents had been read, the batch during which epoch 1 began)."""
    batches = []
    while True:
        batch = next(loader)
        if loader.epoch > 0:
            return batches, [batch]
        batches.append(batch)


def identify(rows, doc_tokens) -> list[list[tuple[int | None, int]]]:
    """For each row, its pieces as (document index, tokens placed), asserting the packing rules on the way."""
    whole = {tokens: i for i, tokens in enumerate(doc_tokens)}
    bos = doc_tokens[0][0]
    identified = []
    for row in rows:
        row = tuple(row.tolist())
        assert row[0] == bos, "every row starts with <|bos|>"
        starts = [i for i, token in enumerate(row) if token == bos] + [len(row)]
        pieces = []
        for number, (start, end) in enumerate(zip(starts, starts[1:])):
            piece = row[start:end]
            if piece in whole:
                pieces.append((whole[piece], len(piece)))
                continue
            # Only the last piece of a row may be a cropped document (a prefix of one). A short piece (a lone
            # <|bos|> even) can begin several documents: its document is then unknown (None).
            assert number == len(starts) - 2, "a document was cut in the middle of a row"
            owners = [i for i, tokens in enumerate(doc_tokens) if tokens[: len(piece)] == piece]
            assert owners, "a cropped piece must be the start of a document"
            pieces.append((owners[0] if len(owners) == 1 else None, len(piece)))
        identified.append(pieces)
    return identified


def rows_of(batches) -> np.ndarray:
    """The (rows, T+1) token rows behind (inputs, targets) batches."""
    return np.concatenate([torch.cat([inputs, targets[:, -1:]], dim=1).numpy() for inputs, targets in batches])


def read_row_group(shard: str, index: int) -> list[str]:
    return pq.ParquetFile(shard).read_row_group(index)["text"].to_pylist()


def document_lengths(loader, corpus, doc_tokens):
    """length(epoch, position, doc): token count of a document named as in the loader's state (epoch 1 only
    for positions read so far)."""
    index_of_text = {text: i for i, text in enumerate(corpus[1])}

    def length(epoch, position, doc):
        return len(doc_tokens[index_of_text[read_row_group(*loader.row_groups(epoch)[position])[doc]]])

    return length


def documents_before(loader, position: int, doc: int) -> list[tuple[int, int]]:
    """(position, doc) of the epoch-1 documents before the cursor (position, doc)."""
    counts = [len(read_row_group(*row_group)) for row_group in loader.row_groups(1)[: position + 1]]
    return [(p, d) for p in range(position + 1) for d in range(counts[p] if p < position else doc)]


def texts_of_row_groups(row_groups) -> set[str]:
    return {text for row_group in row_groups for text in read_row_group(*row_group)}


# ----------------------------------------------------------------------------- packing


def test_rows_hold_whole_documents_from_bos_and_each_document_once_per_epoch(tokenizer, corpus, doc_tokens):
    loader = make_loader(tokenizer, corpus)
    first_epoch, crossing = batches_of_first_epoch(loader)
    for inputs, targets in first_epoch:
        assert inputs.shape == targets.shape == (BATCH, SEQ_LEN) and inputs.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    identified = identify(rows_of(first_epoch + crossing), doc_tokens)

    used = [doc for pieces in identified[: len(first_epoch) * BATCH] for doc, _ in pieces if doc is not None]
    assert len(used) == len(set(used)), "a document appeared twice in one epoch"
    assert len(used) > 0.8 * len(doc_tokens)  # the rest is still in the buffer

    # Every token read is packed, cropped (counted when its document leaves the buffer) or still buffered.
    # Read so far: all of epoch 0, and epoch 1 up to the cursor.
    state = loader.state_dict()
    assert state["epoch"] == 1
    length = document_lengths(loader, corpus, doc_tokens)
    read = sum(map(len, doc_tokens))
    read += sum(length(1, position, doc) for position, doc in documents_before(loader, state["position"], state["doc"]))
    buffered = sum(length(epoch, position, doc) for epoch, position, docs in state["buffer"] for doc in docs)
    assert loader.tokens_packed == len(identified) * (SEQ_LEN + 1)
    assert loader.tokens_packed + loader.tokens_cropped + buffered == read
    assert 0.05 < loader.cropped_fraction < 0.6
    # Best-fit packs several whole documents into some rows.
    assert any(len(pieces) >= 3 for pieces in identified)


def test_background_reading_and_batch_size_do_not_change_the_rows(tokenizer, corpus):
    threaded = rows_of(take(make_loader(tokenizer, corpus), 20))
    inline = rows_of(take(make_loader(tokenizer, corpus, prefetch_row_groups=0, batch_size=2), 40))
    np.testing.assert_array_equal(threaded, inline)


# ----------------------------------------------------------------------------- ranks and seeds


def test_two_ranks_read_disjoint_data_that_together_is_what_one_rank_reads(tokenizer, corpus, doc_tokens):
    alone = make_loader(tokenizer, corpus)
    ranks = [make_loader(tokenizer, corpus, rank=rank, world_size=2) for rank in (0, 1)]
    for epoch in (0, 1):
        row_groups = [set(loader.row_groups(epoch)) for loader in ranks]
        assert not row_groups[0] & row_groups[1]
        assert row_groups[0] | row_groups[1] == set(alone.row_groups(epoch))
        assert len(alone.row_groups(epoch)) == 15
    assert ranks[0].row_groups(0) != ranks[0].row_groups(1), "each epoch reads in a new order"

    texts = [texts_of_row_groups(loader.row_groups(0)) for loader in ranks]
    assert texts[0] | texts[1] == texts_of_row_groups(alone.row_groups(0)) == set(corpus[1])
    for loader, own_texts in zip(ranks, texts):
        batches, _ = batches_of_first_epoch(loader)
        pieces = [piece for row in identify(rows_of(batches), doc_tokens) for piece in row]
        used = {corpus[1][doc] for doc, _ in pieces if doc is not None}
        assert used and used <= own_texts  # so the ranks' documents are disjoint too


def test_same_seed_same_batches_other_seed_other_batches(tokenizer, corpus):
    first = rows_of(take(make_loader(tokenizer, corpus, seed=7), 3))
    np.testing.assert_array_equal(first, rows_of(take(make_loader(tokenizer, corpus, seed=7), 3)))
    assert not np.array_equal(first, rows_of(take(make_loader(tokenizer, corpus, seed=8), 3)))


# ----------------------------------------------------------------------------- resume


def test_resume_continues_exactly_mid_row_group_at_a_boundary_and_across_an_epoch(tokenizer, corpus):
    loader = make_loader(tokenizer, corpus)
    states = [json.loads(json.dumps(loader.state_dict()))]  # states[k]: after k batches
    batches = []
    for _ in range(60):  # about 1.7 epochs
        batches.append(next(loader))
        states.append(json.loads(json.dumps(loader.state_dict())))
    epoch_turn = next(k for k, state in enumerate(states) if state["epoch"] == 1)
    mid_row_group = next(k for k, state in enumerate(states) if state["doc"] > 0)
    after_boundary = next(k for k, state in enumerate(states) if state["doc"] == 0 and state["position"] > 0)
    assert len(json.dumps(states[-1])) < 2_000
    # Waiting is bounded, so a resume re-reads only the last few row groups.
    assert max(len(state["buffer"]) for state in states) <= MAX_WAIT_ROW_GROUPS + 3

    for k in sorted({0, mid_row_group, after_boundary, epoch_turn - 1, epoch_turn, 55}):
        resumed = make_loader(tokenizer, corpus, state=states[k], prefetch_row_groups=k % 2)
        assert resumed.state_dict() == states[k]
        for expected in batches[k : k + 3]:
            actual = next(resumed)
            assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1]), f"after {k}"
        assert resumed.tokens_cropped == states[k + 3]["tokens_cropped"]


def test_state_refuses_a_different_stream(tokenizer, corpus):
    state = make_loader(tokenizer, corpus).state_dict()
    with pytest.raises(ValueError, match="seq_len=256"):
        make_loader(tokenizer, corpus, seq_len=128, state=state)
    with pytest.raises(ValueError, match="rank"):
        make_loader(tokenizer, corpus, rank=1, world_size=2, state=state)


# ----------------------------------------------------------------------------- errors and devices


def test_clear_errors_for_missing_shards_and_bad_sizes(tokenizer, corpus, tmp_path):
    (tmp_path / "notes.jsonl").write_text('{"text": "not a shard"}\n')
    with pytest.raises(FileNotFoundError, match="nanochat.download -n 8"):
        make_loader(tokenizer, (str(tmp_path), None))
    with pytest.raises(FileNotFoundError, match="nanochat.dataset build"):
        make_loader(tokenizer, (str(tmp_path / "absent"), None))
    only_train = tmp_path / "train_only"
    only_train.mkdir()
    pq.write_table(pa.table({"text": ["a document"]}), only_train / "shard_00000.parquet")
    with pytest.raises(FileNotFoundError, match="no val parquet shards"):
        make_loader(tokenizer, (str(only_train), None), split="val")
    with pytest.raises(ValueError, match="cannot be shared by 2 ranks"):
        make_loader(tokenizer, (str(only_train), None), world_size=2)
    for bad in (dict(seq_len=0), dict(batch_size=0)):
        with pytest.raises(ValueError, match="must be at least 1"):
            make_loader(tokenizer, corpus, **bad)
    with pytest.raises(ValueError, match="rank"):
        make_loader(tokenizer, corpus, rank=2, world_size=2)
    assert next(make_loader(tokenizer, corpus, split="val"))[0].shape == (BATCH, SEQ_LEN)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_corrupt_row_group_is_a_shard_error_naming_it(tokenizer, wiki_docs, tmp_path, prefetch):
    shard = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"text": wiki_docs[:64]}), shard, row_group_size=16)
    corrupt_row_group(shard, 1)
    loader = make_loader(tokenizer, (str(tmp_path), None), buffer_docs=4, prefetch_row_groups=prefetch)
    with pytest.raises(ShardError, match=rf"^{shard}: row group 1 of 4 is corrupt .*nanochat.download"):
        take(loader, 40)  # a document fills at most one row, so 160 rows read every row group


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches(tokenizer, corpus):
    cuda_batches = take(make_loader(tokenizer, corpus, device="cuda"), 3)
    for (inputs, targets), (cpu_inputs, cpu_targets) in zip(cuda_batches, take(make_loader(tokenizer, corpus), 3)):
        assert inputs.device.type == "cuda"
        assert torch.equal(inputs.cpu(), cpu_inputs) and torch.equal(targets.cpu(), cpu_targets)
