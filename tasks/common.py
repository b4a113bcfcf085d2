"""What every task shares: the Task base class, mixtures of tasks, multiple-choice rendering, data loading.

Contract:
- A `Task` is a read-only sequence of conversations, `{"messages": [...], ...task keys}`, sliced at construction
  with `start`/`stop`/`step` (like `range`). `eval_type`: "categorical" (the completion is one of
  `conversation["letters"]`), "generative" (free text) or None (training-only: `evaluate` raises).
- `TaskMixture` interleaves tasks in one seeded shuffle, `TaskSequence` plays them in order; both are Tasks.
- Rows come from a local data directory when one is given (`data_dir`, else $NANOCHAT_DATA_DIR; each task's
  docstring gives its layout), otherwise from the Hugging Face hub; either way the same rows in the same order.

Not here: tokenization (nanochat/tokenizer.py renders the conversations), generation, or the eval loops.
"""

import abc
import json
import os
import random

from nanochat.dataset import MissingDataError

DATA_DIR_ENV = "NANOCHAT_DATA_DIR"


class Task(abc.ABC):
    """A dataset of conversations, viewed through a `range(start, stop, step)` slice of its rows."""

    eval_type: str | None = None  # "categorical", "generative", or None for training-only tasks

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"need 0 <= start <= stop and step >= 1, got start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    # Subclasses implement these two over their full, unsliced rows (by default the list-like `self.rows`).
    def num_examples(self) -> int:
        return len(self.rows)

    @abc.abstractmethod
    def get_example(self, index: int) -> dict: ...

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise TypeError(f"{type(self).__name__} is a training-only task: it has no evaluate()")

    def _indices(self) -> range:
        total = self.num_examples()
        stop = total if self.stop is None else min(self.stop, total)
        return range(min(self.start, stop), stop, self.step)

    def __len__(self) -> int:
        return len(self._indices())

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        rows = self._indices()
        if isinstance(index, slice):  # a list of conversations; to slice lazily, pass start/stop/step instead
            return [self.get_example(row) for row in rows[index]]
        if not -len(rows) <= index < len(rows):
            raise IndexError(f"{type(self).__name__} index {index} out of range for {len(rows)} examples")
        return self.get_example(rows[index])


class TaskMixture(Task):
    """All examples of all tasks, shuffled together by `seed` (None: in order); a task listed twice is seen twice.
    Shuffling (task, example) pairs spreads small tasks through a run instead of one block that swings the loss."""

    def __init__(self, tasks: list[Task], seed: int | None = 42, **slice_args):
        super().__init__(**slice_args)
        self.tasks = list(tasks)
        self.pairs = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        if seed is not None:
            random.Random(seed).shuffle(self.pairs)

    def num_examples(self) -> int:
        return len(self.pairs)

    def get_example(self, index: int) -> dict:
        task_index, example_index = self.pairs[index]
        return self.tasks[task_index][example_index]


class TaskSequence(TaskMixture):
    """All examples of the first task, then all of the second, and so on (a curriculum)."""

    def __init__(self, tasks: list[Task], **slice_args):
        super().__init__(tasks, seed=None, **slice_args)


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    """The user prompt of a multiple-choice question. "- Paris=A", no space: " A" and "A" are different tokens, and
    the prompt's letter must be the token the assistant answers with (karpathy/nanochat tasks/common.py)."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices, strict=True)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "\n".join(lines)


def mc_conversation(question: str, letters: list[str], choices: list[str], answer: str, **extra) -> dict:
    """A one-turn multiple-choice conversation whose assistant answer is the letter `answer`."""
    if answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of the letters {letters} (question {question!r:.60})")
    user = {"role": "user", "content": render_mc(question, letters, choices)}
    return {"messages": [user, {"role": "assistant", "content": answer}], "letters": list(letters), **extra}


class MultipleChoice(Task):
    """A task of `mc_conversation`s, scored categorically: the predicted letter equals the answer letter."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


def check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")


# ---------------------------------------------------------------------------- data


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The local data directory to read from, or None to use the Hugging Face hub."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist (from data_dir or ${DATA_DIR_ENV})")
    return data_dir


def require_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: expected {path} (the task's docstring gives the data directory's layout)")
    return path


def read_jsonl(path: str, what: str) -> list[dict]:
    with open(require_file(path, what), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_rows(data_dir: str | None, hub: tuple[str, str | None, str], read_local):
    """`read_local(data_dir)` when there is a local data directory, else the hub's (path, config, split)."""
    data_dir = resolve_data_dir(data_dir)
    return load_hub_rows(*hub) if data_dir is None else read_local(data_dir)


OFFLINE_HINT = f"Offline, pass data_dir= (or set ${DATA_DIR_ENV}) to a local data directory."


def load_hub_rows(path: str, name: str | None, split: str, offline_hint: str = OFFLINE_HINT):
    """A hub dataset split (Arrow-backed, so 460K rows are not all made Python objects up front)."""
    from datasets import load_dataset

    try:
        return load_dataset(path, name, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError...)
        raise MissingDataError(f"could not load {path} (config {name!r}, split {split!r}) from the Hugging Face hub: "
                           f"{type(e).__name__}: {e}. {offline_hint}") from e  # fmt: skip
