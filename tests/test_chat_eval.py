"""tasks.evaluate and scripts.chat_eval: categorical and generative scoring on real rows of the local data,
ChatCORE, the CLI.

Scripted models make the right answer known by construction: a letter oracle whose logits at a prompt's last
position favour that question's answer (or a wrong letter), and a model that, after a prompt, says a chosen
text token by token through the real Engine. A tiny random GPT checks batching and runs the whole script.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, require
from nanochat.checkpoint import build_model
from nanochat.engine import Completion, ContextFullError, Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
from scripts import chat_eval
from tasks import evaluate
from tasks.evaluate import (
    ALL_TASKS,
    TaskResult,
    chatcore,
    evaluate_categorical,
    evaluate_generative,
    evaluate_task,
    last_position_logits,
    letter_token_ids,
    load_task,
    predict_choices,
)
from tasks.gsm8k import extract_answer, reference_text


@pytest.fixture(scope="module")
def data_dir():
    return require(SHARED_DATA)


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    return small_tokenizer


def random_gpt(vocab_size: int, sequence_len: int = 1024, seed: int = 0) -> GPT:
    """A depth-1 GPT with every weight random: GPT's init zeroes the output projections, which would make the
    last position's logits depend on the last token alone (always <|assistant_start|> here)."""
    torch.manual_seed(seed)
    model = GPT.build(GPTConfig.from_depth(1, vocab_size, sequence_len=sequence_len))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2 and not parameter.any():
                parameter.normal_(0.0, parameter.size(1) ** -0.5)
    return model.eval()


# ---------------------------------------------------------------------------- categorical


class LetterOracle(torch.nn.Module):
    """logits[b, t] = `favour[prefix]` when the prefix idx[b, :t + 1] is one of the known prompts, else zeros.

    Only a prompt's own last position sees its scripted logits; a padded position sees zeros, so scoring the
    wrong position shows up as a wrong answer.
    """

    def __init__(self, favour: dict[tuple, dict[int, float]], vocab_size: int, sequence_len: int = 4096):
        super().__init__()
        self.favour, self.vocab_size = favour, vocab_size
        self.config = GPTConfig(
            sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8
        )
        self.calls = []  # batch size of each forward

    def forward(self, idx, logits_to_keep=0):
        B, T = idx.shape
        self.calls.append(B)
        start = T - logits_to_keep if logits_to_keep else 0
        logits = torch.zeros(B, T - start, self.vocab_size)
        rows = idx.tolist()
        for b in range(B):
            for t in range(start, T):
                for token, value in self.favour.get(tuple(rows[b][: t + 1]), {}).items():
                    logits[b, t - start, token] = value
        return logits


def arc_rows(data_dir, count=12):
    return load_task("ARC-Easy", data_dir, "validation")[:count]


def test_answer_letters_are_single_tokens_with_the_small_tokenizer(data_dir, tokenizer):
    letters = set()
    for name in ("ARC-Easy", "ARC-Challenge"):
        task = load_task(name, data_dir, "validation")
        letters |= {letter for i in range(len(task)) for letter in task[i]["letters"]}
    letters |= set(load_task("MMLU", data_dir)[0]["letters"])
    assert {"A", "B", "C", "D", "E", "1", "2", "3", "4"} <= letters
    ids = letter_token_ids(tokenizer, sorted(letters))
    assert len(set(ids)) == len(letters)
    # The assistant's answer is that very token: rendered, the reply is <|assistant_start|> letter <|assistant_end|>.
    conversation = arc_rows(data_dir, 1)[0]
    rendered, _ = tokenizer.render_conversation(conversation)
    prompt = tokenizer.render_for_completion(conversation)
    answer = conversation["messages"][-1]["content"]
    assert rendered[len(prompt) :] == [
        *letter_token_ids(tokenizer, [answer]),
        tokenizer.encode_special("<|assistant_end|>"),
    ]


def test_multi_token_letter_is_refused():
    class TwoTokens:
        def encode(self, text):
            return [1, 2] if text == "AB" else [3]

    assert letter_token_ids(TwoTokens(), ["A"]) == [3]
    with pytest.raises(ValueError, match="token counts: {'AB': 2}"):
        letter_token_ids(TwoTokens(), ["A", "AB"])


def oracle(tokenizer, rows, pick):
    """A LetterOracle whose logits favour `pick(row)`'s letter; a non-letter token ("Z") is favoured even more,
    so only scoring restricted to the answer letters finds the letter."""
    (non_letter,) = tokenizer.encode("Z")
    favour = {}
    for row in rows:
        (letter_id,) = letter_token_ids(tokenizer, [pick(row)])
        favour[tuple(tokenizer.render_for_completion(row))] = {letter_id: 5.0, non_letter: 10.0}
    return LetterOracle(favour, tokenizer.get_vocab_size())


class RowsTask:
    """A plain list of rows behind the Task interface the evaluator uses (len, [i], evaluate, eval_type)."""

    def __init__(self, task, rows):
        self.task, self.rows, self.eval_type = task, rows, task.eval_type

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def evaluate(self, conversation, completion):
        return self.task.evaluate(conversation, completion)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_oracle_scores_all_and_wrong_letter_scores_none(data_dir, tokenizer, batch_size):
    task = load_task("ARC-Easy", data_dir, "validation")
    rows = task[:12]
    right = oracle(tokenizer, rows, lambda row: row["messages"][-1]["content"])
    assert evaluate_categorical(right, tokenizer, task, range(12), batch_size, "cpu") == (12, 0)
    assert right.calls == [min(batch_size, 12 - start) for start in range(0, 12, batch_size)]  # one forward a batch

    def wrong_letter(row):
        return next(letter for letter in row["letters"] if letter != row["messages"][-1]["content"])

    wrong = oracle(tokenizer, rows, wrong_letter)
    assert evaluate_categorical(wrong, tokenizer, task, range(12), batch_size, "cpu") == (0, 0)
    # Through evaluate_task as the script calls it: every problem, the counts and the centered accuracy.
    result = evaluate_task("ARC-Easy", RowsTask(task, rows), right, tokenizer, "cpu", batch_size=batch_size)
    assert (result.problems, result.passed, result.accuracy, result.centered) == (12, 12, 1.0, 1.0)


def test_batched_logits_equal_one_prompt_at_a_time(data_dir, tokenizer):
    rows = arc_rows(data_dir, 6) + load_task("MMLU", data_dir)[:4]
    prompts = [tokenizer.render_for_completion(row) for row in rows]
    assert len({len(p) for p in prompts}) > 3  # right padding is really exercised
    model = random_gpt(tokenizer.get_vocab_size())
    pad = tokenizer.get_bos_token_id()
    batched = last_position_logits(model, prompts, pad, "cpu")
    alone = torch.cat([last_position_logits(model, [prompt], pad, "cpu") for prompt in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    assert batched.std(dim=0).mean() > 0.1  # prompts really give different logits
    letter_ids = [letter_token_ids(tokenizer, row["letters"]) for row in rows]
    assert predict_choices(model, prompts, letter_ids, pad, "cpu") == [
        predict_choices(model, [prompt], [ids], pad, "cpu")[0] for prompt, ids in zip(prompts, letter_ids)
    ]


def test_prompts_longer_than_the_context_are_skipped_and_failed(data_dir, tokenizer):
    task = load_task("ARC-Easy", data_dir, "validation")
    rows = task[:12]
    lengths = sorted(len(tokenizer.render_for_completion(row)) for row in rows)
    context = lengths[5]  # the 6 shortest fit (ties aside), the rest do not
    fitting = sum(length <= context for length in lengths)
    assert 0 < fitting < 12
    right = oracle(tokenizer, rows, lambda row: row["messages"][-1]["content"])
    right.config.sequence_len = context
    assert evaluate_categorical(right, tokenizer, task, range(12), 4, "cpu") == (fitting, 12 - fitting)
    right.config.sequence_len = lengths[0] - 1  # nothing fits: no forward at all, no crash
    right.calls.clear()
    assert evaluate_categorical(right, tokenizer, task, range(12), 4, "cpu") == (0, 12)
    assert right.calls == []


# ---------------------------------------------------------------------------- generative


class ScriptedModel(torch.nn.Module):
    """A tiny GPT fills the engine's KV cache as usual, but its logits are replaced: after a prompt the model
    says `scripts[prompt]` token by token, then <|assistant_end|>."""

    def __init__(self, gpt: GPT, scripts: dict[tuple, list[int]], stop_id: int):
        super().__init__()
        self.gpt, self.scripts, self.stop_id = gpt, scripts, stop_id
        self.config, self.wte, self.compute_dtype = gpt.config, gpt.wte, None
        self.prompt = None

    def forward(self, idx, kv_cache=None, logits_to_keep=0):
        prefill = kv_cache.lengths[0] == 0  # the engine prefills a fresh batch-1 cache with the prompt
        logits = self.gpt(idx, kv_cache=kv_cache, logits_to_keep=logits_to_keep)
        if prefill:
            self.prompt = tuple(idx[0].tolist())  # these prompts fit in one prefill chunk
        script = [*self.scripts[self.prompt], self.stop_id]
        said = kv_cache.lengths[0] - len(self.prompt)  # tokens of the reply fed back so far
        scripted = torch.full_like(logits, -10.0)
        scripted[:, -1, script[min(said, len(script) - 1)]] = 10.0
        return scripted


def scripted_engine(tokenizer, task, count, answer_for):
    scripts = {}
    for i in range(count):
        row = task[i]
        scripts[tuple(tokenizer.render_for_completion(row))] = tokenizer.encode(f"So:\n#### {answer_for(row)}")
    gpt = random_gpt(tokenizer.get_vocab_size(), sequence_len=512)
    return Engine(ScriptedModel(gpt, scripts, tokenizer.encode_special("<|assistant_end|>")), tokenizer)


@pytest.mark.parametrize("name", ["GSM8K", "SpellingBee"])
def test_scripted_right_answer_passes_and_wrong_one_fails(data_dir, tokenizer, name):
    task = load_task(name, data_dir)

    def right(row):
        return extract_answer(reference_text(row))

    def wrong(row):
        return int(right(row)) + 1

    for answer_for, expected in ((right, 3), (wrong, 0)):
        engine = scripted_engine(tokenizer, task, 3, answer_for)
        assert evaluate_generative(engine, tokenizer, task, range(3), 2, 32, 0.0, 50) == (expected, 0)


def test_pass_at_k_passes_when_any_sample_passes(data_dir, tokenizer):
    task = load_task("GSM8K", data_dir)

    class FakeEngine:
        """Sample s of problem i says '#### <answer>' iff s == i (problem 0: first sample, problem 2: third)."""

        def generate_batch(self, tokens, num_samples, max_tokens, seed, **sampling):
            answer = int(extract_answer(reference_text(task[seed])))
            texts = [f"#### {answer if s == seed else answer - 1}" for s in range(num_samples)]
            return [Completion(tokenizer.encode(text), [1] * len(tokenizer.encode(text)), "stop") for text in texts]

    assert evaluate_generative(FakeEngine(), tokenizer, task, range(3), 1, 8, 1.0, None) == (1, 0)
    assert evaluate_generative(FakeEngine(), tokenizer, task, range(3), 2, 8, 1.0, None) == (2, 0)
    assert evaluate_generative(FakeEngine(), tokenizer, task, range(3), 3, 8, 1.0, None) == (3, 0)


def test_tiny_model_generates_within_range_and_skips_what_does_not_fit(data_dir, tokenizer):
    model = random_gpt(tokenizer.get_vocab_size(), sequence_len=512)
    engine = Engine(model, tokenizer)
    for name in ("GSM8K", "SpellingBee"):
        task = load_task(name, data_dir)
        passed, too_long = evaluate_generative(engine, tokenizer, task, range(2), 2, 6, 0.8, 50)
        assert 0 <= passed <= 2 and too_long == 0
    short = Engine(random_gpt(tokenizer.get_vocab_size(), sequence_len=16), tokenizer)
    with pytest.raises(ContextFullError):  # the engine's own rule, which the evaluator relies on
        short.generate_batch(tokenizer.render_for_completion(load_task("GSM8K", data_dir)[0]), 1, 4)
    assert evaluate_generative(short, tokenizer, load_task("GSM8K", data_dir), range(3), 1, 4, 0.0, 50) == (0, 3)


# ---------------------------------------------------------------------------- ChatCORE


def test_chatcore_is_the_mean_centered_accuracy_of_all_six():
    accuracies = {
        "ARC-Easy": 0.55,
        "ARC-Challenge": 0.25,
        "MMLU": 1.0,
        "GSM8K": 0.1,
        "HumanEval": 0.0,
        "SpellingBee": 0.4,
    }
    results = [
        TaskResult(name, "x", 20, round(acc * 20), 0, evaluate.BASELINES[name]) for name, acc in accuracies.items()
    ]
    # centered: (0.55 - 0.25) / 0.75 = 0.4, 0, 1, 0.1, 0, 0.4 -> mean 1.9 / 6
    assert chatcore(results) == pytest.approx(1.9 / 6)
    assert chatcore(results[::-1]) == pytest.approx(1.9 / 6)
    assert chatcore(results[:5]) is None
    assert chat_eval.summary_line(results[:5]) == ("ChatCORE not reported: it needs all 6 tasks; missing: SpellingBee")
    assert TaskResult("MMLU", "categorical", 8, 1, 0, 0.25).centered == pytest.approx((0.125 - 0.25) / 0.75)
    assert TaskResult("GSM8K", "generative", 0, 0, 0, 0.0).accuracy == 0.0


# ---------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory):
    """A base dir with the throwaway tokenizer and a depth-1 SFT checkpoint at step 3."""
    from nanochat.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("nanochat")
    tokenizer.save(str(root / "tokenizer"))
    save_checkpoint(str(root / "chatsft_checkpoints" / "d1"), 3, random_gpt(tokenizer.get_vocab_size()))
    return root


def cli_env(base_dir):
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}


CLI_ARGS = ["-i", "sft", "-x", "2", "-m", "8", "--device-type", "cpu", "--arc-split", "validation"]


def test_cli_end_to_end(base_dir, data_dir):
    tasks = "ARC-Easy|GSM8K|HumanEval"
    launched = subprocess.run(
        [sys.executable, "-m", "scripts.chat_eval", *CLI_ARGS, "-a", tasks, "--data-dir", data_dir],
        cwd=REPO, env=cli_env(base_dir), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    out = launched.stdout
    assert "chat eval of sft d1 step 3" in out
    for name, scoring in (("ARC-Easy", "categorical"), ("GSM8K", "pass@1"), ("HumanEval", "pass@1")):
        assert f"| {name} | {scoring} | 2 |" in out, out[-2000:]
    assert "ChatCORE not reported: it needs all 6 tasks; missing: ARC-Challenge, MMLU, SpellingBee" in out
    stem = base_dir / "chat_eval" / "chat_sft_d1_000003_ARC-Easy_GSM8K_HumanEval"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert [t["name"] for t in saved["tasks"]] == ["ARC-Easy", "GSM8K", "HumanEval"]
    assert all(t["problems"] == 2 and 0 <= t["passed"] <= 2 for t in saved["tasks"])
    assert saved["chatcore"] is None and (saved["model_tag"], saved["step"]) == ("d1", 3)
    assert "| ARC-Easy | categorical | 2 |" in stem.with_suffix(".md").read_text()


def test_cli_all_six_tasks_reports_chatcore(base_dir, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    results = chat_eval.main([*CLI_ARGS, "-x", "1", "-m", "4", "--data-dir", data_dir])
    assert [r.name for r in results] == list(ALL_TASKS)
    out = capsys.readouterr().out
    assert f"ChatCORE {chatcore(results):.4f} over all 6 tasks" in out
    saved = json.loads((base_dir / "chat_eval" / "chat_sft_d1_000003.json").read_text())
    assert saved["chatcore"] == pytest.approx(chatcore(results))
    card = json.loads((base_dir / "report" / "chat_eval_sft.json").read_text())  # the report card's summary
    assert card["chatcore"] == pytest.approx(chatcore(results)) and list(card["tasks"]) == list(ALL_TASKS)
    assert (card["model_tag"], card["step"]) == ("d1", 3)  # the stage-summary contract


def test_cli_sizes_itself_to_the_cpu_says_so_and_shows_progress(base_dir, data_dir, monkeypatch, capsys):
    from nanochat import dataset

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setattr(dataset, "PROGRESS_EVERY_S", 0.0)  # a progress line per batch or problem
    args = ["-i", "sft", "--device-type", "cpu", "--arc-split", "validation", "--data-dir", data_dir]
    results = chat_eval.main([*args, "-a", "ARC-Easy|SpellingBee", "-m", "8"])  # -x: the CPU's default
    out = capsys.readouterr().out
    limit = chat_eval.CPU_MAX_PROBLEMS
    assert f"at most {limit} problems per task, at most 8 new tokens a sample (CPU default; -x, -m to change)" in out
    assert [r.problems for r in results] == [limit, limit]
    assert f"chat eval ARC-Easy: 16.0% 8/{limit} problems, " in out and " min elapsed, ETA " in out
    assert f"chat eval SpellingBee: {1 / limit:.1%} 1/{limit} problems, " in out
    chat_eval.main([*args, "-a", "ARC-Easy", "-x", "1"])
    assert f"at most 1 problems per task, at most {chat_eval.CPU_MAX_NEW_TOKENS} new tokens" in capsys.readouterr().out


def test_cli_refuses_what_it_cannot_do(base_dir, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    for args, message in (
        (["-i", "sft", "-a", "ARC-Easy", "--data-dir", data_dir], "no ARC test split: pass --arc-split validation"),
        (["-i", "sft", "-a", "GSM8K|Jeopardy"], "unknown task(s) ['Jeopardy']"),
        (["-i", "sft", "-a", "GSM8K|GSM8K"], "task listed twice"),
        (["-i", "sft", "-k", "0"], "-k must be >= 1, or -1 for off"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            chat_eval.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_corrupt_checkpoint_is_one_line_not_a_traceback(base_dir, tmp_path, monkeypatch):
    """Issue 15: a model file with one byte flipped in place ends the run with one line naming the file."""
    shutil.copytree(base_dir / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(base_dir / "chatsft_checkpoints", tmp_path / "chatsft_checkpoints")
    path = tmp_path / "chatsft_checkpoints" / "d1" / "model_000003.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        chat_eval.main([*CLI_ARGS, "-a", "GSM8K"])
    message = str(exit_info.value.code)
    assert message.startswith(f"chat_eval: {path} does not match the sha256") and "\n" not in message


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(base_dir, data_dir, monkeypatch):
    """Problems strided over two ranks, counts summed: the same totals as one process (5 problems: 3 + 2)."""
    args = [*CLI_ARGS, "-x", "5", "-a", "ARC-Easy|SpellingBee", "-t", "0.8", "-n", "2", "--data-dir", data_dir]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    single = [(r.problems, r.passed, r.too_long) for r in chat_eval.main(args)]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launched = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.chat_eval", *args],
        cwd=REPO, env=cli_env(base_dir), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    # Rank 1's problems (1 and 3) include a pass, so totals without its share would differ.
    model, _ = build_model(str(base_dir / "chatsft_checkpoints" / "d1"), phase="eval")
    task = load_task("ARC-Easy", data_dir, "validation")
    assert evaluate_categorical(model, get_tokenizer(str(base_dir)), task, range(1, 5, 2), 8, "cpu")[0] > 0
    saved = json.loads((base_dir / "chat_eval" / "chat_sft_d1_000003_ARC-Easy_SpellingBee.json").read_text())
    assert [(t["problems"], t["passed"], t["too_long"]) for t in saved["tasks"]] == single
