"""CustomJSON: your own conversations from a JSONL file (e.g. the identity conversations), for training.

Contract:
- `CustomJSON(path)`: each non-blank line is a JSON list of `{"role", "content"}` string messages: an optional
  "system" message, then user/assistant alternating with at least one reply (a trailing user message is
  rendered but never trained on: 4 of the 996 identity conversations end so).
- The whole file is validated at construction: one ValueError lists every bad line as `<path>:<line>: <what>`.

Not here: tool-call parts (write those through a Task of their own) or evaluation (training-only).
"""

import json

from tasks.common import Task

MAX_REPORTED_ERRORS = 20


def validate_messages(messages) -> str | None:
    """What is wrong with one line's messages, or None if they are a valid conversation."""
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty JSON list of messages"
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
    def __init__(self, path: str, **slice_args):
        super().__init__(**slice_args)
        self.path = path
        self.rows, errors = [], []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    errors.append(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno})")
                    continue
                problem = validate_messages(messages)
                if problem is not None:
                    errors.append(f"{path}:{line_number}: {problem}")
                else:
                    self.rows.append(messages)
        if errors:
            shown = errors[:MAX_REPORTED_ERRORS]
            more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
            raise ValueError(f"{len(errors)} bad line(s) in {path}:\n" + "\n".join(shown) + more)

    def get_example(self, index: int) -> dict:
        return {"messages": self.rows[index]}
