"""CORE scoring checked on hand-built examples with stub models, then on the real bundle end to end.

The stubs make the right answer known by construction: a unigram stub gives every position the same logits
(so a token's loss is fixed wherever it appears), a bigram stub's logits depend only on the current token (so
a context can favour a continuation). A word-level tokenizer keeps token boundaries obvious.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import SHARED_DATA, require
from nanochat import core_eval
from nanochat.core_eval import (
    CoreResult,
    TaskResult,
    TaskSpec,
    build_prompts,
    centered_accuracy,
    evaluate_core,
    evaluate_example,
    fewshot_indices,
    load_examples,
    load_task_specs,
    score_options,
    task_path,
    tokenize_options,
)

BUNDLE = os.path.join(SHARED_DATA, "core", "eval_bundle")
MISSING_LABELS = ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]


class WordTokenizer:
    """One token per whitespace-separated word from a fixed vocabulary; id 0 is BOS."""

    def __init__(self, words):
        self.words = ["<bos>", *words]
        self.ids = {word: i for i, word in enumerate(self.words)}

    def get_bos_token_id(self):
        return 0

    def encode(self, texts, prepend=None):
        rows = [[self.ids[word] for word in text.split()] for text in texts]
        return [([prepend] if prepend is not None else []) + row for row in rows]


class UnigramStub(torch.nn.Module):
    """The same logits at every position; refuses sequences longer than max_seq_len."""

    def __init__(self, logits, max_seq_len=None):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)
        self.max_seq_len = max_seq_len

    def forward(self, idx):
        assert self.max_seq_len is None or idx.size(1) <= self.max_seq_len, "sequence longer than the context"
        return self.logits.expand(idx.size(0), idx.size(1), -1)


class BigramStub(UnigramStub):
    """logits[b, t] = table[idx[b, t]]: what comes next depends only on the current token."""

    def forward(self, idx):
        assert self.max_seq_len is None or idx.size(1) <= self.max_seq_len, "sequence longer than the context"
        return self.logits[idx]


def spec(task_type, shots=0, delimiter=" ", baseline=0.25):
    return TaskSpec("t", "x.jsonl", task_type, shots, delimiter, baseline, None)


# ---------------------------------------------------------------------------- multiple choice


def test_multiple_choice_picks_the_lowest_mean_loss_not_the_lowest_sum():
    tokenizer = WordTokenizer(["Q", "x", "y", "z"])
    # loss of token v = logsumexp(logits) - logits[v]: x costs c, y costs c - 2, z costs c + 1 (c > 2).
    model = UnigramStub([0.0, 0.0, 0.0, 2.0, -1.0])
    example = {"query": "Q", "choices": ["x", "y z"], "gold": 1}
    # mean: x = c, "y z" = c - 0.5 -> choice 1; a summed loss would pick choice 0 (c < 2c - 1).
    assert evaluate_example(model, tokenizer, spec("multiple_choice"), [example], 0, "cpu", None)
    assert not evaluate_example(model, tokenizer, spec("multiple_choice"), [{**example, "gold": 0}], 0, "cpu", None)


def test_scored_losses_are_the_continuation_tokens_only():
    tokenizer = WordTokenizer(["Q", "x", "y", "z"])
    logits = torch.tensor([0.0, 5.0, 0.0, 2.0, -1.0])  # Q is cheap: counting the context would change the means
    model = UnigramStub(logits.tolist())
    contexts, fulls = build_prompts(spec("multiple_choice"), [{"query": "Q Q", "choices": ["x", "y z"], "gold": 0}], 0)
    options = tokenize_options(tokenizer, contexts, fulls, None)
    assert options == [([0, 1, 1, 2], 3, 4), ([0, 1, 1, 3, 4], 3, 5)]
    mean_losses, exact = score_options(model, options, 0, "cpu")
    losses = torch.logsumexp(logits, 0) - logits
    assert mean_losses.tolist() == pytest.approx([losses[2].item(), (losses[3] + losses[4]).item() / 2])
    assert exact.tolist() == [False, False]  # argmax is always Q


# ---------------------------------------------------------------------------- schema


def test_schema_scores_the_shared_continuation_under_each_context():
    tokenizer = WordTokenizer(["because", "A", "B", "feared", "violence"])
    table = torch.zeros(6, 6)
    table[2, 4] = 3.0  # after "A", "feared" is likely
    table[3, 4] = -3.0  # after "B", it is not
    table[1, 3] = 10.0  # "because B" is a far likelier context than "because A": scoring it would flip the answer
    model = BigramStub(table.tolist())
    example = {"context_options": ["because A", "because B"], "continuation": "feared violence", "gold": 0}
    assert evaluate_example(model, tokenizer, spec("schema", baseline=0.5), [example], 0, "cpu", None)
    assert not evaluate_example(model, tokenizer, spec("schema"), [{**example, "gold": 1}], 0, "cpu", None)


# ---------------------------------------------------------------------------- language modeling


def chain_model(words, chain, max_seq_len=None):
    """A bigram stub whose greedy continuation follows `chain` (word -> next word)."""
    tokenizer = WordTokenizer(words)
    table = torch.zeros(len(words) + 1, len(words) + 1)
    for word, following in chain.items():
        table[tokenizer.ids[word], tokenizer.ids[following]] = 5.0
    return tokenizer, BigramStub(table.tolist(), max_seq_len)


def test_language_modeling_needs_every_continuation_token_greedy():
    tokenizer, model = chain_model(["the", "cat", "sat", "ran"], {"the": "cat", "cat": "sat"})
    lm = spec("language_modeling", baseline=0.0)
    assert evaluate_example(model, tokenizer, lm, [{"context": "the", "continuation": "cat sat"}], 0, "cpu", None)
    assert not evaluate_example(model, tokenizer, lm, [{"context": "the", "continuation": "cat ran"}], 0, "cpu", None)
    assert not evaluate_example(model, tokenizer, lm, [{"context": "the", "continuation": "sat sat"}], 0, "cpu", None)


def test_long_prompts_are_cropped_from_the_left_keeping_the_continuation():
    words = ["w", "the", "cat", "sat"]
    tokenizer, model = chain_model(words, {"the": "cat", "cat": "sat"}, max_seq_len=4)
    example = {"context": "w w w w w w the", "continuation": "cat sat"}
    options = tokenize_options(tokenizer, *build_prompts(spec("language_modeling"), [example], 0), max_seq_len=4)
    tokens, start, end = options[0]
    assert tokens == [1, 2, 3, 4] and tokens[start:end] == [3, 4]  # "w the" + "cat sat": BOS and the oldest words go
    assert evaluate_example(model, tokenizer, spec("language_modeling"), [example], 0, "cpu", 4)
    with pytest.raises(AssertionError, match="longer than the context"):  # the stub really has a short context
        evaluate_example(model, tokenizer, spec("language_modeling"), [example], 0, "cpu", None)


# ---------------------------------------------------------------------------- prompts, formula, reporting


def test_fewshot_examples_are_deterministic_and_exclude_the_example():
    for index in range(20):
        shots = fewshot_indices(index, 20, 5)
        assert shots == fewshot_indices(index, 20, 5) and index not in shots and len(set(shots)) == 5
    assert fewshot_indices(3, 20, 5) != fewshot_indices(4, 20, 5)
    assert fewshot_indices(0, 3, 10) == fewshot_indices(0, 3, 10) and sorted(fewshot_indices(0, 3, 10)) == [1, 2]
    examples = [{"context": f"c{i}", "continuation": f"a{i}"} for i in range(6)]
    contexts, fulls = build_prompts(spec("language_modeling", shots=2, delimiter=" ="), examples, 4)
    first, second = fewshot_indices(4, 6, 2)
    assert contexts == [f"c{first} =a{first}\n\nc{second} =a{second}\n\nc4 ="]
    assert fulls == [contexts[0] + "a4"]


def test_centered_accuracy_and_baselines_as_fractions():
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.625, 0.25) == pytest.approx(0.5)
    assert centered_accuracy(0.0, 0.5) == -1.0
    specs = {s.label: s for s in load_task_specs(require(BUNDLE))}
    assert specs["arc_easy"].baseline == 0.25 and specs["copa"].baseline == 0.5 and specs["jeopardy"].baseline == 0.0
    assert specs["bigbench_language_identification"].baseline == pytest.approx(0.091)


def test_missing_task_is_reported_and_excluded(tmp_path):
    (tmp_path / "eval_data").mkdir()
    (tmp_path / "core.yaml").write_text(
        "icl_tasks:\n"
        "- {label: present, dataset_uri: present.jsonl, num_fewshot: [0], icl_task_type: language_modeling}\n"
        "- {label: absent, dataset_uri: absent.jsonl, num_fewshot: [0], icl_task_type: multiple_choice}\n"
    )
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline,#datapoints\npresent,0,2\nabsent,25,100\n")
    lines = [{"context": "the", "continuation": "cat"}, {"context": "the", "continuation": "sat"}]
    (tmp_path / "eval_data" / "present.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokenizer, model = chain_model(["the", "cat", "sat"], {"the": "cat"})
    logged = []
    result = evaluate_core(model, tokenizer, str(tmp_path), log=logged.append)
    assert result.missing == ["absent"] and [t.label for t in result.evaluated] == ["present"]
    assert result.core == 0.5  # one of two right, baseline 0: only the present task counts
    assert result.summary() == "CORE 0.5000 over 1 of 2 tasks; missing: absent"
    assert any("absent: missing" in line for line in logged)


def test_core_is_the_mean_of_centered_accuracies():
    result = CoreResult(
        [
            TaskResult("a", "schema", 0, 0.5, 10, None, 10, 0.75, centered_accuracy(0.75, 0.5)),
            TaskResult("b", "language_modeling", 0, 0.0, 10, None, 10, 0.1, 0.1),
            TaskResult("c", "multiple_choice", 0, 0.25),  # missing
        ]
    )
    assert result.core == pytest.approx((0.5 + 0.1) / 2)
    assert result.summary().startswith("CORE 0.3000 over 2 of 3 tasks; missing: c")


def test_download_unzips_the_bundle_under_the_base_dir(tmp_path, monkeypatch):
    import io
    import zipfile

    import requests

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:  # the published zip's layout: one top-level eval_bundle/ folder
        z.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
        z.writestr("eval_bundle/eval_data/world_knowledge/x.jsonl", "{}\n")

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def raise_for_status(self):
            pass

        def iter_content(self, size):
            data = archive.getvalue()
            return (data[i : i + size] for i in range(0, len(data), size))

    monkeypatch.setattr(requests, "get", lambda url, **kwargs: Response())
    bundle = core_eval.ensure_bundle(base_dir=str(tmp_path))
    assert bundle == str(tmp_path / "eval_bundle")
    assert (tmp_path / "eval_bundle" / "eval_data" / "world_knowledge" / "x.jsonl").exists()
    assert sorted(os.listdir(tmp_path)) == ["eval_bundle"]  # no zip or staging folder left behind
    monkeypatch.setattr(requests, "get", None)  # a second call finds it on disk and never downloads
    assert core_eval.ensure_bundle(base_dir=str(tmp_path)) == bundle


def test_offline_download_says_to_pass_bundle(tmp_path, monkeypatch):
    import requests

    from nanochat.dataset import DatasetError

    def refuse(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(requests, "get", refuse)
    with pytest.raises(DatasetError, match="--bundle PATH"):  # base_eval's one_line_errors makes it one line
        core_eval.ensure_bundle(base_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no core.yaml"):
        core_eval.ensure_bundle(str(tmp_path))


# ---------------------------------------------------------------------------- the real bundle

FILE_ROWS = {
    "jeopardy": 2117, "bigbench_qa_wikidata": 20321, "arc_easy": 2376, "arc_challenge": 1172, "copa": 100,
    "commonsense_qa": 1221, "piqa": 1838, "openbook_qa": 500, "lambada_openai": 5153, "winograd": 273,
    "winogrande": 1267, "bigbench_dyck_languages": 1000, "agi_eval_lsat_ar": 230, "bigbench_cs_algorithms": 1320,
    "bigbench_operators": 210, "bigbench_repeat_copy_logic": 32, "boolq": 3270,
    "bigbench_language_identification": 10000,
}  # fmt: skip
RECORD_KEYS = {
    "multiple_choice": {"query", "choices", "gold"},
    "schema": {"context_options", "continuation", "gold"},
    "language_modeling": {"context", "continuation"},
}


def test_real_bundle_parses_with_honest_row_counts():
    specs = load_task_specs(require(BUNDLE))
    assert len(specs) == 22
    present = {s.label for s in specs if os.path.exists(task_path(BUNDLE, s))}
    assert sorted({s.label for s in specs} - present) == sorted(MISSING_LABELS)
    files = {s.dataset_uri for s in specs}
    assert len(files) == 21  # hellaswag.jsonl serves two tasks (0-shot and 10-shot)
    assert len({s.dataset_uri for s in specs if s.label in present}) == 18  # 3 files absent
    for s in specs:
        if s.label not in present:
            continue
        examples = load_examples(task_path(BUNDLE, s))
        assert len(examples) == FILE_ROWS[s.label], s.label
        assert all(RECORD_KEYS[s.task_type] <= set(e) for e in examples), s.label
        if s.label == "arc_challenge":
            assert s.csv_rows == 2376  # eval_meta_data.csv copies arc_easy's count; the file has 1,172
        else:
            assert s.csv_rows == len(examples), s.label


@pytest.fixture(scope="module")
def tiny_tokenizer(wiki_docs):
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.train_from_iterator(wiki_docs[:300], 512)


def tiny_model(vocab_size, depth=1):
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT.build(GPTConfig.from_depth(depth, vocab_size, sequence_len=512)).eval()


@pytest.mark.slow  # 6 s alone, 13 s on a loaded 2-core machine
def test_core_on_the_real_bundle_with_a_tiny_model_covers_18_tasks(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer.get_vocab_size())
    result = evaluate_core(model, tiny_tokenizer, require(BUNDLE), max_per_task=8)
    assert len(result.tasks) == 22 and len(result.evaluated) == 18
    assert sorted(result.missing) == sorted(MISSING_LABELS)
    assert all(t.examples == 8 and 0.0 <= t.accuracy <= 1.0 for t in result.evaluated)
    assert -1.0 <= result.core <= 1.0
    assert result.summary().startswith(f"CORE {result.core:.4f} over 18 of 22 tasks; missing: ")
    again = evaluate_core(model, tiny_tokenizer, BUNDLE, max_per_task=8, tasks=["copa", "winograd", "jeopardy"])
    by_label = {t.label: t.accuracy for t in result.tasks}
    assert all(t.accuracy == by_label[t.label] for t in again.tasks)  # deterministic prompts and subsets
    with pytest.raises(ValueError, match="unknown CORE task labels"):
        evaluate_core(model, tiny_tokenizer, BUNDLE, tasks=["copa", "hellaswag_10shot"])


@pytest.fixture(scope="module")
def checkpoint_base_dir(tiny_tokenizer, tmp_path_factory):
    """A base dir holding the throwaway tokenizer and a depth-1 checkpoint at step 7, as base_train leaves it."""
    from nanochat.checkpoint import save_checkpoint

    base_dir = tmp_path_factory.mktemp("base")
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    save_checkpoint(str(base_dir / "base_checkpoints" / "d1"), 7, tiny_model(tiny_tokenizer.get_vocab_size()))
    return base_dir


def read_saved(base_dir):
    with open(base_dir / "base_eval" / "core_d1_000007.json") as f:
        return json.load(f)


def test_base_eval_end_to_end_on_a_saved_checkpoint(checkpoint_base_dir, monkeypatch, capsys):
    from scripts import base_eval

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(checkpoint_base_dir))
    monkeypatch.setenv("NANOCHAT_DEVICE", "cpu")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", os.path.dirname(os.path.dirname(require(BUNDLE))))  # no --bundle
    result = base_eval.main(["--max-per-task", "4"])
    printed = capsys.readouterr().out
    assert "evaluating at most 4 examples per task (as given; --max-per-task to change)" in printed
    assert "over 18 of 22 tasks; missing: hellaswag_zeroshot, hellaswag, squad, coqa" in printed
    assert "arc_challenge" in printed and "missing" in printed
    saved = read_saved(checkpoint_base_dir)
    assert saved["core"] == pytest.approx(result.core) and saved["tasks_covered"] == 18
    assert saved["missing"] == MISSING_LABELS and len(saved["tasks"]) == 22
    assert (checkpoint_base_dir / "base_eval" / "core_d1_000007.csv").read_text().startswith("task,type,shots")
    card = json.loads((checkpoint_base_dir / "report" / "base_eval.json").read_text())  # the report card's summary
    assert card["core"] == pytest.approx(result.core) and len(card["tasks"]) == 18
    assert (card["model_tag"], card["step"]) == ("d1", 7)  # the stage-summary contract


def test_base_eval_sizes_itself_to_the_cpu_says_so_and_shows_progress(checkpoint_base_dir, monkeypatch, capsys):
    from nanochat import dataset
    from scripts import base_eval

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(checkpoint_base_dir))
    monkeypatch.setattr(dataset, "PROGRESS_EVERY_S", 0.0)  # a progress line per example
    base_eval.main(["--bundle", require(BUNDLE), "--tasks", "copa", "winograd", "--device-type", "cpu"])
    printed = capsys.readouterr().out
    limit = base_eval.CPU_MAX_PER_TASK  # copa has 100 examples, winograd 273: the CPU takes the first 20 of each
    assert f"evaluating at most {limit} examples per task (CPU default; --max-per-task to change)" in printed
    assert f"CORE copa: 50.0% {limit // 2}/{limit} examples, " in printed and " min elapsed, ETA " in printed
    assert f"CORE: 50.0% 1/2 tasks, {limit}/{2 * limit} examples, " in printed
    assert f"CORE winograd: 100.0% {limit}/{limit} examples" in printed
    assert read_saved(checkpoint_base_dir)["max_per_task"] == limit


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(checkpoint_base_dir):
    """Examples strided over two ranks, correctness summed: the same accuracies as one process."""
    # 9 examples per task: the ranks get 5 and 4, so an uneven split is covered.
    args = ["-m", "scripts.base_eval", "--bundle", require(BUNDLE), "--max-per-task", "9",
            "--tasks", "copa", "winograd", "jeopardy", "arc_easy"]  # fmt: skip
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(checkpoint_base_dir),
        "NANOCHAT_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, *args], cwd=repo, env=env, check=True, capture_output=True, timeout=300)
    single = read_saved(checkpoint_base_dir)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launched = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", *args], cwd=repo, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    double = read_saved(checkpoint_base_dir)
    assert [t["examples"] for t in double["tasks"]] == [9, 9, 9, 9]
    assert [t["accuracy"] for t in double["tasks"]] == [t["accuracy"] for t in single["tasks"]]
    assert double["core"] == single["core"]


# ---------------------------------------------------------------------------- Hugging Face models


def test_hugging_face_model_and_tokenizer(tiny_tokenizer, tmp_path):
    """A tiny random GPT-2 with a 64-token context: CORE's 10-shot prompts only fit after left-cropping."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from nanochat.core_eval import HuggingFaceModel, HuggingFaceTokenizer

    config = transformers.GPT2Config(
        vocab_size=tiny_tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=1, n_head=2
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    model = HuggingFaceModel(str(tmp_path / "model"), "cpu")
    assert core_eval.model_max_seq_len(model) == 64
    result = evaluate_core(model, tiny_tokenizer, require(BUNDLE), max_per_task=3, tasks=["arc_easy", "jeopardy"])
    assert [t.examples for t in result.tasks] == [3, 3]

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<eos>": 0, "[UNK]": 1, "a": 2, "b": 3}, "[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tokenizer")
    tokenizer = HuggingFaceTokenizer(str(tmp_path / "tokenizer"))
    assert tokenizer.get_bos_token_id() == 0  # no BOS: GPT-2 style, its EOS opens every row
    assert tokenizer.encode(["a b", "b"], prepend=0) == [[0, 2, 3], [0, 3]]
