"""MMLU: 57 subjects of four-way multiple-choice questions, scored categorically.

Contract:
- `MMLU(subset="all" | "<subject>" | "auxiliary_train", split="dev" | "validation" ("val") | "test" | "train")`:
  dev 285, validation 1,531, test 14,042 rows; "all" = the subjects alphabetically, as cais/mmlu's "all" on the hub.
- Local layout: `<data_dir>/mmlu/{dev,val,test}/<subject>_{dev,val,test}.csv`, no header: question, A, B, C, D,
  answer letter (the Hendrycks release). "auxiliary_train" (~100K rows, split "train") is on the hub only.

Not here: few-shot prompts built from the dev split (nanochat evaluates chat models zero-shot).
"""

import csv
import os

from tasks.common import MultipleChoice, check_choice, load_rows, mc_conversation, require_file

LETTERS = ("A", "B", "C", "D")
LOCAL_SPLIT_NAMES = {"dev": "dev", "validation": "val", "test": "test"}


class MMLU(MultipleChoice):
    def __init__(self, subset: str = "all", split: str = "test", data_dir: str | None = None, **slice_args):
        super().__init__(**slice_args)
        split = "validation" if split == "val" else split
        check_choice(f"MMLU {subset} split", split, ("train",) if subset == "auxiliary_train" else LOCAL_SPLIT_NAMES)
        self.subset, self.split = subset, split
        self.rows = load_rows(data_dir, ("cais/mmlu", subset, split), self._read_local)

    def _read_local(self, data_dir: str) -> list[dict]:
        """Local CSV rows in the hub's row format: {question, subject, choices, answer index}."""
        if self.subset == "auxiliary_train":
            raise FileNotFoundError("MMLU auxiliary_train is on the hub only (cais/mmlu): load it without data_dir "
                                    "(and unset NANOCHAT_DATA_DIR) where the hub can be reached")  # fmt: skip
        split_dir = os.path.join(data_dir, "mmlu", LOCAL_SPLIT_NAMES[self.split])
        suffix = f"_{LOCAL_SPLIT_NAMES[self.split]}.csv"
        require_file(split_dir, f"MMLU {self.split}")
        subjects = sorted(name[: -len(suffix)] for name in os.listdir(split_dir) if name.endswith(suffix))
        if self.subset != "all":
            if self.subset not in subjects:
                raise ValueError(f"MMLU has no subject {self.subset!r}; subjects: {', '.join(subjects)}")
            subjects = [self.subset]
        rows = []
        for subject in subjects:
            path = os.path.join(split_dir, subject + suffix)
            with open(path, encoding="utf-8", newline="") as f:
                for line, fields in enumerate(csv.reader(f), start=1):
                    if len(fields) != 6 or fields[5] not in LETTERS:
                        raise ValueError(f"{path}:{line}: expected question,A,B,C,D,answer letter; got {fields!r:.100}")
                    answer = LETTERS.index(fields[5])
                    rows.append({"question": fields[0], "subject": subject, "choices": fields[1:5], "answer": answer})
        return rows

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if "train" in row:  # the hub's auxiliary_train config nests each row under a "train" column
            row = row["train"]
        letters, subject = list(LETTERS), row["subject"]
        return mc_conversation(row["question"], letters, row["choices"], LETTERS[row["answer"]], subject=subject)
