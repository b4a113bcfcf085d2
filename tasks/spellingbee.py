"""Synthetic spelling tasks from an English word list: counting letters (SpellingBee) and spelling (SimpleSpelling).

Small models see tokens, not letters, so they cannot count the r's in "strawberry"; these tasks teach spelling a
word out, counting along the spelling, and checking the count with the python tool.

Contract:
- `SpellingBee(size, split="train" | "test", data_dir=None)`, `SimpleSpelling(...)`: `size` examples; example i
  is drawn with `random.Random(task seed + split seed + i)`, the same on every run and rank.
- Words: `<data_dir>/words/words_alpha.txt` (dwyl/english-words, 370,099 words); there is no hub copy.
- SpellingBee's answer spells the word, keeps a running count, calls `'word'.count('x')` and ends "#### N";
  `evaluate` compares the numbers. SimpleSpelling: "Spell the word: apple" -> "apple:a,p,p,l,e", exactly.

Not here: words outside the list, or letters other than a-z.
"""

import functools
import os
import random
import string

from tasks.common import Task, check_choice, require_file, resolve_data_dir
from tasks.gsm8k import extract_answer, reference_text

# Far apart so that train and test examples come from different random streams (same scheme per task; the
# task offsets keep SpellingBee and SimpleSpelling example i from drawing the same word).
SPLIT_SEEDS = {"train": 0, "test": 10_000_000}
SPELLING_BEE_SEED = 1_000_000_000
SIMPLE_SPELLING_SEED = 2_000_000_000
LETTER_FROM_WORD_PROBABILITY = 0.9  # else a random letter, so that "0" is sometimes the answer

QUESTION_TEMPLATES = (
    "How many {letter} are in the word {word}?",
    "How many times does the letter '{letter}' appear in '{word}'?",
    "Count the number of '{letter}' in {word}",
    "how many {letter}s in {word}",
    'In the word "{word}", how many times does "{letter}" occur?',
)


@functools.lru_cache(maxsize=4)
def load_words(data_dir: str | None = None) -> tuple[str, ...]:
    """The word list in file order (line ends stripped, blank lines skipped)."""
    resolved = resolve_data_dir(data_dir)
    if resolved is None:
        raise FileNotFoundError("the spelling tasks read words/words_alpha.txt (no hub copy): pass data_dir= or set "
                                "NANOCHAT_DATA_DIR to a data directory holding it")  # fmt: skip
    path = require_file(os.path.join(resolved, "words", "words_alpha.txt"), "the English word list")
    with open(path, encoding="utf-8") as f:
        return tuple(word for word in (line.strip() for line in f) if word)


class _GeneratedTask(Task):
    """`size` examples, example i generated from random.Random(task seed + split seed + i)."""

    task_seed = 0

    def __init__(self, size: int = 1000, split: str = "train", data_dir: str | None = None, **slice_args):
        super().__init__(**slice_args)
        check_choice("split", split, SPLIT_SEEDS)
        self.split, self.words = split, load_words(data_dir)
        self.rows = range(size)  # example i is generated on demand

    def rng_for(self, index: int) -> random.Random:
        return random.Random(self.task_seed + SPLIT_SEEDS[self.split] + index)


class SpellingBee(_GeneratedTask):
    eval_type = "generative"
    task_seed = SPELLING_BEE_SEED

    def get_example(self, index: int) -> dict:
        rng = self.rng_for(index)
        word = rng.choice(self.words)
        letter = rng.choice(word if rng.random() < LETTER_FROM_WORD_PROBABILITY else string.ascii_lowercase)
        question = rng.choice(QUESTION_TEMPLATES).format(letter=letter, word=word)
        count = word.count(letter)
        tally = [f"{character}:{word[: i + 1].count(letter)}" for i, character in enumerate(word)]  # running count
        spelled = (
            f"We need to count the letter '{letter}' in the word '{word}'. Let me spell it out first:\n"
            f"{word}:{','.join(word)}\n\n"
            f"Now I count the '{letter}'s along the spelling, keeping a running total:\n"
            f"{','.join(tally)}\n\n"
            f"That makes {count}. Let me check with Python:\n\n"
        )
        parts = [("text", spelled), ("python", f"'{word}'.count('{letter}')"), ("python_output", str(count)),
                 ("text", f"\n\nPython agrees: {count}.\n\n#### {count}")]  # fmt: skip
        parts = [{"type": kind, "text": text} for kind, text in parts]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
        return {"messages": messages, "word": word, "letter": letter}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return extract_answer(completion) == extract_answer(reference_text(conversation))


class SimpleSpelling(_GeneratedTask):
    eval_type = "generative"
    task_seed = SIMPLE_SPELLING_SEED

    def get_example(self, index: int) -> dict:
        word = self.rng_for(index).choice(self.words)
        user, answer = f"Spell the word: {word}", f"{word}:{','.join(word)}"
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "word": word}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
