"""AI2 ARC (ARC-Easy, ARC-Challenge): grade-school science questions, multiple choice, scored categorically.

Contract:
- `ARC(subset="ARC-Easy" | "ARC-Challenge", split="train" | "validation" ("dev") | "test")`, in the hub's order.
- Local layout: `<data_dir>/arc/<subset>/<subset>-{Train,Dev}.jsonl` (no test split); the hub: allenai/ai2_arc.
- Labels as published: ~4% of rows use "1".."4" instead of "A".."D", a few have 3 or 5 choices; each label is
  one character, hence one token.
"""

import os

from tasks.common import MultipleChoice, check_choice, load_rows, mc_conversation, read_jsonl

SUBSETS = ("ARC-Easy", "ARC-Challenge")
LOCAL_SPLIT_NAMES = {"train": "Train", "validation": "Dev"}


class ARC(MultipleChoice):
    def __init__(self, subset: str, split: str, data_dir: str | None = None, **slice_args):
        super().__init__(**slice_args)
        split = "validation" if split == "dev" else split
        check_choice("ARC subset", subset, SUBSETS)
        check_choice("ARC split", split, ("train", "validation", "test"))
        self.subset, self.split = subset, split
        self.rows = load_rows(data_dir, ("allenai/ai2_arc", subset, split), self._read_local)

    def _read_local(self, data_dir: str) -> list[dict]:
        if self.split not in LOCAL_SPLIT_NAMES:
            raise FileNotFoundError(f"ARC {self.split!r} split has no local file (only train and validation/dev do)")
        name = f"{self.subset}-{LOCAL_SPLIT_NAMES[self.split]}.jsonl"
        return read_jsonl(os.path.join(data_dir, "arc", self.subset, name), f"ARC {self.subset} {self.split}")

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
