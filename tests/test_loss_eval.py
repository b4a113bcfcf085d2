"""Bits per byte checked by hand on a tiny case."""

import math

import pytest
import torch

from nanochat.loss_eval import evaluate_bpb


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
