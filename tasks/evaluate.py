"""Scoring a chat model on the evaluation tasks: categorical (answer-letter logits) and generative (pass@n).

Contract:
- Categorical (ARC-Easy, ARC-Challenge, MMLU): one forward pass per `batch_size` prompts; the logits at each
  prompt's last position, restricted to its answer letters (each one token, checked), pick the letter.
- Generative (GSM8K, HumanEval, SpellingBee): `num_samples` samples per problem from `Engine.generate_batch`
  (seed = the problem's index); the problem passes if any sample does (pass@n).
- A prompt too long for the model is skipped, never cropped (that would cut the question), and counted as failed.
- `evaluate_task` strides the problems over the ranks (rank r takes r, r+W, ...) and sums the counts; a
  `progress` (nanochat.dataset.Progress) prints how far this rank is, with an ETA, every few seconds.
- ChatCORE = the mean centered accuracy over the six tasks (baseline 0.25 multiple choice, else 0); None unless
  all six have a result.

Not here: the command line and result files (scripts/chat_eval.py), the tasks themselves, generation.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.common import dist_info
from nanochat.core_eval import centered_accuracy
from nanochat.engine import ContextFullError, Engine
from tasks.arc import ARC
from tasks.common import Task
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

ALL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
# Random-guess accuracy: four choices (ARC has a few 3- and 5-choice rows; karpathy/nanochat keeps 0.25), or none.
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
SPELLING_BEE_SIZE = 256  # test examples, as in karpathy/nanochat


def load_task(name: str, data_dir: str | None = None, arc_split: str = "test") -> Task:
    """The evaluation split of one of ALL_TASKS; data_dir None = $NANOCHAT_DATA_DIR, else the hub."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(name, arc_split, data_dir=data_dir)
    if name == "MMLU":
        return MMLU("all", "test", data_dir=data_dir)
    if name == "GSM8K":
        return GSM8K("main", "test", data_dir=data_dir)
    if name == "HumanEval":
        return HumanEval()
    if name == "SpellingBee":
        return SpellingBee(SPELLING_BEE_SIZE, "test", data_dir=data_dir)
    raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(ALL_TASKS)}")


def letter_token_ids(tokenizer, letters: list[str]) -> list[int]:
    """The token id of each answer letter; the categorical scoring needs every letter to be one token."""
    ids = [tokenizer.encode(letter) for letter in letters]
    if too_long := {letter: len(tokens) for letter, tokens in zip(letters, ids) if len(tokens) != 1}:
        raise ValueError(f"answer letters must be one token each with this tokenizer; token counts: {too_long}")
    return [tokens[0] for tokens in ids]


@torch.inference_mode()
def last_position_logits(model, prompts: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """fp32 logits (B, V) at each prompt's last position, from one forward pass over the batch, right-padded with
    `pad_id` (causal attention: padding never reaches a prompt). Only the window holding every row's last
    position gets logits."""
    lengths = [len(prompt) for prompt in prompts]
    longest, shortest = max(lengths), min(lengths)
    idx = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        idx[row, : len(prompt)] = torch.tensor(prompt)
    logits = model(idx.to(device), logits_to_keep=longest - shortest + 1)  # (B, longest - shortest + 1, V)
    last = torch.tensor(lengths) - shortest  # each row's last prompt position, counted within the window
    return logits[torch.arange(len(prompts)), last.to(logits.device)].float()


def predict_choices(model, prompts: list[list[int]], letter_ids: list[list[int]], pad_id: int, device) -> list[int]:
    """For each prompt, the index of its highest-scoring answer letter (ties: the first), among its letters only."""
    logits = last_position_logits(model, prompts, pad_id, device)  # (B, V)
    return [int(logits[row, ids].argmax()) for row, ids in enumerate(letter_ids)]


def evaluate_categorical(model, tokenizer, task, indices, batch_size: int, device, progress=None) -> tuple[int, int]:
    """(passed, too long) over the problems `indices` of a categorical task."""
    passed = too_long = 0
    pending = []  # (conversation, prompt) of the prompts that fit, evaluated batch_size at a time
    for position, index in enumerate(indices):
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        if len(prompt) > model.config.sequence_len:
            too_long += 1
        else:
            pending.append((conversation, prompt))
        if pending and (len(pending) == batch_size or position == len(indices) - 1):
            letters = [conversation["letters"] for conversation, _ in pending]
            letter_ids = [letter_token_ids(tokenizer, row_letters) for row_letters in letters]
            choices = predict_choices(model, [p for _, p in pending], letter_ids, tokenizer.get_bos_token_id(), device)
            passed += sum(bool(task.evaluate(c, row[i])) for (c, _), row, i in zip(pending, letters, choices))
            pending = []
        if progress is not None and progress.due():
            progress.show((position + 1) / len(indices), f"{position + 1}/{len(indices)} problems")
    return passed, too_long


def evaluate_generative(engine, tokenizer, task, indices, num_samples=1, max_new_tokens=512, temperature=0.0,
                        top_k: int | None = 50, progress=None) -> tuple[int, int]:  # fmt: skip
    """(passed, too long) over the problems `indices` of a generative task; pass@num_samples."""
    passed = too_long = 0
    for done, index in enumerate(indices):
        if progress is not None and done and progress.due():
            progress.show(done / len(indices), f"{done}/{len(indices)} problems")
        conversation = task[index]
        prompt = tokenizer.render_for_completion(conversation)
        try:
            sampling = {"temperature": temperature, "top_k": top_k, "seed": index}
            completions = engine.generate_batch(prompt, num_samples, max_new_tokens, **sampling)
        except ContextFullError:
            too_long += 1
            continue
        # any() stops at the first pass, so HumanEval runs no more sandboxed programs than it must.
        passed += any(task.evaluate(conversation, tokenizer.decode(c.tokens)) for c in completions)
    return passed, too_long


@dataclass
class TaskResult:
    name: str
    eval_type: str
    problems: int  # evaluated, over all ranks (after max_problems)
    passed: int
    too_long: int  # skipped for not fitting the context, counted as failed
    baseline: float

    @property
    def accuracy(self) -> float:
        return self.passed / self.problems if self.problems else 0.0

    @property
    def centered(self) -> float:
        return centered_accuracy(self.accuracy, self.baseline)


def chatcore(results: list[TaskResult]) -> float | None:
    """Mean centered accuracy over the six tasks, or None unless each of them has a result."""
    centered = {result.name: result.centered for result in results}
    return sum(centered[name] for name in ALL_TASKS) / len(ALL_TASKS) if set(ALL_TASKS) <= centered.keys() else None


def evaluate_task(
    name: str, task, model, tokenizer, device, max_problems=-1, batch_size=8, engine=None, progress=None, **sampling
) -> TaskResult:
    """One task's result; `sampling`: evaluate_generative's num_samples, max_new_tokens, temperature and top_k."""
    num_problems = len(task) if max_problems < 0 else min(len(task), max_problems)
    rank, _, world_size = dist_info()
    indices = range(rank, num_problems, world_size)
    if task.eval_type == "categorical":
        passed, too_long = evaluate_categorical(model, tokenizer, task, indices, batch_size, device, progress)
    elif task.eval_type == "generative":
        engine = engine or Engine(model, tokenizer)
        passed, too_long = evaluate_generative(engine, tokenizer, task, indices, **sampling, progress=progress)
    else:
        raise ValueError(f"{name} has eval_type {task.eval_type!r}: only categorical and generative tasks evaluate")
    counts = torch.tensor([passed, too_long], dtype=torch.long, device=device)
    if world_size > 1:
        dist.all_reduce(counts)  # every problem was evaluated by exactly one rank
    passed, too_long = counts.tolist()
    return TaskResult(name, task.eval_type, num_problems, passed, too_long, BASELINES.get(name, 0.0))
