"""Bits per byte: the model's loss in a unit that does not depend on the tokenizer.

bpb = (sum of next-token losses in nats) / (ln 2 x UTF-8 bytes of those tokens), over the targets that stand for
text (special tokens, 0 bytes, and ignored positions count neither). `evaluate_bpb` sums on the device and,
under a process group, across ranks before dividing, so every rank returns the same number. A `progress`
(nanochat.dataset.Progress) prints how far the batches are, with an ETA, every few seconds.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import dist_info


@torch.no_grad()
def evaluate_bpb(model, batches, num_steps: int, token_bytes: torch.Tensor, progress=None) -> float:
    """Bits per byte over `num_steps` (inputs, targets) batches; `token_bytes[id]` is the UTF-8 length of id."""
    device = token_bytes.device
    # fp64 sums where the device has them: 10M+ tokens of ~1-10 nats each exceed fp32's exact range.
    accum = torch.float32 if device.type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=accum, device=device)
    total_bytes = torch.zeros((), dtype=accum, device=device)
    for step in range(1, num_steps + 1):
        inputs, targets = next(batches)
        losses = model(inputs, targets, loss_reduction="none").view(-1)
        targets = targets.reshape(-1)
        nbytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        total_nats += (losses * (nbytes > 0)).sum().to(accum)
        total_bytes += nbytes.sum().to(accum)
        if progress is not None and progress.due():
            progress.show(step / num_steps, f"{step}/{num_steps} batches")
    if dist_info().is_distributed:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("no target tokens with text in the evaluated batches (all special or ignored)")
    return (total_nats / (math.log(2) * total_bytes)).item()
