"""Chat data for the stages after pretraining: conversations turned into batches, and their losses.

Midtraining: `PackedChatLoader` (full rows like pretraining, every token a target, a resumable JSON state). SFT:
`sft_micro_batches` (one conversation per row, a pure function of the step) and `supervised_backward` (normalised
over the WHOLE step: reference nanochat divided per micro-batch, PRs #59/#400). Any Task works as input.
Not here: the tasks and mixtures (tasks/), the training loops (scripts/mid_train.py, scripts/chat_sft.py).
"""

import torch
import torch.distributed as dist

from nanochat.common import dist_info

# ---------------------------------------------------------------------------- midtraining: packed rows


class PackedChatLoader:
    """Infinite (inputs, targets) batches of conversations rank, rank + W, ... of `task`, packed into rows of T+1.

    Each row is filled best-fit from a buffer of `buffer_size`: the largest conversation that fits the space left
    (ties: the earliest); when none fits, the shortest is cropped to fill the row. Every row starts with <|bos|>.
    """

    def __init__(self, tokenizer, task, batch_size, seq_len, device="cpu", rank=0, world_size=1, state=None,
                 buffer_size=100):  # fmt: skip
        self.tokenizer, self.task, self.batch_size, self.seq_len = tokenizer, task, batch_size, seq_len
        self.device = torch.device(device)
        self.rank, self.world_size, self.buffer_size = rank, world_size, buffer_size
        self.share = len(range(rank, len(task), world_size))  # conversations this loader reads per epoch
        if self.share == 0:
            raise ValueError(f"{len(task)} conversations cannot be shared by {world_size} loaders")
        self.identity = {"rows": len(task), "seq_len": seq_len, "rank": rank, "world_size": world_size}
        self.epoch, self.cursor, self.buffer = 0, 0, []  # buffer: (task index, ids), in arrival order
        if state is not None:
            if state["identity"] != self.identity:
                raise ValueError(f"loader state is for {state['identity']}, not this loader ({self.identity})")
            self.epoch, self.cursor = state["epoch"], state["cursor"]
            self.buffer = [(index, self._render(index)) for index in state["buffer"]]

    def _render(self, index: int) -> list[int]:
        ids, _ = self.tokenizer.render_conversation(self.task[index], max_tokens=self.seq_len + 1)
        return ids

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            if self.cursor == self.share:
                self.epoch, self.cursor = self.epoch + 1, 0
            index = self.rank + self.cursor * self.world_size
            self.buffer.append((index, self._render(index)))
            self.cursor += 1

    def _row(self) -> list[int]:
        row, space = [], self.seq_len + 1
        while space > 0:
            self._refill()
            fitting = [i for i, (_, ids) in enumerate(self.buffer) if len(ids) <= space]
            if fitting:  # the largest that fits; max() keeps the first of equal lengths
                chosen = max(fitting, key=lambda i: len(self.buffer[i][1]))
                ids = self.buffer.pop(chosen)[1]
            else:
                chosen = min(range(len(self.buffer)), key=lambda i: len(self.buffer[i][1]))
                ids = self.buffer.pop(chosen)[1][:space]
            row += ids
            space -= len(ids)
        return row

    def progress(self) -> float:
        """Epochs read so far (fractional): 1.0 once every conversation of this loader's share was read."""
        return self.epoch + self.cursor / self.share

    def state_dict(self) -> dict:
        return {"identity": self.identity, "epoch": self.epoch, "cursor": self.cursor,
                "buffer": [index for index, _ in self.buffer]}  # fmt: skip

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self._row() for _ in range(self.batch_size)], dtype=torch.long)  # (B, T+1)
        rows = rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]


# ---------------------------------------------------------------------------- SFT: padded rows, masked targets


def padded_batch(rows, pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (B, L), L = longest row - 1, from rows of (ids, mask): targets are the next tokens where
    the mask is 1, else -1; padding (`pad_id`, after the tokens, so causal attention never lets it in) has -1."""
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(rows):
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        inputs[row, : len(ids) - 1] = ids_t[:-1]
        targets[row, : len(ids) - 1] = torch.where(mask_t[1:], ids_t[1:], -1)
    return inputs.to(device), targets.to(device)


def conversation_batch(tokenizer, conversations, seq_len: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """padded_batch of the conversations rendered to at most seq_len + 1 tokens, padded with <|assistant_end|>."""
    rendered = [tokenizer.render_conversation(c, max_tokens=seq_len + 1) for c in conversations]
    return padded_batch(rendered, tokenizer.encode_special("<|assistant_end|>"), device)


def sft_micro_batches(tokenizer, task, step, examples_per_step, batch_size, seq_len, rank, world_size, device):
    """This rank's micro-batches of step `step`: rows [step * E, (step + 1) * E) (mod len) of `task`, micro-batch
    m of rank r taking slice (r * A + m) of B rows."""
    accumulation = examples_per_step // (batch_size * world_size)
    batches = []
    for micro in range(accumulation):
        first = step * examples_per_step + (rank * accumulation + micro) * batch_size
        conversations = [task[(first + i) % len(task)] for i in range(batch_size)]
        batches.append(conversation_batch(tokenizer, conversations, seq_len, device))
    return batches


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist_info().is_distributed:
        dist.all_reduce(value)
    return value


def supervised_backward(forward, micro_batches, scale=None) -> tuple[torch.Tensor, int]:
    """Backward of (summed per-token loss of the whole step) / (supervised tokens of the whole step, all ranks);
    returns (the step's loss over ranks, supervised tokens). `scale`: a GradScaler's .scale. A step without a
    supervised token divides by 1: zero gradient, not NaN (reference issue #590)."""
    device = micro_batches[0][1].device
    count = sum((targets >= 0).sum() for _, targets in micro_batches).to(device=device, dtype=torch.float32)
    count = _all_reduce_sum(count).clamp(min=1)
    # The optimizer AVERAGES gradients over ranks (nanochat/optim.py), so each rank's share of the sum is
    # multiplied by the world size: the average of W shares of sum/count x W is then the whole step's gradient.
    world_size = dist_info().world_size
    step_loss = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        loss = forward(inputs, targets, loss_reduction="sum") / count
        step_loss += loss.detach()
        loss = loss * world_size
        (scale(loss) if scale else loss).backward()
    return _all_reduce_sum(step_loss), int(count.item())


@torch.no_grad()
def evaluate_loss(model, batches) -> float:
    """Mean loss per supervised token over `batches` of (inputs, targets), summed across ranks first."""
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, supervised tokens)
    for inputs, targets in batches:
        totals[0] += model(inputs, targets, loss_reduction="sum").double()
        totals[1] += (targets >= 0).sum()
    totals = _all_reduce_sum(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()
