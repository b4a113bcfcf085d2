"""GSM8K: grade-school math word problems whose answers use a calculator tool, scored generatively.

Contract:
- `GSM8K(subset="main" | "socratic", split="train" | "test")`: 7,473 / 1,319 rows in file order (the hub's
  order). Local layout: `<data_dir>/gsm8k/{train,test}.jsonl` (socratic: `test_socratic.jsonl`, test only);
  the hub: openai/gsm8k.
- Each calculator span `<<expr=result>>` becomes a "python" part (expr) and a "python_output" part (result),
  split at the last "="; the text parts alone read exactly as published ("48/2 = 24 clips").
- `evaluate` compares the number after the last "#### " (commas removed, as OpenAI's grade-school-math does)
  with the reference's; `reward` is the same as a float for RL.

Not here: running the python parts (the engine does, at inference).
"""

import os
import re

from tasks.common import Task, check_choice, load_rows, read_jsonl

CALCULATOR_SPAN = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def extract_answer(text: str) -> str | None:
    """The number after "#### " (the last one if several), commas removed; None when there is none."""
    matches = FINAL_ANSWER.findall(text)
    return matches[-1].replace(",", "").rstrip(".") if matches else None


def answer_to_parts(answer: str) -> list[dict]:
    """Splits a GSM8K answer into text / python / python_output parts at its `<<expr=result>>` spans."""
    parts = []
    for i, piece in enumerate(CALCULATOR_SPAN.split(answer)):  # text, span, text, ..., text (spans at odd i)
        if i % 2:
            expression, _, result = piece.rpartition("=")
            parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
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
        check_choice("GSM8K subset", subset, ("main", "socratic"))
        check_choice("GSM8K split", split, ("train", "test"))
        self.subset, self.split = subset, split
        self.rows = load_rows(data_dir, ("openai/gsm8k", subset, split), self._read_local)

    def _read_local(self, data_dir: str) -> list[dict]:
        if self.subset == "socratic" and self.split == "train":
            raise FileNotFoundError("GSM8K socratic train has no local file (only test_socratic.jsonl)")
        name = f"{self.split}_socratic.jsonl" if self.subset == "socratic" else f"{self.split}.jsonl"
        return read_jsonl(os.path.join(data_dir, "gsm8k", name), f"GSM8K {self.subset} {self.split}")

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        user = {"role": "user", "content": row["question"]}
        return {"messages": [user, {"role": "assistant", "content": answer_to_parts(row["answer"])}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        reference = extract_answer(reference_text(conversation))
        if reference is None:
            raise ValueError("the reference answer has no '#### N' line")
        return extract_answer(completion) == reference

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))
