"""Bits per byte checked by hand on a tiny case; scripts.base_loss sizing itself to the hardware."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_base_dir
from nanochat import dataset
from nanochat.loss_eval import evaluate_bpb
from scripts import base_loss


class FixedLoss(torch.nn.Module):
    """A stand-in model whose per-token loss is the target id itself, in nats."""

    def forward(self, inputs, targets, loss_reduction="none"):
        return torch.where(targets >= 0, targets.float(), 0.0).view(-1)


def test_bpb_by_hand_excludes_specials_and_ignored_positions():
    token_bytes = torch.tensor([1, 2, 3, 0])  # token 3 is a special token (no text)
    targets = torch.tensor([[0, 1, 2, 3, -1], [2, 2, -1, 1, 0]])
    batches = iter([(torch.zeros_like(targets), targets)])
    # counted: targets 0,1,2 (bytes 1+2+3, nats 0+1+2) and 2,2,1,0 (bytes 3+3+2+1, nats 2+2+1+0)
    expected = (0 + 1 + 2 + 2 + 2 + 1 + 0) / (math.log(2) * (1 + 2 + 3 + 3 + 3 + 2 + 1))
    assert evaluate_bpb(FixedLoss(), batches, 1, token_bytes) == pytest.approx(expected)


def test_bpb_sums_over_batches_before_dividing():
    token_bytes = torch.tensor([1, 4])
    batches = iter([(None, torch.tensor([[1]])), (None, torch.tensor([[0, 0, 0]]))])
    # nats 1 + 0, bytes 4 + 3: not the mean of the two batches' ratios
    assert evaluate_bpb(FixedLoss(), batches, 2, token_bytes) == pytest.approx(1 / (math.log(2) * 7))


def test_only_special_tokens_is_a_clear_error():
    batches = iter([(None, torch.tensor([[1, -1]]))])
    with pytest.raises(ValueError, match="no target tokens with text"):
        evaluate_bpb(FixedLoss(), batches, 1, torch.tensor([1, 0]))


def test_base_loss_sizes_itself_to_the_cpu_says_so_and_shows_progress(
    tmp_path, small_tokenizer, wiki_docs, monkeypatch, capsys
):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(make_base_dir(tmp_path, small_tokenizer)))  # device batch 4
    (tmp_path / "base_data").mkdir()
    pq.write_table(pa.table({"text": wiki_docs[:200]}), tmp_path / "base_data" / "shard_00000.parquet")
    pq.write_table(pa.table({"text": wiki_docs[200:300]}), tmp_path / "base_data" / "val_00000.parquet")
    monkeypatch.setattr(dataset, "PROGRESS_EVERY_S", 0.0)  # a progress line per batch
    base_loss.main(["--device-type", "cpu"])  # no sizes: the 8xH100 run's 10M tokens per split ran 35 min on CPU
    out = capsys.readouterr().out
    assert "evaluating 20 batches x 4 x 128 tokens per split (CPU default; --device-batch-size" in out
    assert "train bpb: 50.0% 10/20 batches, " in out and "val bpb: 100.0% 20/20 batches, " in out
    assert " min elapsed, ETA " in out
    summary = json.loads((tmp_path / "report" / "base_loss.json").read_text())
    assert summary["tokens_per_split"] == 20 * 4 * 128 and summary["step"] == 0
    base_loss.main(["--device-type", "cpu", "--device-batch-size", "2", "--split-tokens", "512"])  # flags win
    assert "evaluating 2 batches x 2 x 128 tokens per split (as given;" in capsys.readouterr().out
