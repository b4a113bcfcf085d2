"""CustomJSON: your own conversations from a JSONL file (e.g. the identity conversations), for training.

Contract:
- `CustomJSON(path)`: each non-blank line is one conversation, either a JSON list of `{"role", "content"}` string
  messages or an object `{"messages": [...]}` holding that list (the common fine-tuning format; other keys are
  ignored): an optional "system" message, then user/assistant alternating with at least one reply (a trailing
  user message is rendered but never trained on: 4 of the 996 identity conversations end so).
- The whole file is validated at construction: one ValueError with one line `<path>:<line>: <what>` per bad line
  (a single bad line is a one-line message).
- `split`: "all" (default), or "train" / "val": a held-out split carved from the file, deterministic in the number
  of rows alone (`held_out_count`: 5%, at least 4, never more than half, so training keeps at least one row).

Not here: tool-call parts (write those through a Task of their own) or evaluation (training-only).
"""

import json
import random

from tasks.common import Task

MAX_REPORTED_ERRORS = 20
HELD_OUT_FRACTION, HELD_OUT_MIN, HELD_OUT_SEED = 0.05, 4, 42


def held_out_count(rows: int) -> int:
    """Rows of a file held out for validation: 5%, at least 4, at most half (40 -> 4, 1,000 -> 50, 1 -> 0)."""
    return min(max(HELD_OUT_MIN, round(rows * HELD_OUT_FRACTION)), rows // 2)


def validate_messages(messages) -> str | None:
    """What is wrong with one line's messages, or None if they are a valid conversation."""
    if not isinstance(messages, list) or not messages:
        return 'expected a non-empty JSON list of messages, or {"messages": [...]}'
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            return f"message {i} must be an object with exactly 'role' and 'content'"
        if not isinstance(message["content"], str):
            return f"message {i} content must be a string"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if len(turns) < 2:
        return "expected at least one user message and one assistant reply"
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = i + len(messages) - len(turns)
            return f"message {position} has role {message['role']!r}, expected {expected!r} (turns alternate)"
    return None


class CustomJSON(Task):
    def __init__(self, path: str, split: str = "all", **slice_args):
        super().__init__(**slice_args)
        self.path = path
        rows, errors = [], []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    errors.append(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno})")
                    continue
                if isinstance(messages, dict) and "messages" in messages:
                    messages = messages["messages"]
                problem = validate_messages(messages)
                if problem is not None:
                    errors.append(f"{path}:{line_number}: {problem}")
                else:
                    rows.append(messages)
        if len(errors) > 1:
            shown = errors[:MAX_REPORTED_ERRORS]
            more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
            raise ValueError(f"{len(errors)} bad lines in {path}:\n" + "\n".join(shown) + more)
        if errors:
            raise ValueError(errors[0])
        if split == "all":
            self.rows = rows
        else:
            held_out = set(random.Random(HELD_OUT_SEED).sample(range(len(rows)), held_out_count(len(rows))))
            self.rows = [row for i, row in enumerate(rows) if (i in held_out) == (split == "val")]

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[index]}
