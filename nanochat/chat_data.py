"""Chat data for the stages after pretraining: named mixture components, and conversations turned into batches.

Contract:
- A mixture is a list of component names (`COMPONENTS`). `build_mixture(names, split, sources, recipe)` loads
  each one (`split` "train" or "val": every component knows its held-out split, or has none) and returns one
  `TaskMixture` (deterministic shuffle, seed 42) plus the (name, rows) it holds. A component that cannot be
  loaded (no network for a hub-only dataset, a missing file) raises `MixtureError` naming every such component
  and the `--mixture` value that leaves them out; nothing is dropped silently.
- `recipe` is the stage's choice of sizes: {name: {"epochs": n, "size": n, "stop": n}} (epochs = the component
  listed n times; size = generated examples of the spelling tasks; stop = the first n rows).
- Midtraining: `PackedChatLoader` renders conversations and packs them into full (B, T) rows like pretraining
  (BOS-aligned best fit; every token is a target). Its state is small JSON (cursor and buffered indices) and
  a loader rebuilt from it yields exactly the rows that would have followed.
- SFT: `sft_micro_batches` gives the micro-batches of one step, one conversation per row, right-padded,
  targets -1 where the render mask is 0 and on padding; a step's batch is a pure function of the step, so
  resuming needs only the step. `supervised_backward` normalises the summed loss by the number of supervised
  tokens in the WHOLE step (all micro-batches, all ranks), so the gradient is the same however the step is
  split into micro-batches and processes (reference nanochat divided per micro-batch; PRs #59/#400).
Not here: the tasks themselves (tasks/), the training loops (scripts/mid_train.py, scripts/chat_sft.py).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tasks.common import Task, TaskMixture


class MixtureError(RuntimeError):
    """A mixture component cannot be loaded; the message says which and how to leave it out."""


@dataclass(frozen=True)
class Sources:
    """Where components read from: a local data dir (None = the Hugging Face hub), the identity file, user data."""

    data_dir: str | None = None
    identity_path: str | None = None
    user_data: str | None = None


# name -> what it teaches; the loading is in component_tasks
COMPONENTS = {
    "smoltalk": "SmolTalk general chat (hub only; val: its test split)",
    "mmlu-aux": "MMLU auxiliary_train multiple choice (hub only; val: MMLU test, first 5,200)",
    "gsm8k": "GSM8K train with calculator tool calls (val: GSM8K test, first 420)",
    "arc": "ARC-Easy and ARC-Challenge train, multiple choice (val: their validation splits)",
    "identity": "identity conversations, CustomJSON (no val split)",
    "simplespelling": "SimpleSpelling: spell a word letter by letter (val: its test split)",
    "spelling": "SpellingBee: count letters, check with the python tool (val: its test split)",
    "data": "your own conversations from --data PATH.jsonl, CustomJSON (no val split)",
}
VAL_SPELLING_SIZE = 1000  # generated held-out spelling examples; the val loaders only read the first tokens


def default_identity_path(data_dir: str | None) -> str:
    """The identity conversations: <data dir>/chat/ (the offline layout), else <base dir>/ (reference layout)."""
    from nanochat.common import get_base_dir

    if data_dir is not None:
        return os.path.join(data_dir, "chat", "identity_conversations.jsonl")
    return os.path.join(get_base_dir(), "identity_conversations.jsonl")


def parse_mixture(text: str, allowed: list[str]) -> list[str]:
    """Comma-separated component names, in order, each known to the stage and listed once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown mixture component(s) {unknown}; choose among {','.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a mixture component is listed twice in {text!r}")
    return names


def component_tasks(name: str, split: str, sources: Sources, size: int = 1000, stop: int | None = None) -> list[Task]:
    """The tasks of one component for `split` ("train" or "val"); [] when it has no held-out split."""
    from tasks.arc import ARC
    from tasks.customjson import CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee

    train, data_dir = split == "train", sources.data_dir
    if name == "smoltalk":
        return [SmolTalk("train" if train else "test", stop=stop if train else None)]
    if name == "mmlu-aux":
        if train:
            return [MMLU("auxiliary_train", "train", data_dir=data_dir, stop=stop)]  # hub only: errors with a data dir
        return [MMLU("all", "test", data_dir=data_dir, stop=5200)]
    if name == "gsm8k":
        return (
            [GSM8K("main", "train", data_dir=data_dir, stop=stop)]
            if train
            else [GSM8K("main", "test", data_dir=data_dir, stop=420)]
        )
    if name == "arc":
        arc_split = "train" if train else "validation"
        return [ARC(subset, arc_split, data_dir=data_dir, stop=stop) for subset in ("ARC-Easy", "ARC-Challenge")]
    if name == "simplespelling":
        return [SimpleSpelling(size if train else VAL_SPELLING_SIZE, "train" if train else "test", data_dir)]
    if name == "spelling":
        return [SpellingBee(size if train else VAL_SPELLING_SIZE, "train" if train else "test", data_dir)]
    if name in ("identity", "data"):
        path = sources.identity_path if name == "identity" else sources.user_data
        if path is None or not os.path.exists(path):
            raise FileNotFoundError(f"no conversations file at {path!r}")
        return [CustomJSON(path, stop=stop)] if train else []
    raise ValueError(f"unknown mixture component {name!r}; the components are {', '.join(COMPONENTS)}")


def build_mixture(names: list[str], split: str, sources: Sources, recipe: dict, seed: int = 42):
    """(TaskMixture of the named components, [(name, rows)]); MixtureError naming every component that fails."""
    tasks, rows, failures = [], [], []
    for name in names:
        options = recipe.get(name, {})
        try:
            component = component_tasks(name, split, sources, options.get("size", 1000), options.get("stop"))
        except Exception as e:  # hub, file and format errors all mean the same thing here: it cannot be used
            failures.append(f"  {name} ({COMPONENTS.get(name, '?')}): {type(e).__name__}: {e}")
            continue
        epochs = options.get("epochs", 1) if split == "train" else 1
        tasks += component * epochs
        rows.append((name, sum(len(task) for task in component) * epochs))
    if failures:
        kept = [name for name in names if not any(line.startswith(f"  {name} (") for line in failures)]
        raise MixtureError(
            f"{len(failures)} mixture component(s) cannot be loaded for {split}:\n" + "\n".join(failures) + "\n"
            f"Leave them out with --mixture {','.join(kept) or '<components that load>'}, or make their data reachable"
        )
    return TaskMixture(tasks, seed=seed), rows


def describe_mixture(title: str, rows: list[tuple[str, int]]) -> str:
    lines = [f"{title}: {sum(n for _, n in rows):,} conversations"]
    lines += [f"  {name:<15} {n:>9,}" for name, n in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- midtraining: packed rows


class PackedChatLoader:
    """Infinite (inputs, targets) batches of rendered conversations packed into full rows of T+1 tokens.

    Reads the conversations at positions rank, rank + W, ... of `task` (a shuffled mixture), renders each
    (cropped to one row), and fills each row best-fit from a buffer of `buffer_size`: the largest buffered
    conversation that fits the space left (ties: the earliest to arrive); when none fits, the shortest is
    cropped to fill the row and its remainder discarded. Every row starts with <|bos|>. All tokens are
    targets (midtraining trains on the whole conversation, as reference nanochat's mid_train did).
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


def conversation_batch(tokenizer, conversations, seq_len: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, L) with L the longest rendered row - 1 (at most seq_len).

    Targets are the next tokens where the render mask is 1, else -1; padding (inputs <|assistant_end|>, as the
    reference; causal attention keeps it from reaching real tokens) has targets -1.
    """
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    rendered = [tokenizer.render_conversation(c, max_tokens=seq_len + 1) for c in conversations]
    width = max(len(ids) for ids, _ in rendered) - 1
    inputs = torch.full((len(rendered), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rendered), width), -1, dtype=torch.long)
    for row, (ids, mask) in enumerate(rendered):
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        inputs[row, : len(ids) - 1] = ids_t[:-1]
        targets[row, : len(ids) - 1] = torch.where(mask_t[1:], ids_t[1:], -1)
    return inputs.to(device), targets.to(device)


def sft_micro_batches(tokenizer, task, step, examples_per_step, batch_size, seq_len, rank, world_size, device):
    """This rank's micro-batches of optimizer step `step`: the step's examples are mixture rows
    [step * E, (step + 1) * E) (mod len), and micro-batch m of rank r takes slice (r * A + m) of B rows."""
    accumulation = examples_per_step // (batch_size * world_size)
    batches = []
    for micro in range(accumulation):
        first = step * examples_per_step + (rank * accumulation + micro) * batch_size
        conversations = [task[(first + i) % len(task)] for i in range(batch_size)]
        batches.append(conversation_batch(tokenizer, conversations, seq_len, device))
    return batches


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
    return value


def supervised_backward(forward, micro_batches, scale=None) -> tuple[torch.Tensor, int]:
    """Backward of (sum of per-token losses over the whole step) / (supervised tokens in the whole step).

    The count covers every micro-batch of every rank (all-reduced before any backward), so the gradient does
    not depend on how the step is split. Returns (the step's mean loss, summed over ranks; supervised tokens).
    `scale` (e.g. a GradScaler's .scale) is applied to each loss before backward. A step with no supervised
    token at all divides by 1: zero loss and zero gradient instead of NaN (reference issue #590).
    """
    device = micro_batches[0][1].device
    count = sum((targets >= 0).sum() for _, targets in micro_batches).to(device=device, dtype=torch.float32)
    count = _all_reduce_sum(count).clamp(min=1)
    # The optimizer AVERAGES gradients over ranks (nanochat/optim.py), so each rank's share of the sum is
    # multiplied by the world size: the average of W shares of sum/count x W is then the whole step's gradient.
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
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


# ---------------------------------------------------------------------------- shared by the chat stages


def lr_multiplier(progress: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Constant, then linear to final_lr_frac over the last warmdown_ratio of the run (progress 0..1)."""
    if progress <= 1 - warmdown_ratio:
        return 1.0
    remaining = max(0.0, 1 - progress) / max(warmdown_ratio, 1e-9)
    return remaining + (1 - remaining) * final_lr_frac


def source_settings(meta: dict) -> dict:
    """Batch and LR settings a chat stage inherits from the checkpoint it starts from (base, mid or sft meta)."""
    user = meta.get("user_config", {})
    return {
        "max_seq_len": meta["model_config"]["sequence_len"],
        "device_batch_size": meta.get("device_batch_size", user.get("device_batch_size", 32)),
        "total_batch_size": meta.get("total_batch_size", 2**19),
        "matrix_lr": meta.get("matrix_lr", 0.02),
        "embedding_lr": meta.get("embedding_lr", 0.2),
        "unembedding_lr": meta.get("unembedding_lr", 0.004),
    }
