"""AI2 ARC (ARC-Easy, ARC-Challenge): grade-school science questions, multiple choice, scored categorically.

Contract:
- `ARC(subset="ARC-Easy" | "ARC-Challenge", split="train" | "validation" | "test")`, "dev" meaning
  "validation" (the local files call it Dev). Rows in file order, the same as the hub's order.
- Local layout: `<data_dir>/arc/<subset>/<subset>-{Train,Dev}.jsonl`; the hub: allenai/ai2_arc.
- Each conversation is the `render_mc` prompt and the answer label, with "letters" for the evaluator. The
  labels are kept as published: about 4% of rows use "1".."4" instead of "A".."D", and a few have 3 or 5
  choices; every label is a single character, hence a single token.

Not here: the test split locally (it was not downloaded), or any few-shot prompting.
"""

import json
import os

from tasks.common import Task, evaluate_letter, load_hub_rows, mc_conversation, require_file, resolve_data_dir

SUBSETS = ("ARC-Easy", "ARC-Challenge")
LOCAL_SPLIT_NAMES = {"train": "Train", "validation": "Dev"}


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, data_dir: str | None = None, **slice_args):
        super().__init__(**slice_args)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        split = "validation" if split == "dev" else split
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation (dev) or test, got {split!r}")
        self.subset, self.split = subset, split
        data_dir = resolve_data_dir(data_dir)
        if data_dir is None:
            self.rows = load_hub_rows("allenai/ai2_arc", subset, split)
        else:
            self.rows = _read_local(data_dir, subset, split)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        # Hub rows: question is a string and choices {"text": [...], "label": [...]}; local rows nest both
        # under "question" as the original AI2 release does. Both carry id and answerKey.
        if isinstance(row["question"], dict):
            question = row["question"]["stem"]
            choices = [choice["text"] for choice in row["question"]["choices"]]
            letters = [choice["label"] for choice in row["question"]["choices"]]
        else:
            question, choices, letters = row["question"], row["choices"]["text"], row["choices"]["label"]
        return mc_conversation(question, letters, choices, row["answerKey"], id=row["id"])

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return evaluate_letter(conversation, completion)


def _read_local(data_dir: str, subset: str, split: str) -> list[dict]:
    if split not in LOCAL_SPLIT_NAMES:
        raise FileNotFoundError(f"ARC {split!r} split has no local file (only train and validation/dev do)")
    path = os.path.join(data_dir, "arc", subset, f"{subset}-{LOCAL_SPLIT_NAMES[split]}.jsonl")
    with open(require_file(path, f"ARC {subset} {split}"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
