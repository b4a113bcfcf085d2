"""MMLU: 57 subjects of four-way multiple-choice questions, scored categorically.

Contract:
- `MMLU(subset="all" | "<subject>" | "auxiliary_train", split="dev" | "validation" | "test" | "train")`;
  "val" means "validation". Sizes: dev 285, validation 1,531, test 14,042 over the 57 subjects.
- Order: "all" is the subjects in alphabetical order of their names, each subject's rows in file order. This
  is the order of cais/mmlu's "all" config on the hub, so local and hub runs see the same rows.
- Local layout: `<data_dir>/mmlu/{dev,val,test}/<subject>_{dev,val,test}.csv`, no header, columns question,
  A, B, C, D, answer letter (the original Hendrycks release). The hub: cais/mmlu.
- "auxiliary_train" (about 100K questions from ARC, MCTest, OBQA and RACE, split "train") exists only on the
  hub; asking for it with a local data directory is an error rather than a silent substitute.

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
            raise FileNotFoundError(
                "MMLU auxiliary_train exists only on the Hugging Face hub (cais/mmlu), not in the local data "
                "directory: load it without data_dir (and unset NANOCHAT_DATA_DIR) on a machine that can reach the hub"
            )
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
        return mc_conversation(
            row["question"], list(LETTERS), row["choices"], LETTERS[row["answer"]], subject=row["subject"]
        )
