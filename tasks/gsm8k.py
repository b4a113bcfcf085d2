"""GSM8K: grade-school math word problems whose answers use a calculator tool, scored generatively.

Contract:
- `GSM8K(subset="main" | "socratic", split="train" | "test")`: 7,473 / 1,319 rows in file order (the hub's
  order). Local layout: `<data_dir>/gsm8k/{train,test}.jsonl` (socratic: `test_socratic.jsonl`, test only);
  the hub: openai/gsm8k.
- The answer's calculator spans `<<expr=result>>` become tool calls: the text before a span, then a "python"
  part holding expr and a "python_output" part holding result, then the text after. The text parts alone are
  the answer with the spans removed ("48/2 = 24 clips"), so the visible text reads exactly as published.
  Spans split at their last "=" (every span in the data has exactly one).
- `evaluate` extracts the number after the last "#### " in the completion, commas removed, and compares it
  with the reference's (OpenAI grade-school-math normalization). `reward` is the same as a float for RL.

Not here: running the python parts (the engine does, at inference).
"""

import json
import os
import re

from tasks.common import Task, load_hub_rows, require_file, resolve_data_dir

CALCULATOR_SPAN = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def extract_answer(text: str) -> str | None:
    """The number after "#### " (the last one if several), commas removed; None when there is none."""
    matches = FINAL_ANSWER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def answer_to_parts(answer: str) -> list[dict]:
    """Splits a GSM8K answer into text / python / python_output parts at its `<<expr=result>>` spans."""
    parts = []
    cursor = 0
    for span in CALCULATOR_SPAN.finditer(answer):
        if span.start() > cursor:
            parts.append({"type": "text", "text": answer[cursor : span.start()]})
        expression, _, result = span.group(1).rpartition("=")
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": result})
        cursor = span.end()
    if cursor < len(answer):
        parts.append({"type": "text", "text": answer[cursor:]})
    return parts


def reference_text(conversation: dict) -> str:
    """The visible text of the reference answer (its text parts joined), where the "#### N" line lives."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "train", data_dir: str | None = None, **slice_args):
        super().__init__(**slice_args)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main or socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        self.subset, self.split = subset, split
        data_dir = resolve_data_dir(data_dir)
        if data_dir is None:
            self.rows = load_hub_rows("openai/gsm8k", subset, split)
        else:
            if subset == "socratic" and split == "train":
                raise FileNotFoundError("GSM8K socratic train has no local file (only test_socratic.jsonl)")
            name = f"{split}_socratic.jsonl" if subset == "socratic" else f"{split}.jsonl"
            path = require_file(os.path.join(data_dir, "gsm8k", name), f"GSM8K {subset} {split}")
            with open(path, encoding="utf-8") as f:
                self.rows = [json.loads(line) for line in f if line.strip()]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        reference = extract_answer(reference_text(conversation))
        if reference is None:
            raise ValueError("the reference answer has no '#### N' line")
        return extract_answer(completion) == reference

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))
